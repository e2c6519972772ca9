"""Vision Transformer: patch embedding, CLS token, learned (resizable) position embeddings."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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


# `pos_interpolation` -> `torch.nn.functional.interpolate(mode=..., align_corners=False)`: the
# plain names without antialiasing (torch's default, and the resize of DeiT/ALBEF/TCL's
# `interpolate_pos_embed` and Hugging Face ViT/CLIP's `interpolate_pos_encoding`), the
# `_antialias` ones with `antialias=True` (timm's `resample_abs_pos_embed`), which is what
# `jax.image.resize` does.
# Each equals PyTorch to float32 rounding (tests/test_pos_resize.py against torch's outputs).
INTERPOLATIONS = ("bilinear", "bicubic", "bilinear_antialias", "bicubic_antialias")
# PyTorch's cubic convolution coefficient (aten `UpSample.h`, `upsample_get_cubic_coefficients`);
# Keys (1981), PIL and `jax.image.resize` use -0.5.
TORCH_CUBIC_A = -0.75


def _cubic(x: np.ndarray, a: float = TORCH_CUBIC_A) -> np.ndarray:
  """Keys' cubic convolution kernel with coefficient `a` at distances `x` (any shape)."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1  # |x| <= 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 < |x| < 2
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def interpolation_matrix(n_in: int, n_out: int, method: str) -> np.ndarray:
  """`[n_out, n_in]` float64 weights of PyTorch's 1-D `interpolate(mode=method,
  align_corners=False, antialias=False)`, `method` "bilinear" (linear) or "bicubic".

  As aten's `UpSampleBicubic2d` / `UpSampleBilinear2d` (`area_pixel_compute_source_index`,
  `get_cubic_upsample_coefficients`): output i samples the input at
  `x = (i + 0.5) * n_in / n_out - 0.5` (clamped at 0 for linear, not for cubic); linear mixes
  inputs `floor(x)` and `floor(x) + 1`, cubic the four inputs `floor(x) - 1 .. floor(x) + 2` with
  `_cubic` (A = -0.75) weights; input indices are clamped to `[0, n_in - 1]` (the border value
  repeats), so every row sums to 1. No antialiasing: shrinking samples the input, it does not
  average it. Computed in float64: PyTorch on float32 inputs rounds `x` to float32 first, which
  moves its outputs by about 1e-6 of the input's scale (the tests compare with its float64 run).
  """
  src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
  if method == "bilinear":
    src = np.maximum(src, 0.0)
  low = np.floor(src)
  frac = src - low
  if method == "bilinear":
    offsets, taps = (0, 1), (1 - frac, frac)
  else:
    offsets = (-1, 0, 1, 2)
    taps = tuple(_cubic(frac - k) for k in offsets)
  weights = np.zeros((n_out, n_in))
  rows = np.arange(n_out)
  for k, tap in zip(offsets, taps):
    np.add.at(weights, (rows, np.clip(low.astype(np.int64) + k, 0, n_in - 1)), tap)
  return weights


def resize_position_embedding(
  pos: jax.Array, rows: int, cols: int, method: str = "bilinear"
) -> jax.Array:
  """Resizes a `[R, C, D]` grid of position embeddings to `[rows, cols, D]`.

  Args:
    pos: `[R, C, D]` grid (a jax or numpy array).
    rows, cols: the new grid.
    method: one of `INTERPOLATIONS`: "bilinear" / "bicubic" are PyTorch's `F.interpolate(...,
      align_corners=False)` (separable weights from `interpolation_matrix`), the `_antialias`
      variants PyTorch's with `antialias=True` (`jax.image.resize`: Keys a = -0.5 for cubic, and
      a kernel widened by the shrink factor when shrinking). Upsampling bilinear is the same in
      both.

  Returns:
    `[rows, cols, D]` in `pos`'s dtype; `pos` itself when the grid already has that size.
  """
  if method not in INTERPOLATIONS:
    raise ConfigError(f"unknown pos_interpolation {method!r}; choose one of {INTERPOLATIONS}")
  if pos.shape[:2] == (rows, cols):
    return pos
  if method.endswith("_antialias"):
    base = method.removesuffix("_antialias")
    return jax.image.resize(pos, (rows, cols, pos.shape[-1]), method=base, antialias=True)
  weight_rows = interpolation_matrix(pos.shape[0], rows, method).astype(np.float32)
  weight_cols = interpolation_matrix(pos.shape[1], cols, method).astype(np.float32)
  out = jnp.einsum(
    "rR,cC,RCd->rcd",
    weight_rows,
    weight_cols,
    jnp.asarray(pos, jnp.float32),
    precision=jax.lax.Precision.HIGHEST,
  )
  return out.astype(pos.dtype)


def fit_position_table(
  value: np.ndarray,
  shape: tuple[int, ...],
  method: str = "bilinear",
  distillation_token: bool = False,
) -> np.ndarray:
  """A stored ViT position table resized to a tower's `pos_embedding` of another image size.

  ALBEF and timm interpolate a 224 px checkpoint's grid for 256 px images, ALBEF/TCL retrieval
  its 256 px pre-training grid for 384 px fine-tuning (`interpolate_pos_embed`).

  Args:
    value: the stored table: `[heads + N, D]` (CLS, and DeiT's distillation token, first; a
      leading batch axis of 1 is allowed, as Hugging Face stores it) or a `[R, R, D]` grid.
    shape: the tower's `pos_embedding` shape: `[heads + n, D]` (`cls_pos_embed`) or `[g, g, D]`.
    method: the tower's `pos_interpolation` (see `resize_position_embedding`).
    distillation_token: the tower has DeiT's distillation token (heads = 2 with `cls_pos_embed`).

  Returns:
    An array of `shape` and `value`'s dtype: the head rows as stored, the grid resized.
  """
  table = np.asarray(value).reshape(-1, value.shape[-1])
  has_cls = len(shape) == 2
  heads = (1 + int(bool(distillation_token))) if has_cls else 0  # rows before the grid
  head, grid = table[:heads], table[heads:]
  side = int(round(np.sqrt(grid.shape[0])))
  target = int(round(np.sqrt(shape[0] - heads))) if has_cls else shape[0]
  if side * side != grid.shape[0]:
    raise ConfigError(f"a position table of {grid.shape[0]} patches is not a square grid")
  resized = np.asarray(
    resize_position_embedding(grid.reshape(side, side, -1), target, target, method)
  )
  if not has_cls:
    return resized.astype(value.dtype)
  return np.concatenate([head, resized.reshape(-1, resized.shape[-1])]).astype(value.dtype)


@TOWERS.register("vit")
class ViT(nn.Module):
  """Pre-LN ViT with a learned CLS token (with a position embedding only if `cls_pos_embed`).

  Position embeddings are learned for the `image_size` grid and interpolated
  (`pos_interpolation`) when the input's patch grid differs, so a model trained at 64 px also runs
  on 96 px images.

  Attributes:
    width: token width D.
    depth, num_heads, mlp_dim, dropout: transformer sizes; `dropout` also on attention weights.
    patch_size: side of the square patches.
    image_size: side of the (square) training images, which fixes the learned grid.
    dtype: compute dtype (parameters stay float32).
    remat: recompute block activations in the backward pass.
    remat_policy: what `remat` may keep (`vlalign.models.scan.REMAT_POLICIES`).
    scan_layers: the blocks as one `nn.scan` (parameters `encoder/blocks`, a leading layer axis)
      instead of unrolled (`encoder/block_{i}`); see `vlalign/models/scan.py`.
    cls_pos_embed: the CLS token gets a position embedding too, as in ViT/DeiT (timm, Hugging
      Face) and CLIP: `pos_embedding` is then `[1 + g*g, D]`, CLS first; otherwise `[g, g, D]`.
    ln_pre: a LayerNorm on the embedded tokens before the blocks (CLIP's `ln_pre`).
    patch_bias: a bias in the patch projection (CLIP has none).
    layer_norm_eps: LayerNorm epsilon (1e-12 in Hugging Face ViT/DeiT, 1e-5 in CLIP).
    activation: MLP activation, `gelu` (exact) or `quick_gelu` (OpenAI CLIP).
    layer_scale, layer_scale_init: LayerScale on every residual branch (DINOv2).
    num_registers: learned register tokens after the CLS, without position embeddings (DINOv2
      with registers, Darcet et al. 2024); they are dropped from `tokens`.
    pos_interpolation: how the learned grid is resized to another input grid (and a checkpoint's
      grid to another image size on import): one of `INTERPOLATIONS`, each PyTorch's
      `F.interpolate(mode=..., align_corners=False)`: "bilinear", "bicubic" (DeiT's and
      ALBEF/TCL's `interpolate_pos_embed`, Hugging Face ViT/CLIP at run time), or with
      `antialias=True` "bilinear_antialias", "bicubic_antialias" (timm's `resample_abs_pos_embed`;
      `jax.image.resize`). Upsampling, the two bilinear ones agree.
    class_token: a learned CLS token before the patches (SigLIP has none).
    pool: how `cls` is made: "cls" (the CLS token), "map" (multihead attention pooling of the
      patch tokens, SigLIP's head) or "gap" (their mean).
    distillation_token: DeiT's distillation token after the CLS, with its own position embedding
      (needs `cls_pos_embed`: the table is then `[2 + g*g, D]`); dropped from `tokens`.
    attention_implementation: "flax" (default), or "xla" / "cudnn" through
      `jax.nn.dot_product_attention` ("cudnn": cuDNN's flash attention on NVIDIA GPUs, for a
      bfloat16 `dtype`); the last two need `dropout=0` (`layers.dot_product_attention_fn`).

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
  remat_policy: str = "full"
  scan_layers: bool = False
  attention_implementation: str = "flax"

  @nn.compact
  def __call__(
    self, images: jax.Array, train: bool = False, tokens: bool = True
  ) -> dict[str, jax.Array]:
    """images `[B, H, W, 3]` -> `{"cls": [B, D], "tokens": [B, N, D]}` (N = H W / p^2, no CLS).

    With `tokens=False` only `cls` is returned; pooled from the CLS token (`pool="cls"`), the last
    block then computes the CLS row alone (`Encoder`'s `rows`): the same `cls`, for ~1/depth less
    work.
    """
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
    if self.attention_implementation != "flax" and self.dropout:
      raise ConfigError(
        f"vit: attention_implementation={self.attention_implementation!r} takes no attention "
        f"dropout, but dropout={self.dropout} (use 'flax', or dropout=0)"
      )
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
    cls_only = not tokens and self.pool == "cls"
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
      remat_policy=self.remat_policy,
      scan_layers=self.scan_layers,
      attention_implementation=self.attention_implementation,
      name="encoder",
    )(x, None, train, jnp.zeros((batch, 1), jnp.int32) if cls_only else None)
    if cls_only:
      return {"cls": x[:, 0]}
    patches = x[:, int(self.class_token) + int(self.distillation_token) + self.num_registers :]
    if self.pool == "cls":
      cls = x[:, 0]
    elif self.pool == "map":
      cls = MAPHead(
        self.num_heads, self.mlp_dim, self.layer_norm_eps, self.activation, self.dtype, name="map"
      )(patches)
    else:
      cls = jnp.mean(patches, axis=1)
    return {"cls": cls, "tokens": patches} if tokens else {"cls": cls}
