"""Optimizer from config: AdamW, linear warm-up then cosine decay, global-norm clipping, a
path-based weight-decay rule, and frozen sub-trees.

`optim_config` fields: lr, warmup_steps, min_lr_ratio, weight_decay, b1, b2, eps, grad_clip
(0 disables), and

* `decay`: parameter path patterns (regular expressions relative to `params`, matched in full)
  that receive weight decay; every other parameter gets none. The default,
  `DEFAULT_DECAY = ("(.*/)?kernel", "(.*/)?embedding")`, decays the weight matrices of dense and
  convolution layers and token-embedding tables, and never norms, biases, scalars (temperature,
  SigLIP bias), position embeddings or learned tokens (ViT `cls`).
* `frozen`: patterns of parameters that never change. They get zero updates through
  `optax.multi_transform` + `optax.set_to_zero` and the optimizer keeps no moments for them.
"""

import math
from typing import Any

import jax
import optax

from vlalign import pytrees
from vlalign.errors import ConfigError

DEFAULT_DECAY = ("(.*/)?kernel", "(.*/)?embedding")


def check_optim_config(optim_config: Any, total_steps: int) -> None:
  """Clear errors for optimizer settings that cannot train (a negative learning rate would train
  by gradient ascent; NaN would silently destroy the parameters)."""

  def number(name: str, default: float | None = None) -> float:
    value = optim_config.get(name, default)
    try:
      value = float(value)
    except (TypeError, ValueError):
      raise ConfigError(f"config.optim.{name}={value!r} is not a number") from None
    if not math.isfinite(value):
      raise ConfigError(f"config.optim.{name}={value} must be finite")
    return value

  if number("lr") <= 0:
    raise ConfigError(f"config.optim.lr={optim_config.lr} must be > 0")
  warmup = int(number("warmup_steps", 0))
  if not 0 <= warmup < total_steps:
    raise ConfigError(
      f"config.optim.warmup_steps={warmup} must be in [0, total_steps={total_steps})"
    )
  if not 0.0 <= number("min_lr_ratio", 0.0) <= 1.0:
    raise ConfigError(f"config.optim.min_lr_ratio={optim_config.min_lr_ratio} must be in [0, 1]")
  if number("weight_decay", 0.0) < 0:
    raise ConfigError(f"config.optim.weight_decay={optim_config.weight_decay} must be >= 0")
  for name, default in (("b1", 0.9), ("b2", 0.999)):
    if not 0.0 <= number(name, default) < 1.0:
      raise ConfigError(f"config.optim.{name}={optim_config.get(name)} must be in [0, 1)")
  if number("eps", 1e-8) <= 0:
    raise ConfigError(f"config.optim.eps={optim_config.eps} must be > 0")
  if number("grad_clip", 0.0) < 0:
    raise ConfigError(f"config.optim.grad_clip={optim_config.grad_clip} must be >= 0 (0: off)")


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


def make_schedule(optim_config: Any, total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to `lr` over `warmup_steps`, then cosine to `lr * min_lr_ratio`."""
  check_optim_config(optim_config, total_steps)
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
  return tx, schedule
