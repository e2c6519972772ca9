"""ALBEF momentum distillation: EMA teacher, alpha ramp, feature queues, soft targets, and `cma`.

Reference: salesforce/ALBEF and its TCL fork uta-smile/TCL, `models/model_pretrain.py` (class
`ALBEF`), `Pretrain.py` (`train`) and `configs/Pretrain.yaml` (temp 0.07, queue_size 65536,
momentum 0.995, alpha 0.4).

Equations (s = student, t = momentum teacher, tau = temperature, Q = queue):

* EMA (`ALBEF._momentum_update`): theta_t <- m * theta_t + (1 - m) * theta_s.
* Alpha ramp (`Pretrain.py: train`): alpha = alpha_max * min(1, i / iters_per_epoch) in epoch 0 and
  alpha_max afterwards; with a global 0-based step counter that is
  alpha_max * min(1, step / steps_per_epoch) for every step.
* Queue (`ALBEF._dequeue_and_enqueue`): the all-gathered (global) teacher features of the batch
  overwrite rows [ptr, ptr + B) and ptr <- (ptr + B) mod K; the reference asserts K % B == 0.
* Soft targets (`ALBEF.forward`): y = alpha * softmax(sim_t) + (1 - alpha) * y_hard.
* CMA / ALBEF ITA (`ALBEF.forward`, `loss_i2t` and `loss_t2i`), with
  T_all = [t_txt | Q_txt] and I_all = [t_img | Q_img] (`[B + K, E]`):
    i2t = mean_i CE(s_img_i . T_all / tau, alpha * softmax(t_img_i . T_all / tau) + (1 - alpha) e_i)
    t2i = mean_i CE(s_txt_i . I_all / tau, alpha * softmax(t_txt_i . I_all / tau) + (1 - alpha) e_i)
    cma = (i2t + t2i) / 2.
  This is exactly ALBEF's own `loss_ita`, so ALBEF configs use `cma` for it (no separate `ita`).

Temperature mapping. TCL stores tau itself as a parameter (init 0.07) and clamps it in place,
`self.temp.clamp_(0.001, 0.5)` under `no_grad`, at the start of every forward; the loss then divides
by the clamped tau, which also receives the gradient. We store `logit_scale = log(1 / tau)` and use
`tau = clip(exp(-logit_scale), 0.001, 0.5)` in the forward pass. The loss values are identical; the
gradient differs only while the raw parameter lies outside the range (then ours is zero, TCL's is
the gradient at the bound). The step may project `logit_scale` into [log 2, log 1000] after each
update to reproduce TCL exactly. The teacher similarities use the same (student) tau without
gradient, as in the reference, where `temp` is not one of the EMA-tracked parameters.

Decisions where the reference is silent or does not apply:

* Teacher outputs and queues are wrapped in `stop_gradient` (the reference builds them under
  `torch.no_grad`).
* `ema_update` is meant to run after the optimizer update of each step. The reference runs it at
  the start of the next forward with the same student parameters, so each step sees the same
  teacher (the reference's update in step 0 is a no-op: the teacher starts as a student copy).
* `enqueue` reduces `ptr` modulo K before writing, so a pointer past the end wraps.
* `cma(..., match_image_id=True)` uses the retrieval fine-tuning targets of
  `models/model_retrieval.py` (positives = every column with the same `image_id`, normalised; needs
  `teacher["queue/image_id"]` `[K]`); the default is the pre-training one-hot diagonal.
"""

from typing import Any

import jax
import jax.numpy as jnp

from vlalign.losses import Metrics, register

TEMPERATURE_MIN = 0.001
TEMPERATURE_MAX = 0.5


def ema_update(teacher_params: Any, student_params: Any, momentum: float | jax.Array) -> Any:
  """theta_t <- momentum * theta_t + (1 - momentum) * theta_s, leaf by leaf (teacher dtypes)."""

  def blend(t, s):
    return (momentum * t + (1.0 - momentum) * s).astype(t.dtype)

  return jax.tree.map(blend, teacher_params, jax.lax.stop_gradient(student_params))


def alpha_at(step: int | jax.Array, steps_per_epoch: int, alpha_max: float = 0.4) -> jax.Array:
  """Distillation weight: linear ramp 0 -> alpha_max over the first epoch, then constant.

  Args:
    step: 0-based index of the current update (`TrainState.step` before it is incremented).
    steps_per_epoch: updates per epoch (`len(data_loader)` in the reference).
    alpha_max: `alpha` of `configs/Pretrain.yaml` (0.4).

  Returns:
    `[]` float32.
  """
  if steps_per_epoch <= 0:
    raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
  progress = jnp.asarray(step, jnp.float32) / float(steps_per_epoch)
  return alpha_max * jnp.minimum(1.0, progress)


def enqueue(queue: jax.Array, ptr: jax.Array, feats: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Ring-buffer write of a batch of teacher features.

  Args:
    queue: `[K, E]` features of past batches.
    ptr: `[]` int32 index of the oldest slot.
    feats: `[B, E]` features of the whole (global) batch; K must be a multiple of B.

  Returns:
    `(queue [K, E], ptr [])`: rows [ptr, ptr + B) replaced by `feats`, ptr advanced by B mod K.
  """
  size, batch = queue.shape[0], feats.shape[0]
  if batch == 0 or size % batch:
    raise ValueError(
      f"queue size {size} must be a positive multiple of the global batch size {batch} "
      "(the reference asserts queue_size % batch_size == 0)"
    )
  if queue.shape[1:] != feats.shape[1:]:
    raise ValueError(f"queue rows {queue.shape[1:]} and features {feats.shape[1:]} differ")
  ptr = jnp.asarray(ptr, jnp.int32) % size
  feats = jax.lax.stop_gradient(feats).astype(queue.dtype)
  queue = jax.lax.dynamic_update_slice_in_dim(queue, feats, ptr, axis=0)
  return queue, (ptr + batch) % size


def soft_targets(
  sim_teacher: jax.Array, positives: jax.Array, alpha: float | jax.Array
) -> jax.Array:
  """alpha * softmax(sim_teacher) + (1 - alpha) * positives.

  Args:
    sim_teacher: `[B, M]` teacher logits (already divided by the temperature).
    positives: `[B, M]` hard targets, one-hot or multi-hot with rows summing to 1.
    alpha: `[]` distillation weight in [0, 1].

  Returns:
    `[B, M]` float32 rows summing to 1, without gradient.
  """
  probs = jax.nn.softmax(sim_teacher.astype(jnp.float32), axis=-1)
  targets = alpha * probs + (1.0 - alpha) * positives.astype(jnp.float32)
  return jax.lax.stop_gradient(targets)


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """-sum_j targets_ij * log_softmax(logits)_ij.

  Args:
    logits: `[B, M]`.
    targets: `[B, M]` distributions.

  Returns:
    `[B]` float32 per-row losses.
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(targets.astype(jnp.float32) * log_probs, axis=-1)


def clamped_temperature(logit_scale: jax.Array) -> jax.Array:
  """tau = clip(exp(-logit_scale), 0.001, 0.5): TCL's clamped `temp` (see the module docstring)."""
  tau = jnp.exp(-jnp.asarray(logit_scale, jnp.float32))
  return jnp.clip(tau, TEMPERATURE_MIN, TEMPERATURE_MAX)


def require_teacher(teacher: dict[str, Any] | None, keys: tuple[str, ...], loss: str) -> None:
  """Raises a clear error when a momentum loss runs without the teacher entries it reads."""
  missing = [k for k in keys if teacher is None or k not in teacher]
  if missing:
    raise ValueError(f"loss {loss!r} needs teacher entries {missing} (a momentum teacher + queues)")


def teacher_array(teacher: dict[str, Any], key: str) -> jax.Array:
  """`teacher[key]` as float32 without gradient."""
  return jax.lax.stop_gradient(jnp.asarray(teacher[key], jnp.float32))


def with_queue(teacher: dict[str, Any], key: str, queue_key: str) -> jax.Array:
  """`[B + K, E]`: the teacher's batch features followed by the queue, without gradient."""
  return jnp.concatenate([teacher_array(teacher, key), teacher_array(teacher, queue_key)], axis=0)


def hard_positives(
  batch_size: int,
  num_columns: int,
  image_id: jax.Array | None = None,
  queue_image_id: jax.Array | None = None,
) -> jax.Array:
  """`[B, B + K]` normalised hard targets over [batch | queue] columns.

  Without ids: the one-hot diagonal (pre-training, `ALBEF.forward`). With ids: every column whose
  image id equals the row's, divided by their count (`models/model_retrieval.py`).
  """
  if image_id is None:
    return jnp.eye(batch_size, num_columns, dtype=jnp.float32)
  column_ids = (
    jnp.concatenate([image_id, queue_image_id]) if queue_image_id is not None else image_id
  )
  if column_ids.shape[0] != num_columns:
    raise ValueError(f"{column_ids.shape[0]} column ids for {num_columns} columns")
  same = (image_id[:, None] == column_ids[None, :]).astype(jnp.float32)
  return same / jnp.sum(same, axis=1, keepdims=True)


def distilled_contrast(
  student: jax.Array,
  teacher_query: jax.Array,
  keys: jax.Array,
  positives: jax.Array,
  tau: jax.Array,
  alpha: jax.Array,
) -> jax.Array:
  """mean_i CE(student_i . keys / tau, soft_targets(teacher_query_i . keys / tau, positives_i)).

  Args:
    student: `[B, E]` student queries (with gradient).
    teacher_query: `[B, E]` teacher queries that make the soft targets.
    keys: `[M, E]` teacher batch features followed by the queue.
    positives: `[B, M]` hard targets.
    tau: `[]` temperature (the student's; used without gradient for the targets).
    alpha: `[]` distillation weight; 0 gives plain InfoNCE against the hard targets.

  Returns:
    `[]` float32.
  """
  logits = student.astype(jnp.float32) @ keys.T / tau
  sim_teacher = teacher_query @ keys.T / jax.lax.stop_gradient(tau)
  return jnp.mean(soft_cross_entropy(logits, soft_targets(sim_teacher, positives, alpha)))


def cma_terms(
  outputs: dict[str, jax.Array],
  teacher: dict[str, Any],
  batch: dict[str, jax.Array],
  match_image_id: bool = False,
) -> dict[str, jax.Array]:
  """The two CMA terms `{"i2t", "t2i", "temperature"}`, each `[]` (see `cma`)."""
  require_teacher(teacher, ("img/emb", "txt/emb", "queue/img", "queue/txt", "alpha"), "cma")
  tau = clamped_temperature(outputs["logit_scale"])
  alpha = jax.lax.stop_gradient(jnp.asarray(teacher["alpha"], jnp.float32))
  img_all = with_queue(teacher, "img/emb", "queue/img")
  txt_all = with_queue(teacher, "txt/emb", "queue/txt")
  batch_size = outputs["img/emb"].shape[0]
  if match_image_id:
    require_teacher(teacher, ("queue/image_id",), "cma(match_image_id=True)")
    positives = hard_positives(
      batch_size, img_all.shape[0], batch["image_id"], teacher["queue/image_id"]
    )
  else:
    positives = hard_positives(batch_size, img_all.shape[0])
  t_img, t_txt = teacher_array(teacher, "img/emb"), teacher_array(teacher, "txt/emb")
  i2t = distilled_contrast(outputs["img/emb"], t_img, txt_all, positives, tau, alpha)
  t2i = distilled_contrast(outputs["txt/emb"], t_txt, img_all, positives, tau, alpha)
  return {"i2t": i2t, "t2i": t2i, "temperature": tau}


@register("cma")
def cma(
  outputs: dict[str, jax.Array],
  teacher: dict[str, Any] | None,
  batch: dict[str, jax.Array],
  match_image_id: bool = False,
) -> tuple[jax.Array, Metrics]:
  """Cross-modal alignment with queues and momentum distillation (= ALBEF `loss_ita`).

  Reads `outputs["img/emb"]`, `outputs["txt/emb"]` `[B, E]`, `outputs["logit_scale"]` `[]`,
  `teacher["img/emb"]`, `teacher["txt/emb"]` `[B, E]`, `teacher["queue/img"]`,
  `teacher["queue/txt"]` `[K, E]`, `teacher["alpha"]` `[]`.

  Returns:
    `((i2t + t2i) / 2, {"i2t", "t2i", "temperature"})`.
  """
  terms = cma_terms(outputs, teacher, batch, match_image_id)
  return 0.5 * (terms["i2t"] + terms["t2i"]), terms
