"""Vision Transformer: patch embedding, CLS token, learned (resizable) position embeddings."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlalign.errors import ConfigError
from vlalign.models import TOWERS
from vlalign.models.layers import PARAM_DTYPE, Dtype, Encoder, MAPHead

POOLS = ("cls", "map", "gap")


def check_patch_grid(height: int, width: int, patch_size: int) -> tuple[int, int]:
  """The `(rows, cols)` patch grid of an `height x width` image; ValueError if it does not tile."""
  if height % patch_size or width % patch_size:
    raise ConfigError(
      f"image size {height}x{width} is not a multiple of the patch size {patch_size}; "
      "resize or crop the images, or change model.image.patch_size"
    )
  return height // patch_size, width // patch_size


INTERPOLATIONS = ("bilinear", "bicubic")


def resize_position_embedding(
  pos: jax.Array, rows: int, cols: int, method: str = "bilinear"
) -> jax.Array:
  """Resizes a `[R, C, D]` grid of position embeddings to `[rows, cols, D]` (`method`: bilinear
  or bicubic)."""
  if method not in INTERPOLATIONS:
    raise ConfigError(f"unknown pos_interpolation {method!r}; choose one of {INTERPOLATIONS}")
  if pos.shape[:2] == (rows, cols):
    return pos
  return jax.image.resize(pos, (rows, cols, pos.shape[-1]), method=method)


@TOWERS.register("vit")
class ViT(nn.Module):
  """Pre-LN ViT with a learned CLS token (with a position embedding only if `cls_pos_embed`).

  Position embeddings are learned for the `image_size` grid and bilinearly interpolated when the
  input's patch grid differs, so a model trained at 64 px also runs on 96 px images.

  Attributes:
    width: token width D.
    depth, num_heads, mlp_dim, dropout: transformer sizes; `dropout` also on attention weights.
    patch_size: side of the square patches.
    image_size: side of the (square) training images, which fixes the learned grid.
    dtype: compute dtype (parameters stay float32).
    remat: recompute block activations in the backward pass.
    cls_pos_embed: the CLS token gets a position embedding too, as in ViT/DeiT (timm, Hugging
      Face) and CLIP: `pos_embedding` is then `[1 + g*g, D]`, CLS first; otherwise `[g, g, D]`.
    ln_pre: a LayerNorm on the embedded tokens before the blocks (CLIP's `ln_pre`).
    patch_bias: a bias in the patch projection (CLIP has none).
    layer_norm_eps: LayerNorm epsilon (1e-12 in Hugging Face ViT/DeiT, 1e-5 in CLIP).
    activation: MLP activation, `gelu` (exact) or `quick_gelu` (OpenAI CLIP).
    layer_scale, layer_scale_init: LayerScale on every residual branch (DINOv2).
    num_registers: learned register tokens after the CLS, without position embeddings (DINOv2
      with registers, Darcet et al. 2024); they are dropped from `tokens`.
    pos_interpolation: how the learned grid is resized to another input grid: "bilinear" or
      "bicubic" (DINOv2, timm). JAX's bicubic kernel is Keys' a = -0.5, PyTorch's a = -0.75, so
      resized grids are close to, not equal to, PyTorch's.
    class_token: a learned CLS token before the patches (SigLIP has none).
    pool: how `cls` is made: "cls" (the CLS token), "map" (multihead attention pooling of the
      patch tokens, SigLIP's head) or "gap" (their mean).
    distillation_token: DeiT's distillation token after the CLS, with its own position embedding
      (needs `cls_pos_embed`: the table is then `[2 + g*g, D]`); dropped from `tokens`.

  The final LayerNorm applies to every token, so `cls` is Hugging Face CLIP's `pooler_output`
  (its `post_layernorm` of the CLS) and, for ViT/DeiT, their `last_hidden_state[:, 0]`.
  """

  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: int
  image_size: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  remat: bool = False
  cls_pos_embed: bool = False
  ln_pre: bool = False
  patch_bias: bool = True
  layer_norm_eps: float = 1e-6
  activation: str = "gelu"
  layer_scale: bool = False
  layer_scale_init: float = 1.0
  num_registers: int = 0
  pos_interpolation: str = "bilinear"
  class_token: bool = True
  pool: str = "cls"
  distillation_token: bool = False

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """images `[B, H, W, 3]` -> `{"cls": [B, D], "tokens": [B, N, D]}` (N = H W / p^2, no CLS)."""
    batch, height, width_px, _ = images.shape
    rows, cols = check_patch_grid(height, width_px, self.patch_size)
    grid = self.image_size // self.patch_size
    p = self.patch_size
    x = nn.Conv(
      self.width,
      (p, p),
      strides=(p, p),
      padding="VALID",
      use_bias=self.patch_bias,
      dtype=self.dtype,
      param_dtype=PARAM_DTYPE,
      name="patch_embed",
    )(images)
    init = nn.initializers.normal(0.02)
    if self.distillation_token and not self.cls_pos_embed:
      raise ConfigError("vit: distillation_token needs cls_pos_embed=True (DeiT)")
    if self.cls_pos_embed:
      heads = 1 + int(self.distillation_token)  # tokens before the patches that have positions
      pos = self.param("pos_embedding", init, (heads + grid * grid, self.width), PARAM_DTYPE)
      cls_pos, pos = pos[:heads], pos[heads:].reshape(grid, grid, self.width)
    else:
      pos = self.param("pos_embedding", init, (grid, grid, self.width), PARAM_DTYPE)
      cls_pos = None
    x = x + resize_position_embedding(pos, rows, cols, self.pos_interpolation).astype(self.dtype)
    x = x.reshape(batch, rows * cols, self.width)
    if self.pool not in POOLS or (self.pool == "cls" and not self.class_token):
      raise ConfigError(
        f"vit pool {self.pool!r} (class_token={self.class_token}): choose one of {POOLS}; "
        "'cls' needs class_token=True"
      )
    if self.cls_pos_embed and not self.class_token:
      raise ConfigError("vit: cls_pos_embed needs class_token=True")
    prefix = []
    if self.class_token:
      cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width), PARAM_DTYPE)
      prefix.append(cls if cls_pos is None else cls + cls_pos[:1])
    if self.distillation_token:
      dist = self.param("dist", nn.initializers.zeros, (1, 1, self.width), PARAM_DTYPE)
      prefix.append(dist + cls_pos[1:2])
    if self.num_registers:
      prefix.append(
        self.param(
          "registers", nn.initializers.zeros, (1, self.num_registers, self.width), PARAM_DTYPE
        )
      )
    if prefix:
      prefix = jnp.concatenate(prefix, axis=1)
      x = jnp.concatenate(
        [jnp.broadcast_to(prefix, (batch, *prefix.shape[1:])).astype(x.dtype), x], 1
      )
    if self.ln_pre:
      x = nn.LayerNorm(
        epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=PARAM_DTYPE, name="ln_pre"
      )(x)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    x = Encoder(
      depth=self.depth,
      num_heads=self.num_heads,
      mlp_dim=self.mlp_dim,
      dropout=self.dropout,
      attention_dropout=self.dropout,
      dtype=self.dtype,
      remat=self.remat,
      layer_norm_eps=self.layer_norm_eps,
      activation=self.activation,
      layer_scale=self.layer_scale,
      layer_scale_init=self.layer_scale_init,
      name="encoder",
    )(x, None, train)
    tokens = x[:, int(self.class_token) + int(self.distillation_token) + self.num_registers :]
    if self.pool == "cls":
      cls = x[:, 0]
    elif self.pool == "map":
      cls = MAPHead(
        self.num_heads, self.mlp_dim, self.layer_norm_eps, self.activation, self.dtype, name="map"
      )(tokens)
    else:
      cls = jnp.mean(tokens, axis=1)
    return {"cls": cls, "tokens": tokens}
