"""Vision Transformer: patch embedding, CLS token, learned (resizable) position embeddings."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlalign.errors import ConfigError
from vlalign.models import TOWERS
from vlalign.models.layers import PARAM_DTYPE, Dtype, Encoder


def check_patch_grid(height: int, width: int, patch_size: int) -> tuple[int, int]:
  """The `(rows, cols)` patch grid of an `height x width` image; ValueError if it does not tile."""
  if height % patch_size or width % patch_size:
    raise ConfigError(
      f"image size {height}x{width} is not a multiple of the patch size {patch_size}; "
      "resize or crop the images, or change model.image.patch_size"
    )
  return height // patch_size, width // patch_size


def resize_position_embedding(pos: jax.Array, rows: int, cols: int) -> jax.Array:
  """Bilinearly resizes a `[R, C, D]` grid of position embeddings to `[rows, cols, D]`."""
  if pos.shape[:2] == (rows, cols):
    return pos
  return jax.image.resize(pos, (rows, cols, pos.shape[-1]), method="bilinear")


@TOWERS.register("vit")
class ViT(nn.Module):
  """Pre-LN ViT with a learned CLS token (which gets no position embedding).

  Position embeddings are learned for the `image_size` grid and bilinearly interpolated when the
  input's patch grid differs, so a model trained at 64 px also runs on 96 px images.

  Attributes:
    width: token width D.
    depth, num_heads, mlp_dim, dropout: transformer sizes; `dropout` also on attention weights.
    patch_size: side of the square patches.
    image_size: side of the (square) training images, which fixes the learned grid.
    dtype: compute dtype (parameters stay float32).
    remat: recompute block activations in the backward pass.
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
      dtype=self.dtype,
      param_dtype=PARAM_DTYPE,
      name="patch_embed",
    )(images)
    pos = self.param(
      "pos_embedding", nn.initializers.normal(0.02), (grid, grid, self.width), PARAM_DTYPE
    )
    x = x + resize_position_embedding(pos, rows, cols).astype(self.dtype)
    x = x.reshape(batch, rows * cols, self.width)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width), PARAM_DTYPE)
    x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.width)).astype(x.dtype), x], 1)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    x = Encoder(
      depth=self.depth,
      num_heads=self.num_heads,
      mlp_dim=self.mlp_dim,
      dropout=self.dropout,
      attention_dropout=self.dropout,
      dtype=self.dtype,
      remat=self.remat,
      name="encoder",
    )(x, None, train)
    return {"cls": x[:, 0], "tokens": x[:, 1:]}
