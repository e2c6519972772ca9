"""Projection heads into the joint embedding space, and L2 normalisation."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlalign.models.layers import PARAM_DTYPE, Dtype


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-6) -> jax.Array:
  """`x / max(||x||, eps)` along `axis`, computed and returned in float32."""
  x = x.astype(jnp.float32)
  sq_norm = jnp.sum(x * x, axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq_norm, eps * eps))


class Projection(nn.Module):
  """`[..., D] -> [..., E]`: linear, or Dense(hidden) -> GELU -> Dense(E) when `hidden` is set.

  Attributes:
    embed_dim: output width E.
    hidden: hidden width of the MLP variant; None for a single linear map.
    use_bias: whether the Dense layers have a bias (CLIP: no; ALBEF: yes).
    dtype: compute dtype; float32 by default, as the embeddings feed the contrastive losses.
  """

  embed_dim: int
  hidden: int | None = None
  use_bias: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = lambda features, name: nn.Dense(
      features, use_bias=self.use_bias, dtype=self.dtype, param_dtype=PARAM_DTYPE, name=name
    )
    if self.hidden is not None:
      x = nn.gelu(dense(self.hidden, "hidden")(x), approximate=False)
    return dense(self.embed_dim, "out")(x)
