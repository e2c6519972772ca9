"""ALBEF momentum distillation losses: soft targets and `cma` (against the feature queues).

The EMA teacher, the alpha ramp and the queues themselves are state of the momentum-distillation
method (`vlalign/methods/momentum.py`); the losses read them from the `LossContext`:
`ctx.teacher` (teacher outputs), `ctx.extras["queue/img"]`, `ctx.extras["queue/txt"]` (and
`"queue/image_id"`), `ctx.schedules["alpha"]`.

Reference: salesforce/ALBEF and its TCL fork uta-smile/TCL, `models/model_pretrain.py` (class
`ALBEF`), `Pretrain.py` (`train`) and `configs/Pretrain.yaml` (temp 0.07, queue_size 65536,
momentum 0.995, alpha 0.4).

Equations (s = student, t = momentum teacher, tau = temperature, Q = queue):

* Soft targets (`ALBEF.forward`): y = alpha * softmax(sim_t) + (1 - alpha) * y_hard.
* CMA / ALBEF ITA (`ALBEF.forward`, `loss_i2t` and `loss_t2i`), with
  T_all = [t_txt | Q_txt] and I_all = [t_img | Q_img] (`[B + K, E]`):
    i2t = mean_i CE(s_img_i . T_all / tau, alpha * softmax(t_img_i . T_all / tau) + (1 - alpha) e_i)
    t2i = mean_i CE(s_txt_i . I_all / tau, alpha * softmax(t_txt_i . I_all / tau) + (1 - alpha) e_i)
    cma = (i2t + t2i) / 2.
  This is exactly ALBEF's own `loss_ita`, so ALBEF configs use `cma` for it (no separate `ita`).

Temperature. ALBEF / TCL store tau itself as a parameter (`self.temp`, init 0.07) and clamp it in
place, `self.temp.clamp_(0.001, 0.5)` under `no_grad`, at the start of every forward; the loss then
divides by the clamped tau, which receives the plain gradient (also at a bound), and timm's AdamW
applies its decoupled weight decay to it (a 0-d parameter). Every ALBEF / TCL loss reads tau through
`temperature(outputs)`, which serves the model's two modes (`model.temperature`,
`vlalign/models/model.py`):

* "logit_scale" (default): the model learns `logit_scale = log(1 / tau)` and the loss uses
  `tau = clip(exp(-logit_scale), 0.001, 0.5)` (`clamped_temperature`). The forward values equal the
  reference's for the same tau, but the training does not: Adam's update of a parameter is about
  lr * sign(gradient) whatever its scale, so a step changes log(1 / tau) by about lr, that is tau by
  about lr * tau (0.07 lr at init), where the reference changes tau by about lr (plus the weight
  decay lr * wd * tau, which the default decay rule does not apply to `logit_scale`). Outside the
  clamp range the gradient is also zero here, and the raw parameter is not projected back unless
  `optim.clamp=(("logit_scale", ln 2, ln 1000),)` asks for it.
* "tau": the model learns `temp` = tau itself and outputs `temperature`, its value clamped to
  `model.temperature_range` ([0.001, 0.5]; None: unclamped, as the reference's retrieval model,
  which never clamps) with a straight-through gradient; with `optim.clamp=(("temp", 0.001, 0.5),)`
  and "temp" in `optim.decay` (`vlalign/optim.py`) this is the reference's parametrisation, clamp
  and optimiser step.

The teacher similarities use the same (student) tau without gradient, as in the reference, where
`temp` is not one of the EMA-tracked parameters.

Decisions where the reference is silent or does not apply:

* Teacher outputs and queues are wrapped in `stop_gradient` (the reference builds them under
  `torch.no_grad`).
* `cma(..., match_image_id=True)` uses the retrieval fine-tuning targets of
  `models/model_retrieval.py` (positives = every column with the same `image_id`, normalised; needs
  `ctx.extras["queue/image_id"]` `[K]`); the default is the pre-training one-hot diagonal.
"""

import jax
import jax.numpy as jnp

from vlalign.losses import LossContext, Metrics, register, require

TEMPERATURE_MIN = 0.001
TEMPERATURE_MAX = 0.5


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


def temperature(outputs: dict[str, jax.Array]) -> jax.Array:
  """The temperature tau `[]` float32 of the ALBEF / TCL losses: `outputs["temperature"]` when
  the model learns tau itself (`model.temperature="tau"`; clamped by the model to its
  `temperature_range`), else `clamped_temperature(outputs["logit_scale"])` (see the module
  docstring)."""
  if "temperature" in outputs:
    return jnp.asarray(outputs["temperature"], jnp.float32)
  return clamped_temperature(outputs["logit_scale"])


def teacher_array(ctx: LossContext, key: str) -> jax.Array:
  """`ctx.teacher[key]` as float32 without gradient."""
  return jax.lax.stop_gradient(jnp.asarray(ctx.teacher[key], jnp.float32))


def with_queue(ctx: LossContext, key: str, queue_key: str) -> jax.Array:
  """`[B + K, E]`: the teacher's batch features `ctx.teacher[key]` followed by the queue
  `ctx.extras[queue_key]`, without gradient."""
  queue = jax.lax.stop_gradient(jnp.asarray(ctx.extras[queue_key], jnp.float32))
  return jnp.concatenate([teacher_array(ctx, key), queue], axis=0)


def positives_for(ctx: LossContext, num_columns: int, match_image_id: bool, loss: str):
  """`[B, B + K]` hard targets of a loss against [teacher batch | queue] columns: the diagonal,
  or with `match_image_id` every column of the same image (needs `ctx.extras["queue/image_id"]`)."""
  batch_size = ctx.teacher["img/emb"].shape[0]
  if not match_image_id:
    return hard_positives(batch_size, num_columns)
  require(ctx, f"{loss}(match_image_id=True)", extras=("queue/image_id",))
  return hard_positives(
    batch_size, num_columns, ctx.batch["image_id"], ctx.extras["queue/image_id"]
  )


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
  outputs: dict[str, jax.Array], ctx: LossContext, match_image_id: bool = False
) -> dict[str, jax.Array]:
  """The two CMA terms `{"i2t", "t2i", "temperature"}`, each `[]` (see `cma`)."""
  require(
    ctx,
    "cma",
    teacher=("img/emb", "txt/emb"),
    extras=("queue/img", "queue/txt"),
    schedules=("alpha",),
  )
  tau = temperature(outputs)
  alpha = jax.lax.stop_gradient(jnp.asarray(ctx.schedules["alpha"], jnp.float32))
  img_all = with_queue(ctx, "img/emb", "queue/img")
  txt_all = with_queue(ctx, "txt/emb", "queue/txt")
  positives = positives_for(ctx, img_all.shape[0], match_image_id, "cma")
  t_img, t_txt = teacher_array(ctx, "img/emb"), teacher_array(ctx, "txt/emb")
  i2t = distilled_contrast(outputs["img/emb"], t_img, txt_all, positives, tau, alpha)
  t2i = distilled_contrast(outputs["txt/emb"], t_txt, img_all, positives, tau, alpha)
  return {"i2t": i2t, "t2i": t2i, "temperature": tau}


@register("cma")
def cma(
  outputs: dict[str, jax.Array], ctx: LossContext, match_image_id: bool = False
) -> tuple[jax.Array, Metrics]:
  """Cross-modal alignment with queues and momentum distillation (= ALBEF `loss_ita`).

  Reads `outputs["img/emb"]`, `outputs["txt/emb"]` `[B, E]`, `outputs["temperature"]` or
  `outputs["logit_scale"]` `[]` (`temperature`),
  `ctx.teacher["img/emb"]`, `ctx.teacher["txt/emb"]` `[B, E]`, `ctx.extras["queue/img"]`,
  `ctx.extras["queue/txt"]` `[K, E]`, `ctx.schedules["alpha"]` `[]`.

  Returns:
    `((i2t + t2i) / 2, {"i2t", "t2i", "temperature"})`.
  """
  terms = cma_terms(outputs, ctx, match_image_id)
  return 0.5 * (terms["i2t"] + terms["t2i"]), terms
