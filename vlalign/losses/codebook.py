"""CODIS codebook losses: balanced (Sinkhorn-Knopp) assignments and contrast through codes.

Duan et al., "Multi-modal Alignment using Representation Codebook", CVPR 2022 (no public code);
Sinkhorn-Knopp as in SwAV (Caron et al., NeurIPS 2020, facebookresearch/swav
`main_swav.py: distributed_sinkhorn`). The reconstruction, each equation's source and every free
choice are in docs/methods.md ("CODIS").

Notation: C `[K, E]` the codebook (unit rows, `outputs["codebook"]`), z `[B, E]` unit student
embeddings, `ctx.teacher["img/codes"]` / `["txt/codes"]` `[B, K]` the teachers' balanced
assignments of the batch and `ctx.teacher["queue"]["img/codes"]` / `["txt/codes"]` `[Q, K]` those
of the queue rows (present when the `codis` method assigns the queue too, `sinkhorn_queue`), made
together by `sinkhorn` (rows sum to 1). [batch | queue] has N = B + Q rows.

    P = softmax(z C^T / tau)                                    student assignment probabilities
    H(Q, P) = -1/B sum_i sum_k Q_ik log P_ik                    cross-entropy to target codes
    code_distill = (H(Q^t, P^v) + H(Q^v, P^t)) / 2              cross-modal: the image teacher's
                                                                codes teach the text student
    code_intra   = (H(Q^v, P^v) + H(Q^t, P^t)) / 2              unimodal: teacher of the same
                                                                modality (second view / dropout)
    code_contrast: S^{v->t}_ij = P^v_i . Q^t_j / tau_a over the N columns of [batch | queue];
                   (CE(S^{v->t}, diag) + CE(S^{t->v}, diag)) / 2

Gradients reach the student embeddings and the codebook (through P), never the teachers or the
targets (stop_gradient).
"""

import jax
import jax.numpy as jnp

from vlalign.losses import LossContext, Metrics, register, require, require_output


def sinkhorn(scores: jax.Array, epsilon: float, iterations: int) -> jax.Array:
  """Balanced soft assignments of N samples to K codes (Sinkhorn-Knopp, SwAV), in log space.

  Solves max_Q <Q, scores> + epsilon H(Q) over Q `[N, K]` with every sample's row summing to 1 and
  every code receiving N / K samples in total (the equipartition constraint), approximately, by
  `iterations` rounds of alternate column and row normalisation, as SwAV's
  `distributed_sinkhorn`. Computed in float32 in the log domain (logsumexp), so small epsilon
  (logits of magnitude 1 / epsilon) neither overflows nor underflows. On global arrays, so the
  result does not depend on how N is split over devices.

  Args:
    scores: `[N, K]` similarities of samples to codes (e.g. z C^T), no gradient taken through.
    epsilon: entropy weight (SwAV: 0.05).
    iterations: normalisation rounds (SwAV: 3).

  Returns:
    `[N, K]` float32, rows summing to 1 (exactly after the last row step), columns summing to about
    N / K.
  """
  if epsilon <= 0 or iterations < 1:
    raise ValueError(f"sinkhorn needs epsilon > 0 and iterations >= 1, got {epsilon}, {iterations}")
  log_q = jax.lax.stop_gradient(scores).astype(jnp.float32) / epsilon
  num_samples, num_codes = log_q.shape
  log_q = log_q - jax.nn.logsumexp(log_q)  # Q /= sum(Q)

  def normalise(_, log_q):
    # Each code (column) gets mass 1 / K, then each sample (row) mass 1 / N.
    log_q = log_q - jax.nn.logsumexp(log_q, axis=0, keepdims=True) - jnp.log(num_codes)
    return log_q - jax.nn.logsumexp(log_q, axis=1, keepdims=True) - jnp.log(num_samples)

  log_q = jax.lax.fori_loop(0, iterations, normalise, log_q)
  return jnp.exp(log_q + jnp.log(num_samples))


def code_log_probs(emb: jax.Array, codebook: jax.Array, temperature: float) -> jax.Array:
  """`[B, K]` log softmax(z C^T / tau), float32."""
  logits = emb.astype(jnp.float32) @ codebook.astype(jnp.float32).T / temperature
  return jax.nn.log_softmax(logits, axis=-1)


def code_cross_entropy(targets: jax.Array, log_probs: jax.Array) -> jax.Array:
  """H(Q, P) = -mean_i sum_k Q_ik log P_ik; `targets` `[B, K]` without gradient."""
  return -jnp.mean(jnp.sum(jax.lax.stop_gradient(targets) * log_probs, axis=-1))


def _student_log_probs(outputs, loss: str, temperature: float) -> tuple[jax.Array, jax.Array]:
  hint = "set model.codebook_size (method 'codis')"
  codebook = require_output(outputs, "codebook", loss, hint)
  return (
    code_log_probs(outputs["img/emb"], codebook, temperature),
    code_log_probs(outputs["txt/emb"], codebook, temperature),
  )


def _teacher_codes(ctx: LossContext, loss: str) -> tuple[jax.Array, jax.Array]:
  """The teachers' codes of the batch rows, `[B, K]` each (image, text)."""
  require(ctx, loss, teacher=("img/codes", "txt/codes"))
  return ctx.teacher["img/codes"], ctx.teacher["txt/codes"]


def _codes_with_queue(ctx: LossContext, modality: str) -> jax.Array:
  """`[N, K]`: the batch's codes of `modality`, then the queue's when the method assigned it."""
  codes = ctx.teacher[f"{modality}/codes"]
  queue = (ctx.teacher.get("queue") or {}).get(f"{modality}/codes")
  return codes if queue is None else jnp.concatenate([codes, queue])


def _assignment_stats(log_probs: jax.Array) -> Metrics:
  """Mean entropy (nats) of the rows of P and the perplexity of their mean (codes in use)."""
  probs = jnp.exp(log_probs)
  entropy = -jnp.mean(jnp.sum(probs * log_probs, axis=-1))
  mean = jnp.mean(probs, axis=0)
  perplexity = jnp.exp(-jnp.sum(mean * jnp.log(jnp.maximum(mean, 1e-12))))
  return {"entropy": entropy, "perplexity": perplexity}


@register("code_distill")
def code_distill(
  outputs: dict[str, jax.Array], ctx: LossContext, temperature: float = 0.1
) -> tuple[jax.Array, Metrics]:
  """Cross-modal code distillation: (H(Q^t, P^v) + H(Q^v, P^t)) / 2.

  Reads `outputs["img/emb"]`, `["txt/emb"]` `[B, E]`, `outputs["codebook"]` `[K, E]` and the
  teachers' codes `ctx.teacher["img/codes"]`, `["txt/codes"]`.

  Returns:
    `(loss, {"i2t", "t2i", "entropy", "perplexity"})`: `i2t` is the image student against the text
    teacher's codes; entropy / perplexity of the image and text students' assignments together.
  """
  log_p_img, log_p_txt = _student_log_probs(outputs, "code_distill", temperature)
  q_img, q_txt = _teacher_codes(ctx, "code_distill")
  i2t = code_cross_entropy(q_txt, log_p_img)
  t2i = code_cross_entropy(q_img, log_p_txt)
  stats = _assignment_stats(jnp.concatenate([log_p_img, log_p_txt]))
  return 0.5 * (i2t + t2i), {"i2t": i2t, "t2i": t2i, **stats}


@register("code_intra")
def code_intra(
  outputs: dict[str, jax.Array], ctx: LossContext, temperature: float = 0.1
) -> tuple[jax.Array, Metrics]:
  """Unimodal code prediction: (H(Q^v, P^v) + H(Q^t, P^t)) / 2, each student against the teacher
  of its own modality (which saw the second image view / its own text dropout).

  Returns:
    `(loss, {"i2i", "t2t"})`.
  """
  log_p_img, log_p_txt = _student_log_probs(outputs, "code_intra", temperature)
  q_img, q_txt = _teacher_codes(ctx, "code_intra")
  i2i = code_cross_entropy(q_img, log_p_img)
  t2t = code_cross_entropy(q_txt, log_p_txt)
  return 0.5 * (i2i + t2t), {"i2i": i2i, "t2t": t2t}


def _assignment_contrast(probs: jax.Array, targets: jax.Array, temperature: float) -> jax.Array:
  """mean_i CE(p_i . [targets] / tau, e_i): probs `[B, K]`, targets `[N, K]` (first B: batch)."""
  logits = probs @ jax.lax.stop_gradient(targets).T / temperature
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.diagonal(log_probs[:, : probs.shape[0]]))


@register("code_contrast")
def code_contrast(
  outputs: dict[str, jax.Array],
  ctx: LossContext,
  temperature: float = 0.1,
  contrast_temperature: float = 0.05,
) -> tuple[jax.Array, Metrics]:
  """Instance contrast through assignments: the image student's P^v_i against the text teacher's
  codes of [batch | queue] (positive: its own caption), and the text student's against the image
  teacher's; the columns are the batch's codes followed by the queue's (`ctx.teacher["queue"]`).

  Args:
    temperature: tau of the student assignment softmax.
    contrast_temperature: tau_a dividing the assignment dot products.

  Returns:
    `(loss, {"i2t", "t2i", "acc_i2t"})`, `acc_i2t`: how often an image's own caption has its
    highest score among the columns.
  """
  log_p_img, log_p_txt = _student_log_probs(outputs, "code_contrast", temperature)
  require(ctx, "code_contrast", teacher=("img/codes", "txt/codes"))
  q_img, q_txt = _codes_with_queue(ctx, "img"), _codes_with_queue(ctx, "txt")
  p_img, p_txt = jnp.exp(log_p_img), jnp.exp(log_p_txt)
  i2t = _assignment_contrast(p_img, q_txt, contrast_temperature)
  t2i = _assignment_contrast(p_txt, q_img, contrast_temperature)
  scores = p_img @ jax.lax.stop_gradient(q_txt).T
  accuracy = jnp.mean(jnp.argmax(scores, axis=-1) == jnp.arange(p_img.shape[0]))
  return 0.5 * (i2t + t2i), {"i2t": i2t, "t2i": t2i, "acc_i2t": accuracy}
