"""The pure train step: (teacher forward), student forward, weighted sum of registered losses,
optax update, (EMA teacher and queue update).

Two-tower methods (CLIP, SigLIP) use the plain path. Methods with `config.teacher` (ALBEF, TCL, and
later CODIS) get the ALBEF machinery, reusable by any model that follows the output contract of
docs/architecture.md:

1. the teacher ("momentum") parameters move by the EMA rule towards the current student *before* the
   teacher's forward pass, and never receive gradients;
2. the teacher sees `batch[teacher.image_key]` (TCL: the second augmented view) with its own dropout
   rng; its outputs, the feature queues and the distillation weight alpha form the `teacher` dict
   every loss receives;
3. with `config.mlm`, text ids are masked (BERT 80/10/10) with the step's rng; student and teacher
   both see the masked ids as `batch["mlm_ids"]`;
4. the student sees the teacher's embeddings of the batch as `batch["teacher/img/emb"]` and
   `batch["teacher/txt/emb"]` (ITM hard negatives are sampled from them);
5. after the update, the global batch of teacher features is written into the queues (with
   `teacher.queue_image_id`, the batch's image ids into `queue/image_id` too: retrieval
   fine-tuning's `idx_queue`).
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vlalign import losses as losses_lib
from vlalign.losses import matching, momentum
from vlalign.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
QUEUED = {"queue/img": "img/emb", "queue/txt": "txt/emb"}
# With `teacher.queue_image_id` (retrieval fine-tuning): the image ids of the queued rows, so that
# losses with `match_image_id=True` treat queued captions of the same image as positives.
IMAGE_ID_QUEUE = "queue/image_id"
QUEUE_FILL_ID = -1  # never an image id: empty slots match nothing


def sum_losses(
  entries: list[tuple[str, Callable[..., Any], float, dict[str, Any]]],
  outputs: dict[str, jax.Array],
  teacher: dict[str, Any] | None,
  batch: Batch,
) -> tuple[jax.Array, Metrics]:
  """`sum_i weight_i * loss_i`; metrics `<name>` (unweighted value) and `<name>/<key>`."""
  total = jnp.zeros((), jnp.float32)
  metrics = {}
  for name, fn, weight, kwargs in entries:
    value, loss_metrics = fn(outputs, teacher, batch, **kwargs)
    total = total + weight * value
    metrics[name] = value
    metrics.update({f"{name}/{k}": v for k, v in loss_metrics.items()})
  metrics["loss"] = total
  return total, metrics


def add_mlm_inputs(batch: Batch, rng: jax.Array, mlm_config: Any, vocab_size: int) -> Batch:
  """Adds `mlm_ids` / `mlm_labels` `[B, L]` (BERT masking of `text_ids`) to the batch."""
  ids, labels = matching.mask_tokens(
    batch["text_ids"],
    batch["text_mask"],
    rng,
    vocab_size=vocab_size,
    mask_id=int(mlm_config.mask_id),
    special_ids=tuple(mlm_config.special_ids),
    prob=float(mlm_config.get("prob", 0.15)),
  )
  return {**batch, "mlm_ids": ids, "mlm_labels": labels}


def teacher_forward(
  model: nn.Module, teacher_params: Any, batch: Batch, rng: jax.Array, teacher_config: Any
) -> dict[str, jax.Array]:
  """The momentum model's outputs on the teacher's view of the batch, without gradient."""
  view = {**batch, "image": batch[teacher_config.get("image_key", "image")]}
  outputs = model.apply(
    teacher_params, view, train=bool(teacher_config.get("dropout", True)), rngs={"dropout": rng}
  )
  return jax.lax.stop_gradient(outputs)


def update_queues(
  extras: dict[str, Any], teacher_outputs: dict[str, jax.Array], image_id: jax.Array
) -> dict[str, Any]:
  """Writes the global batch of teacher embeddings (and, when `queue/image_id` is kept, the
  batch's `image_id` `[B]`) into the queues, which share one pointer."""
  extras = dict(extras)
  ptr = extras["queue/ptr"]
  new_ptr = ptr
  for queue_key, output_key in QUEUED.items():
    extras[queue_key], new_ptr = momentum.enqueue(
      extras[queue_key], ptr, teacher_outputs[output_key]
    )
  if IMAGE_ID_QUEUE in extras:
    extras[IMAGE_ID_QUEUE], _ = momentum.enqueue(extras[IMAGE_ID_QUEUE], ptr, image_id)
  extras["queue/ptr"] = new_ptr
  return extras


def make_train_step(
  model: nn.Module,
  tx: optax.GradientTransformation,
  config: Any,
  schedule: optax.Schedule,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """Builds `train_step(state, batch) -> (state, metrics)`, pure and jit-able."""
  entries = losses_lib.parse_entries(config.losses)
  teacher_config = config.get("teacher")
  mlm_config = config.get("mlm")
  vocab_size = int(config.model.text.vocab_size)

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    step_rng = jax.random.fold_in(state.rng, state.step)
    dropout_rng, teacher_rng, mask_rng, sample_rng = jax.random.split(step_rng, 4)
    teacher, extras, metrics = None, state.extras, {}
    if mlm_config is not None:
      batch = add_mlm_inputs(batch, mask_rng, mlm_config, vocab_size)
    if teacher_config is not None:
      teacher_params = momentum.ema_update(
        extras["teacher"], state.params, float(teacher_config.momentum)
      )
      teacher_out = teacher_forward(model, teacher_params, batch, teacher_rng, teacher_config)
      alpha = momentum.alpha_at(
        state.step, int(teacher_config.alpha_warmup_steps), float(teacher_config.alpha)
      )
      queues = {k: extras[k] for k in (*QUEUED, IMAGE_ID_QUEUE) if k in extras}
      teacher = {**teacher_out, **queues, "alpha": alpha}
      batch = {
        **batch,
        "teacher/img/emb": teacher_out["img/emb"],
        "teacher/txt/emb": teacher_out["txt/emb"],
      }
      extras = update_queues({**extras, "teacher": teacher_params}, teacher_out, batch["image_id"])
      metrics["alpha"] = alpha

    def loss_fn(params):
      outputs = model.apply(
        params, batch, train=True, rngs={"dropout": dropout_rng, "sample": sample_rng}
      )
      return sum_losses(entries, outputs, teacher, batch)

    grads, loss_metrics = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics.update(loss_metrics)
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["param_norm"] = optax.global_norm(params)
    metrics["lr"] = schedule(state.step)
    new_state = state.replace(
      step=state.step + 1, params=params, opt_state=opt_state, extras=extras
    )
    return new_state, metrics

  return train_step


def init_extras(params: Any, teacher_config: Any, embed_dim: int, rng: jax.Array) -> dict[str, Any]:
  """Teacher = a copy of the student; queues of random unit vectors (as ALBEF initialises them)."""
  size = int(teacher_config.queue_size)
  extras: dict[str, Any] = {"teacher": jax.tree.map(jnp.copy, params)}
  for i, key in enumerate(QUEUED):
    queue = jax.random.normal(jax.random.fold_in(rng, i), (size, embed_dim), jnp.float32)
    extras[key] = queue / jnp.linalg.norm(queue, axis=-1, keepdims=True)
  if teacher_config.get("queue_image_id", False):
    extras[IMAGE_ID_QUEUE] = jnp.full((size,), QUEUE_FILL_ID, jnp.int32)
  extras["queue/ptr"] = jnp.zeros((), jnp.int32)
  return extras


def init_state(
  model: nn.Module,
  tx: optax.GradientTransformation,
  example_batch: Batch,
  rng: jax.Array,
  config: Any = None,
) -> TrainState:
  """A fresh TrainState. Meant to run under `jax.jit(..., out_shardings=...)` so that no device ever
  holds an unsharded copy of the parameters."""
  init_rng, state_rng, queue_rng = jax.random.split(rng, 3)
  params = model.init(
    {"params": init_rng, "dropout": init_rng, "sample": init_rng}, example_batch, train=False
  )
  teacher_config = None if config is None else config.get("teacher")
  extras = {}
  if teacher_config is not None:
    extras = init_extras(params, teacher_config, int(config.model.embed_dim), queue_rng)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    rng=state_rng,
    extras=extras,
  )
