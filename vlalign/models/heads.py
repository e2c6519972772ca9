"""Projection heads into the joint embedding space, and L2 normalisation."""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlalign.models.layers import PARAM_DTYPE, Dtype, gelu


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-6) -> jax.Array:
  """`x / max(||x||, eps)` along `axis`, computed and returned in float32."""
  x = x.astype(jnp.float32)
  sq_norm = jnp.sum(x * x, axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq_norm, eps * eps))


def torch_linear_init(fan_in: int) -> dict[str, Any]:
  """`nn.Dense`'s `kernel_init` and `bias_init` as PyTorch's `nn.Linear` with `fan_in` inputs
  starts them: both U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (its kaiming_uniform with a = sqrt(5))."""
  bound = 1 / math.sqrt(fan_in)

  def uniform(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return dict(kernel_init=uniform, bias_init=uniform)


def dense_init(torch_init: bool, fan_in: int) -> dict[str, Any]:
  """`torch_linear_init(fan_in)` when `torch_init`, else `{}` (Flax's defaults: LeCun normal
  kernels, zero biases)."""
  return torch_linear_init(fan_in) if torch_init else {}


class Projection(nn.Module):
  """`[..., D] -> [..., E]`: linear, or Dense(hidden) -> GELU -> Dense(E) when `hidden` is set.

  Attributes:
    embed_dim: output width E.
    hidden: hidden width of the MLP variant; None for a single linear map.
    use_bias: whether the Dense layers have a bias (CLIP: no; ALBEF: yes).
    dtype: compute dtype; float32 by default, as the embeddings feed the contrastive losses.
    torch_init: start as PyTorch's `nn.Linear` (`torch_linear_init`; ALBEF's `vision_proj`,
      `text_proj`); else Flax's defaults.
  """

  embed_dim: int
  hidden: int | None = None
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  torch_init: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = lambda features, name, fan_in: nn.Dense(
      features,
      use_bias=self.use_bias,
      dtype=self.dtype,
      param_dtype=PARAM_DTYPE,
      name=name,
      **dense_init(self.torch_init, fan_in),
    )
    if self.hidden is not None:
      x = gelu(dense(self.hidden, "hidden", x.shape[-1])(x))
    return dense(self.embed_dim, "out", x.shape[-1])(x)


class Codebook(nn.Module):
  """K learnable cluster centres in the joint embedding space, returned L2-normalised.

  The raw centres (`centres` `[K, E]`, float32) are free parameters, initialised as random unit
  vectors; every forward pass normalises them (SwAV renormalises its prototypes after each update
  instead; normalising in the forward keeps that out of the optimizer and lets the gradient see
  it).

  Attributes:
    size: K.
    dim: E.
  """

  size: int
  dim: int

  @nn.compact
  def __call__(self) -> jax.Array:
    """`[K, E]` float32 unit rows."""

    def init(rng, shape, dtype=PARAM_DTYPE):
      return l2_normalize(jax.random.normal(rng, shape, dtype))

    return l2_normalize(self.param("centres", init, (self.size, self.dim), PARAM_DTYPE))
