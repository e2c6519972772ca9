"""Loss registry, the loss context, and the weighted sum the train step optimises.

Every loss is a pure function

    fn(outputs, ctx, **kwargs) -> (scalar, metrics)

registered with `@vlalign.losses.register(name)`. `outputs` is the student model's output dict
(docs/architecture.md, "Model outputs") and `ctx` a `LossContext`: everything else a loss may read,
in one documented place. Losses are written on *global* arrays; under `jax.jit` with sharded inputs
XLA inserts the collectives. `metrics` is a dict of scalars, logged as `train/<loss name>/<key>`.

A config lists losses in `config.losses`, keyed by the name they are logged under:

    config.losses = dict(
      itc=dict(weight=1.0),                                  # fn defaults to the key
      sparse=dict(fn="flops", weight=1e-3, weight_schedule=dict(warmup_steps=1000, power=2)),
    )

`weight_schedule` (optional) ramps the weight: `weight * ramp(step)` with
`ramp = start + (1 - start) * min(1, step / warmup_steps) ** power` (defaults: start 0, power 1);
the scheduled weight is logged as `train/<name>/weight`. Other fields are the loss's keyword
arguments, checked against its signature when the config is read.
"""

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from vlalign.errors import ConfigError
from vlalign.losses import groups
from vlalign.registry import Registry

Metrics = dict[str, jax.Array]
LossFn = Callable[..., tuple[jax.Array, Metrics]]

LOSSES: Registry[LossFn] = Registry("loss", "vlalign.losses")
register = LOSSES.register
get = LOSSES.get
names = LOSSES.names


@flax.struct.dataclass
class LossContext:
  """What a loss reads besides the student's outputs. Built by the method before the gradient.

  Attributes:
    step: `[]` int32, the 0-based index of this update (`TrainState.step` before it increments).
    batch: the global input batch as the pipeline made it (docs/architecture.md, "Batch").
    inputs: what the method derived from the batch for this step, e.g. masked text `mlm_ids` and
      its `mlm_labels` `[B, L]`; `{}` when it derives nothing.
    teacher: the teacher model's outputs on its view of the batch (no gradient), or None for
      methods without a teacher.
    extras: the method's state as the losses see it (e.g. feature queues before this step's
      enqueue); `{}` for methods without state. See `TrainState.extras`.
    schedules: scalar schedules of the method, e.g. the distillation weight `alpha`, each `[]`
      float32; logged as `train/<name>`.
    rngs: named PRNG keys of this step's student forward pass (`dropout`, ...).
  """

  step: jax.Array
  batch: dict[str, jax.Array]
  inputs: dict[str, jax.Array] = flax.struct.field(default_factory=dict)
  teacher: dict[str, jax.Array] | None = None
  extras: dict[str, Any] = flax.struct.field(default_factory=dict)
  schedules: dict[str, jax.Array] = flax.struct.field(default_factory=dict)
  rngs: dict[str, jax.Array] = flax.struct.field(default_factory=dict)


def context(**fields: Any) -> LossContext:
  """A `LossContext` with `step` 0 and an empty batch unless given (for tests and notebooks)."""
  fields.setdefault("step", jnp.zeros((), jnp.int32))
  fields.setdefault("batch", {})
  return LossContext(**fields)


def require(ctx: LossContext, loss: str, *, teacher=(), extras=(), schedules=(), inputs=()):
  """Raises a clear error when `ctx` lacks an entry a loss reads."""
  groups = {
    "teacher": (teacher, ctx.teacher or {}),
    "extras": (extras, ctx.extras),
    "schedules": (schedules, ctx.schedules),
    "inputs": (inputs, ctx.inputs),
  }
  for group, (keys, have) in groups.items():
    missing = [k for k in keys if k not in have]
    if missing:
      raise ConfigError(
        f"loss {loss!r} needs ctx.{group} entries {missing}; the configured method does not "
        "provide them (see docs/methods.md for which method each loss belongs to)"
      )


def require_output(outputs: dict[str, jax.Array], key: str, loss: str, hint: str) -> jax.Array:
  """`outputs[key]`, or a clear error saying how to configure a model that produces it."""
  if key not in outputs:
    raise ConfigError(f"loss {loss!r} needs model output {key!r}: {hint}")
  return outputs[key]


# --- Weight schedules ---------------------------------------------------------------------------

_SCHEDULE_FIELDS = {"warmup_steps", "power", "start"}


def weight_ramp(step: jax.Array, warmup_steps: int, power: float = 1.0, start: float = 0.0):
  """`start + (1 - start) * min(1, step / warmup_steps) ** power`, a `[]` float32 in [start, 1]."""
  progress = jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / float(warmup_steps))
  return start + (1.0 - start) * progress**power


def _check_schedule(name: str, schedule: dict) -> dict:
  unknown = set(schedule) - _SCHEDULE_FIELDS
  if unknown or "warmup_steps" not in schedule:
    raise ConfigError(
      f"config.losses.{name}.weight_schedule={schedule} needs warmup_steps and takes only "
      f"{sorted(_SCHEDULE_FIELDS)}"
    )
  if int(schedule["warmup_steps"]) <= 0:
    raise ConfigError(f"config.losses.{name}.weight_schedule.warmup_steps must be > 0")
  if not 0.0 <= float(schedule.get("start", 0.0)) <= 1.0 or float(schedule.get("power", 1)) <= 0:
    raise ConfigError(f"config.losses.{name}.weight_schedule needs start in [0, 1] and power > 0")
  return {k: (int(v) if k == "warmup_steps" else float(v)) for k, v in schedule.items()}


# --- Config entries and their sum ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossEntry:
  """One line of `config.losses`: logged as `name`, `weight * fn(outputs, ctx, **kwargs)`."""

  name: str
  fn: LossFn
  weight: float
  kwargs: dict[str, Any]
  schedule: dict[str, Any] | None = None

  def weight_at(self, step: jax.Array) -> jax.Array | float:
    if self.schedule is None:
      return self.weight
    return self.weight * weight_ramp(step, **self.schedule)


def _check_kwargs(name: str, fn: LossFn, kwargs: dict[str, Any]) -> None:
  try:
    inspect.signature(fn).bind(None, None, **kwargs)
  except TypeError as e:
    raise ConfigError(f"config.losses.{name}: {e} (loss function {fn.__name__})") from None


def parse_entries(losses_config: Any) -> list[LossEntry]:
  """Turns `config.losses` into `LossEntry`s, validating every field."""
  entries = []
  for log_name, entry in dict(losses_config).items():
    entry = dict(entry.to_dict() if hasattr(entry, "to_dict") else entry)
    fn = get(entry.pop("fn", log_name))
    if "weight" not in entry:
      raise ConfigError(f"config.losses.{log_name} needs a 'weight'")
    weight = float(entry.pop("weight"))
    schedule = entry.pop("weight_schedule", None)
    if schedule is not None:
      schedule = _check_schedule(log_name, dict(schedule))
    _check_kwargs(log_name, fn, entry)
    entries.append(LossEntry(log_name, fn, weight, entry, schedule))
  if not entries:
    raise ConfigError("config.losses is empty: a run needs at least one loss")
  return entries


def sum_losses(
  entries: list[LossEntry],
  outputs: dict[str, jax.Array],
  ctx: LossContext,
  group_size: int | None = None,
) -> tuple[jax.Array, Metrics]:
  """`sum_i weight_i(step) * loss_i`; metrics `<name>` (unweighted value), `<name>/<key>`,
  `<name>/weight` (scheduled weights only) and `loss` (the sum).

  With `group_size`, each loss is the mean of its values on consecutive groups of `group_size`
  examples (`vlalign/losses/groups.py`, `config.loss_group_size`); None: the whole global batch.
  """
  total = jnp.zeros((), jnp.float32)
  metrics = {}
  for entry in entries:
    fn = functools.partial(entry.fn, **entry.kwargs)
    if group_size is None:
      value, loss_metrics = fn(outputs, ctx)
    else:
      value, loss_metrics = groups.grouped(fn, outputs, ctx, group_size)
    weight = entry.weight_at(ctx.step)
    total = total + weight * value
    metrics[entry.name] = value
    metrics.update({f"{entry.name}/{k}": v for k, v in loss_metrics.items()})
    if entry.schedule is not None:
      metrics[f"{entry.name}/weight"] = weight
  metrics["loss"] = total
  return total, metrics
