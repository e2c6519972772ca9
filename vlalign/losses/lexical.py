"""Sparsity regularisers of lexical representations (LexVLA; docs/methods.md, "LexVLA").

Both read one modality's lexical vectors `S = outputs["<modality>/lex"]` `[B, V]` (non-negative,
unit rows) over the global batch, with `s_j = mean_i S_ij` the batch's mean weight of word j:

    flops:    sum_j s_j^2                        (Paria et al., ICLR 2020; LexVLA eq. 6)
    overuse:  V * sum_j (s_j / sum_k s_k) * s_j^2      (LexVLA eq. 7)

FLOPs penalises every word's mean activation alike; the overuse penalty weights word j by its
share of the batch's total activation, so its cost grows like `s_j^3` and a word that fires on
everything (a meaningless, frequent token) pays far more than a rare, specific one. Metrics:
`active`, the mean number of entries above `1 / sqrt(V)` per row (LexVLA's inference threshold on
unit vectors: a uniform unit vector has every entry equal to it), and `max_share`, the largest
`s_j / sum_k s_k`.
"""

import jax
import jax.numpy as jnp

from vlalign.errors import ConfigError
from vlalign.losses import LossContext, Metrics, register, require_output

MODALITIES = ("img", "txt")


def _lexical(outputs: dict[str, jax.Array], modality: str, loss: str) -> jax.Array:
  if modality not in MODALITIES:
    raise ConfigError(f"loss {loss!r}: modality must be one of {MODALITIES}, got {modality!r}")
  hint = "use model.name='lexvla' (vlalign/models/lexical.py)"
  return require_output(outputs, f"{modality}/lex", loss, hint).astype(jnp.float32)


def mean_activation(lex: jax.Array) -> jax.Array:
  """lex `[B, V]` -> `[V]`, the batch mean of each word's weight."""
  return jnp.mean(lex, axis=0)


def flops_penalty(lex: jax.Array) -> jax.Array:
  """`sum_j (mean_i lex_ij)^2` of lex `[B, V]`, a `[]` float32."""
  return jnp.sum(jnp.square(mean_activation(lex)))


def overuse_penalty(lex: jax.Array, eps: float = 1e-12) -> jax.Array:
  """`V * sum_j (s_j / sum_k s_k) * s_j^2` with `s = mean_i lex_i` of lex `[B, V]`, `[]`."""
  mean = mean_activation(lex)
  share = mean / jnp.maximum(jnp.sum(mean), eps)
  return lex.shape[-1] * jnp.sum(share * jnp.square(mean))


def active_words(lex: jax.Array) -> jax.Array:
  """Mean number of entries above `1/sqrt(V)` per row of unit rows lex `[B, V]`, `[]` float32."""
  threshold = 1.0 / jnp.sqrt(jnp.float32(lex.shape[-1]))
  return jnp.mean(jnp.sum(lex > threshold, axis=-1).astype(jnp.float32))


def lexical_stats(lex: jax.Array) -> Metrics:
  """`active` (`active_words`) and `max_share` of unit rows lex `[B, V]`."""
  mean = mean_activation(lex)
  return {
    "active": active_words(lex),
    "max_share": jnp.max(mean) / jnp.maximum(jnp.sum(mean), 1e-12),
  }


@register("flops")
def flops(outputs: dict[str, jax.Array], ctx: LossContext, modality: str = "img"):
  """The FLOPs regulariser of `<modality>/lex` (module docstring)."""
  del ctx
  lex = _lexical(outputs, modality, "flops")
  return flops_penalty(lex), lexical_stats(lex)


@register("overuse")
def overuse(outputs: dict[str, jax.Array], ctx: LossContext, modality: str = "img"):
  """LexVLA's overuse penalty of `<modality>/lex` (module docstring)."""
  del ctx
  lex = _lexical(outputs, modality, "overuse")
  return overuse_penalty(lex), lexical_stats(lex)
