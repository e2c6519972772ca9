"""Two-tower contrastive losses: CLIP's symmetric InfoNCE and SigLIP's pairwise sigmoid loss.

Both read the L2-normalised embeddings `img/emb`, `txt/emb` `[B, E]` of the *global* batch and
the learnable log inverse temperature `logit_scale` (and `logit_bias` for SigLIP) from the model
outputs.
Equations and sources are in docs/methods.md.

`chunked=True` computes the same values, gradients and metrics blockwise
(`vlalign/losses/chunked.py`): the text embeddings travel around a ring of the D devices of the
current mesh's batch axes, so no device holds more than `[B/D, chunk_size]` logits instead of the
`[B/D, B]` rows of the dense form. The default (`chunked=False`) is the dense computation.
"""

import math

import jax
import jax.numpy as jnp

from vlalign.errors import ConfigError
from vlalign.losses import LossContext, Metrics, register
from vlalign.losses import chunked as ring

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
  outputs: dict[str, jax.Array],
  ctx: LossContext,
  max_logit_scale: float = CLIP_MAX_LOGIT_SCALE,
  chunked: bool = False,
  chunk_size: int = ring.DEFAULT_CHUNK_SIZE,
) -> tuple[jax.Array, Metrics]:
  """Symmetric InfoNCE (CLIP): mean of image->text and text->image cross-entropies.

  logits = exp(min(logit_scale, max_logit_scale)) * img_emb @ txt_emb.T, targets the diagonal.

  Args:
    outputs: `img/emb`, `txt/emb` `[B, E]` and `logit_scale` `[]`.
    ctx: unused.
    max_logit_scale: the clamp of `logit_scale`.
    chunked: compute blockwise on a ring of the mesh's batch devices (module docstring): memory
      `[B/D, chunk_size]` per device instead of `[B/D, B]`; same values and gradients.
    chunk_size: with `chunked`, the most texts per block.
  """
  del ctx
  scale = jnp.exp(jnp.minimum(outputs["logit_scale"], max_logit_scale))
  if chunked:
    i2t, t2i, acc_i2t, acc_t2i = ring.infonce(
      outputs["img/emb"], outputs["txt/emb"], scale, chunk_size
    )
    return 0.5 * (i2t + t2i), _itc_metrics(i2t, t2i, scale, acc_i2t, acc_t2i)
  logits = scale * similarity(outputs)
  labels = jnp.arange(logits.shape[0])
  log_p_i2t = jax.nn.log_softmax(logits, axis=1)
  log_p_t2i = jax.nn.log_softmax(logits, axis=0)
  i2t = -jnp.mean(log_p_i2t[labels, labels])
  t2i = -jnp.mean(log_p_t2i[labels, labels])
  acc_i2t, acc_t2i = in_batch_accuracy(logits)
  return 0.5 * (i2t + t2i), _itc_metrics(i2t, t2i, scale, acc_i2t, acc_t2i)


def _itc_metrics(i2t, t2i, scale, acc_i2t, acc_t2i) -> Metrics:
  return {
    "i2t": i2t,
    "t2i": t2i,
    "temperature": 1.0 / scale,
    "acc_i2t": acc_i2t,
    "acc_t2i": acc_t2i,
  }


@register("siglip")
def siglip(
  outputs: dict[str, jax.Array],
  ctx: LossContext,
  chunked: bool = False,
  chunk_size: int = ring.DEFAULT_CHUNK_SIZE,
) -> tuple[jax.Array, Metrics]:
  """Pairwise sigmoid loss (SigLIP).

  logits = exp(logit_scale) * img_emb @ txt_emb.T + logit_bias, z_ij = +1 if i == j else -1,
  loss = -1/B * sum_ij log sigmoid(z_ij * logits_ij).

  Args:
    outputs: `img/emb`, `txt/emb` `[B, E]`, `logit_scale` and `logit_bias` `[]`.
    ctx: unused.
    chunked: compute blockwise on a ring of the mesh's batch devices (module docstring): memory
      `[B/D, chunk_size]` per device instead of `[B/D, B]`; same values and gradients.
    chunk_size: with `chunked`, the most texts per block.
  """
  del ctx
  if "logit_bias" not in outputs:
    raise ConfigError("siglip needs a learnable bias: set model.logit_bias_init (e.g. -10.0)")
  scale = jnp.exp(outputs["logit_scale"])
  if chunked:
    img, txt, bias = outputs["img/emb"], outputs["txt/emb"], outputs["logit_bias"]
    loss, acc_i2t, acc_t2i = ring.sigmoid(img, txt, scale, bias, chunk_size)
    return loss, _siglip_metrics(scale, bias, acc_i2t, acc_t2i)
  logits = scale * similarity(outputs) + outputs["logit_bias"]
  signs = 2.0 * jnp.eye(logits.shape[0]) - 1.0
  loss = -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / logits.shape[0]
  acc_i2t, acc_t2i = in_batch_accuracy(logits)
  return loss, _siglip_metrics(scale, outputs["logit_bias"], acc_i2t, acc_t2i)


def _siglip_metrics(scale, bias, acc_i2t, acc_t2i) -> Metrics:
  return {"temperature": 1.0 / scale, "bias": bias, "acc_i2t": acc_i2t, "acc_t2i": acc_t2i}
