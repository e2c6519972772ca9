"""Optimizer from config: AdamW, a learning-rate schedule, global-norm clipping, a path-based
weight-decay rule, frozen sub-trees and parameter ranges.

`optim_config` fields: lr, min_lr_ratio, weight_decay, b1, b2, eps, grad_clip (0 disables), and

* `schedule`: the learning-rate schedule of the step count (0-based, the update being made).
  - `"warmup_cosine"` (default): linear from 0 to `lr` over `warmup_steps`, then a per-step cosine
    to `lr * min_lr_ratio` at `total_steps` (`optax.warmup_cosine_decay_schedule`).
  - `"albef"`: the official ALBEF / TCL recipe, timm's `CosineLRScheduler` (`warmup_prefix=True`,
    `cycle_limit=1`, `t_initial` = the number of epochs) driven as `Pretrain.py` and `Retrieval.py`
    drive it (`albef_schedule`). Its fields:
      `steps_per_epoch` (required): updates per epoch (`len(data_loader)`); `total_steps` must be a
        multiple of it (epochs = total_steps / steps_per_epoch).
      `warmup_lr` (default 1e-5): the rate of the first updates (timm `warmup_lr_init`).
      `warmup_intervals` (required): timm's `warmup_t`, the reference config's
        `schedular.warmup_epochs` (20 in pre-training, 1 in retrieval fine-tuning). Despite the
        reference's name these are not epochs: the rate rises in `warmup_intervals` increments of
        `(lr - warmup_lr) / warmup_intervals`, one every `warmup_interval_steps` updates, all
        inside epoch 0 (the warm-up is cut short if epoch 0 ends first).
      `warmup_interval_steps` (default 100): the reference's `step_size`.
    `warmup_steps` must be 0 (or absent): it has no meaning here.
* `decay`: parameter path patterns (regular expressions relative to `params`, matched in full)
  that receive weight decay; every other parameter gets none. The default,
  `DEFAULT_DECAY = ("(.*/)?kernel", "(.*/)?embedding")`, decays the weight matrices of dense and
  convolution layers and token-embedding tables, and never norms, biases, scalars (temperature,
  SigLIP bias), position embeddings or learned tokens (ViT `cls`). Any parameter may be named,
  scalars included (ALBEF's `temp`: `decay=(..., "temp")`, as timm decays the 0-d `temp`).
* `frozen`: patterns of parameters that never change. They get zero updates through
  `optax.multi_transform` + `optax.set_to_zero` and the optimizer keeps no moments for them.
* `clamp`: `((pattern, lo, hi), ...)`, default `()`: after every update the parameters whose path
  fully matches `pattern` lie in [lo, hi] (`clamp_params`, the last transformation of the chain;
  frozen parameters are left alone). A sequence, not a dict, because a ConfigDict key may not
  hold the dots of a regular expression. This reproduces an in-place clamp such as ALBEF's
  `self.temp.clamp_(0.001, 0.5)`: `clamp=(("temp", 0.001, 0.5),)`.
"""

import math
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from vlalign import pytrees
from vlalign.errors import ConfigError

DEFAULT_DECAY = ("(.*/)?kernel", "(.*/)?embedding")
SCHEDULES = ("warmup_cosine", "albef")
ALBEF_WARMUP_LR = 1e-5
ALBEF_WARMUP_INTERVAL_STEPS = 100
ALBEF_FIELDS = ("steps_per_epoch", "warmup_lr", "warmup_intervals", "warmup_interval_steps")
# Names a reader of the reference's config might write, and the fields that replace them.
_ALBEF_RENAMED = {"warmup_epochs": "warmup_intervals", "step_size": "warmup_interval_steps"}


def _number(optim_config: Any, name: str, default: float | None = None) -> float:
  value = optim_config.get(name, default)
  try:
    value = float(value)
  except (TypeError, ValueError):
    raise ConfigError(f"config.optim.{name}={value!r} is not a number") from None
  if not math.isfinite(value):
    raise ConfigError(f"config.optim.{name}={value} must be finite")
  return value


def _integer(optim_config: Any, name: str, default: int | None = None, why: str = "") -> int:
  value = optim_config.get(name, default)
  if value is None:
    raise ConfigError(f"config.optim.{name} is required{why}")
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != int(value):
    raise ConfigError(f"config.optim.{name}={value!r} must be an integer")
  return int(value)


def check_optim_config(optim_config: Any, total_steps: int) -> None:
  """Clear errors for optimizer settings that cannot train (a negative learning rate would train
  by gradient ascent; NaN would silently destroy the parameters) or that the chosen schedule does
  not use."""
  if _number(optim_config, "lr") <= 0:
    raise ConfigError(f"config.optim.lr={optim_config.lr} must be > 0")
  schedule = optim_config.get("schedule", "warmup_cosine")
  if schedule not in SCHEDULES:
    raise ConfigError(f"config.optim.schedule={schedule!r} must be one of {SCHEDULES}")
  warmup = _number(optim_config, "warmup_steps", 0)
  if schedule == "warmup_cosine":
    if not 0 <= int(warmup) < total_steps:
      raise ConfigError(
        f"config.optim.warmup_steps={int(warmup)} must be in [0, total_steps={total_steps})"
      )
    unused = [name for name in ALBEF_FIELDS if name in optim_config]
    if unused:
      raise ConfigError(
        f"config.optim.{unused} belong to schedule 'albef', but config.optim.schedule is "
        "'warmup_cosine'"
      )
  if schedule == "albef":
    if warmup != 0:
      raise ConfigError(
        f"config.optim.warmup_steps={optim_config.warmup_steps} is not used by schedule 'albef' "
        "(its warm-up is warmup_intervals x warmup_interval_steps updates); set it to 0"
      )
    albef_schedule_args(optim_config, total_steps)
  if not 0.0 <= _number(optim_config, "min_lr_ratio", 0.0) <= 1.0:
    raise ConfigError(f"config.optim.min_lr_ratio={optim_config.min_lr_ratio} must be in [0, 1]")
  if _number(optim_config, "weight_decay", 0.0) < 0:
    raise ConfigError(f"config.optim.weight_decay={optim_config.weight_decay} must be >= 0")
  for name, default in (("b1", 0.9), ("b2", 0.999)):
    if not 0.0 <= _number(optim_config, name, default) < 1.0:
      raise ConfigError(f"config.optim.{name}={optim_config.get(name)} must be in [0, 1)")
  if _number(optim_config, "eps", 1e-8) <= 0:
    raise ConfigError(f"config.optim.eps={optim_config.eps} must be > 0")
  if _number(optim_config, "grad_clip", 0.0) < 0:
    raise ConfigError(f"config.optim.grad_clip={optim_config.grad_clip} must be >= 0 (0: off)")
  clamp_ranges(optim_config)


def albef_schedule_args(optim_config: Any, total_steps: int) -> dict[str, Any]:
  """The validated keyword arguments of `albef_schedule` from `optim_config` (schedule "albef")."""
  for old, new in _ALBEF_RENAMED.items():
    if old in optim_config:
      raise ConfigError(
        f"config.optim.{old} is not a field; the reference's {old} is config.optim.{new} "
        "(see vlalign/optim.py)"
      )
  why = " by schedule 'albef'"
  steps_per_epoch = _integer(optim_config, "steps_per_epoch", why=why + " (updates per epoch)")
  if steps_per_epoch <= 0:
    raise ConfigError(f"config.optim.steps_per_epoch={steps_per_epoch} must be > 0")
  if total_steps <= 0 or total_steps % steps_per_epoch:
    raise ConfigError(
      f"total_steps={total_steps} must be a positive multiple of config.optim.steps_per_epoch="
      f"{steps_per_epoch} for schedule 'albef' (its cosine has one value per epoch)"
    )
  intervals = _integer(optim_config, "warmup_intervals", why=why + " (20 in ALBEF pre-training)")
  if intervals < 0:
    raise ConfigError(f"config.optim.warmup_intervals={intervals} must be >= 0")
  interval_steps = _integer(optim_config, "warmup_interval_steps", ALBEF_WARMUP_INTERVAL_STEPS)
  if interval_steps <= 0:
    raise ConfigError(f"config.optim.warmup_interval_steps={interval_steps} must be > 0")
  warmup_lr = _number(optim_config, "warmup_lr", ALBEF_WARMUP_LR)
  if warmup_lr < 0:
    raise ConfigError(f"config.optim.warmup_lr={warmup_lr} must be >= 0")
  lr = _number(optim_config, "lr")
  return dict(
    lr=lr,
    min_lr=lr * _number(optim_config, "min_lr_ratio", 0.0),
    warmup_lr=warmup_lr,
    warmup_intervals=intervals,
    warmup_interval_steps=interval_steps,
    steps_per_epoch=steps_per_epoch,
    epochs=total_steps // steps_per_epoch,
  )


def albef_schedule(
  lr: float,
  min_lr: float,
  warmup_lr: float,
  warmup_intervals: int,
  warmup_interval_steps: int,
  steps_per_epoch: int,
  epochs: int,
) -> optax.Schedule:
  """The learning rate each update uses in the official ALBEF / TCL training loop.

  With S = steps_per_epoch, W = warmup_intervals, D = warmup_interval_steps and the 0-based step
  = e * S + i (epoch e, iteration i):

    epoch 0:   t = min(max(i - 1, 0) // D, W)
               rate = warmup_lr + t * (lr - warmup_lr) / W   if t < W
                      lr                                     otherwise
    epoch e>0: rate = min_lr + (lr - min_lr) * (1 + cos(pi * e / epochs)) / 2   (e < epochs)
                      min_lr                                                    (e >= epochs)

  This is timm's `CosineLRScheduler._get_lr(t)` (`scheduler/cosine_lr.py`) stepped as the
  reference steps it: the scheduler starts at `warmup_lr` (`_get_lr(0)`); in epoch 0, after
  iteration i with i % D == 0 and i <= W * D, `Pretrain.py: train` calls `step(i // D)`, so
  iteration i uses the value set after iteration i - 1; from epoch 1 the rate is set once per
  epoch to `_get_lr(e + W)`, whose cosine subtracts W (warmup_prefix). Past the last epoch (the
  cycle ends) timm gives min_lr. The final epoch's rate is min_lr + (lr - min_lr) * (1 + cos(pi *
  (epochs - 1) / epochs)) / 2, slightly above min_lr.

  Args:
    lr: the peak rate (the optimizer's `lr`, timm's base value).
    min_lr: the cosine's floor.
    warmup_lr: the first rate.
    warmup_intervals: W >= 0 (0: no warm-up, `lr` through epoch 0).
    warmup_interval_steps: D > 0.
    steps_per_epoch: S > 0.
    epochs: the cosine's length in epochs (timm `t_initial`).

  Returns:
    A jit-able function of the step count `[]` int -> `[]` float32.
  """

  def schedule(count: jax.Array) -> jax.Array:
    count = jnp.asarray(count, jnp.int32)
    epoch, i = count // steps_per_epoch, count % steps_per_epoch
    cosine = min_lr + 0.5 * (lr - min_lr) * (1.0 + jnp.cos(jnp.pi * epoch / epochs))
    rate = jnp.where(epoch < epochs, cosine, min_lr)
    if warmup_intervals > 0:
      t = jnp.minimum(jnp.maximum(i - 1, 0) // warmup_interval_steps, warmup_intervals)
      warm = warmup_lr + t * ((lr - warmup_lr) / warmup_intervals)
      rate = jnp.where((epoch == 0) & (t < warmup_intervals), warm, rate)
    return rate.astype(jnp.float32)

  return schedule


def decay_patterns(optim_config: Any) -> tuple[str, ...]:
  return tuple(optim_config.get("decay", DEFAULT_DECAY))


def decay_mask(params: Any, patterns: tuple[str, ...] = DEFAULT_DECAY) -> Any:
  """True on the parameters that receive weight decay (see the module docstring)."""
  return pytrees.path_mask(params, patterns, "optim.decay", require_match=False)


def frozen_mask(params: Any, patterns: tuple[str, ...]) -> Any | None:
  """Boolean pytree, True on frozen leaves; None when nothing is frozen."""
  if not patterns:
    return None
  return pytrees.path_mask(params, patterns, "optim.frozen")


def clamp_ranges(optim_config: Any) -> tuple[tuple[str, float, float], ...]:
  """`optim_config.clamp` validated: `((pattern, lo, hi), ...)` with lo < hi, both finite."""
  entries = optim_config.get("clamp", ()) or ()
  if isinstance(entries, str) or not isinstance(entries, Sequence):
    raise ConfigError(
      f"config.optim.clamp={entries!r} must be a sequence of (pattern, lo, hi), e.g. "
      "(('temp', 0.001, 0.5),)"
    )
  ranges = []
  for entry in entries:
    if isinstance(entry, str) or not isinstance(entry, Sequence) or len(entry) != 3:
      raise ConfigError(f"config.optim.clamp: {entry!r} is not a (pattern, lo, hi) triple")
    pattern, lo, hi = entry
    if not isinstance(pattern, str):
      raise ConfigError(f"config.optim.clamp: the pattern of {entry!r} is not a string")
    pytrees.compile_patterns([pattern], "optim.clamp")
    try:
      lo, hi = float(lo), float(hi)
    except (TypeError, ValueError):
      raise ConfigError(f"config.optim.clamp: the bounds of {entry!r} are not numbers") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
      raise ConfigError(f"config.optim.clamp: {entry!r} needs finite bounds with lo < hi")
    ranges.append((pattern, lo, hi))
  return tuple(ranges)


def _leaf_ranges(
  params: Any, ranges: Sequence[tuple[str, float, float]], skip: Any | None
) -> list[tuple[float, float] | None]:
  """Per leaf of `params` (flattening order), its (lo, hi) or None; errors for a pattern that
  matches no parameter and for a parameter two patterns match."""
  masks = [
    jax.tree.leaves(pytrees.path_mask(params, [pattern], "optim.clamp")) for pattern, _, _ in ranges
  ]
  names = list(pytrees.named_leaves(params))
  skipped = jax.tree.leaves(skip) if skip is not None else [False] * len(names)
  out: list[tuple[float, float] | None] = []
  for k, name in enumerate(names):
    hits = [r for r, mask in zip(ranges, masks, strict=True) if mask[k]]
    if len(hits) > 1:
      raise ConfigError(
        f"config.optim.clamp: {pytrees.param_name(name)!r} matches several patterns "
        f"{[h[0] for h in hits]}"
      )
    out.append((hits[0][1], hits[0][2]) if hits and not skipped[k] else None)
  return out


def _into_range(p: jax.Array, u: jax.Array, lo: float, hi: float) -> jax.Array:
  """The update that takes `p` to `clip(p + u, lo, hi)`: `u` itself when p + u is in range, else
  `bound - p`, moved one ulp inwards where rounding of `p + (bound - p)` would cross the bound.
  The sum lands in [lo, hi], on the bound when a float32 sum with `p` can represent it (0.5 from
  any p in [0.25, 0.5]), else within one float32 spacing of `p` of it."""
  new = (p + u).astype(p.dtype)
  fix = (jnp.clip(new, lo, hi) - p).astype(u.dtype)
  fix = jnp.where((p + fix).astype(p.dtype) > hi, jnp.nextafter(fix, -jnp.inf), fix)
  fix = jnp.where((p + fix).astype(p.dtype) < lo, jnp.nextafter(fix, jnp.inf), fix)
  return jnp.where((new >= lo) & (new <= hi), u, fix)


def clamp_params(
  ranges: Sequence[tuple[str, float, float]], skip: Any | None = None
) -> optax.GradientTransformation:
  """Changes the updates so that `params + updates` lies in [lo, hi] on the matched leaves.

  An in-place clamp after each step (`optax.apply_updates` then clip) as a transformation; put it
  last in the chain. Updates that stay in range are unchanged; the others land in [lo, hi], at the
  bound up to float32 rounding of `params + updates` (see `_into_range`).

  Args:
    ranges: `((pattern, lo, hi), ...)`, patterns relative to `params` matched in full; each must
      match some parameter and no parameter may match two.
    skip: boolean pytree like the params (True: leave alone, e.g. frozen leaves), or None.
  """
  ranges = tuple(ranges)

  def init_fn(params):
    _leaf_ranges(params, ranges, skip)  # Validate the patterns against the parameters.
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("clamp_params needs the params in tx.update(updates, state, params)")
    leaf_ranges = _leaf_ranges(params, ranges, skip)
    flat_u, treedef = jax.tree.flatten(updates)
    flat_p = jax.tree.leaves(params)
    new = [
      u if r is None else _into_range(p, u, *r)
      for u, p, r in zip(flat_u, flat_p, leaf_ranges, strict=True)
    ]
    return jax.tree.unflatten(treedef, new), state

  return optax.GradientTransformation(init_fn, update_fn)


def make_schedule(optim_config: Any, total_steps: int) -> optax.Schedule:
  """The learning rate of the step count, by `optim.schedule` (see the module docstring)."""
  check_optim_config(optim_config, total_steps)
  if optim_config.get("schedule", "warmup_cosine") == "albef":
    return albef_schedule(**albef_schedule_args(optim_config, total_steps))
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=float(optim_config.lr),
    warmup_steps=int(optim_config.warmup_steps),
    decay_steps=total_steps,
    end_value=float(optim_config.lr) * float(optim_config.get("min_lr_ratio", 0.0)),
  )


def make_optimizer(
  optim_config: Any, total_steps: int, frozen: Any | None = None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns `(tx, schedule)`.

  Args:
    optim_config: see the module docstring.
    total_steps: length of the schedule.
    frozen: boolean pytree like the params (True: never updated), or None.
  """
  schedule = make_schedule(optim_config, total_steps)
  patterns = decay_patterns(optim_config)
  pytrees.compile_patterns(patterns, "optim.decay")
  adamw = optax.adamw(
    schedule,
    b1=float(optim_config.get("b1", 0.9)),
    b2=float(optim_config.get("b2", 0.999)),
    eps=float(optim_config.get("eps", 1e-8)),
    weight_decay=float(optim_config.get("weight_decay", 0.0)),
    mask=lambda params: decay_mask(params, patterns),
  )
  clip = float(optim_config.get("grad_clip", 0.0))
  tx = optax.chain(optax.clip_by_global_norm(clip), adamw) if clip > 0 else adamw
  if frozen is not None:
    labels = jax.tree.map(lambda f: "frozen" if f else "train", frozen)
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  ranges = clamp_ranges(optim_config)
  if ranges:
    tx = optax.chain(tx, clamp_params(ranges, skip=frozen))
  return tx, schedule
