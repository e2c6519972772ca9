"""Two-tower contrastive losses: CLIP's symmetric InfoNCE and SigLIP's pairwise sigmoid loss.

Both read the L2-normalised embeddings `img/emb`, `txt/emb` `[B, E]` of the *global* batch and
the learnable log inverse temperature `logit_scale` (and `logit_bias` for SigLIP) from the model
outputs.
Equations and sources are in docs/methods.md.
"""

import math

import jax
import jax.numpy as jnp

from vlalign.errors import ConfigError
from vlalign.losses import LossContext, Metrics, register

CLIP_MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the learned scale at 100.


def in_batch_accuracy(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Top-1 retrieval accuracy within the batch, image->text and text->image.

  Args:
    logits: `[B, B]` similarities, row i = image i, column j = text j; pair (i, i) is positive.
  """
  labels = jnp.arange(logits.shape[0])
  i2t = jnp.mean(jnp.argmax(logits, axis=1) == labels)
  t2i = jnp.mean(jnp.argmax(logits, axis=0) == labels)
  return i2t, t2i


def similarity(outputs: dict[str, jax.Array]) -> jax.Array:
  """`[B, B]` cosine similarities of the image and text embeddings, in float32."""
  img = outputs["img/emb"].astype(jnp.float32)
  txt = outputs["txt/emb"].astype(jnp.float32)
  return img @ txt.T


@register("itc")
def itc(
  outputs: dict[str, jax.Array], ctx: LossContext, max_logit_scale: float = CLIP_MAX_LOGIT_SCALE
) -> tuple[jax.Array, Metrics]:
  """Symmetric InfoNCE (CLIP): mean of image->text and text->image cross-entropies.

  logits = exp(min(logit_scale, max_logit_scale)) * img_emb @ txt_emb.T, targets the diagonal.
  """
  del ctx
  scale = jnp.exp(jnp.minimum(outputs["logit_scale"], max_logit_scale))
  logits = scale * similarity(outputs)
  labels = jnp.arange(logits.shape[0])
  log_p_i2t = jax.nn.log_softmax(logits, axis=1)
  log_p_t2i = jax.nn.log_softmax(logits, axis=0)
  i2t = -jnp.mean(log_p_i2t[labels, labels])
  t2i = -jnp.mean(log_p_t2i[labels, labels])
  acc_i2t, acc_t2i = in_batch_accuracy(logits)
  metrics = {
    "i2t": i2t,
    "t2i": t2i,
    "temperature": 1.0 / scale,
    "acc_i2t": acc_i2t,
    "acc_t2i": acc_t2i,
  }
  return 0.5 * (i2t + t2i), metrics


@register("siglip")
def siglip(outputs: dict[str, jax.Array], ctx: LossContext) -> tuple[jax.Array, Metrics]:
  """Pairwise sigmoid loss (SigLIP).

  logits = exp(logit_scale) * img_emb @ txt_emb.T + logit_bias, z_ij = +1 if i == j else -1,
  loss = -1/B * sum_ij log sigmoid(z_ij * logits_ij).
  """
  del ctx
  if "logit_bias" not in outputs:
    raise ConfigError("siglip needs a learnable bias: set model.logit_bias_init (e.g. -10.0)")
  scale = jnp.exp(outputs["logit_scale"])
  logits = scale * similarity(outputs) + outputs["logit_bias"]
  signs = 2.0 * jnp.eye(logits.shape[0]) - 1.0
  loss = -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / logits.shape[0]
  acc_i2t, acc_t2i = in_batch_accuracy(logits)
  metrics = {
    "temperature": 1.0 / scale,
    "bias": outputs["logit_bias"],
    "acc_i2t": acc_i2t,
    "acc_t2i": acc_t2i,
  }
  return loss, metrics
