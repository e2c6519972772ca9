"""Optimizer from config: AdamW, linear warm-up then cosine decay, global-norm clipping."""

from typing import Any

import jax
import optax


def decay_mask(params: Any) -> Any:
  """True for weight matrices; False for norms, biases and scalars (temperature, SigLIP bias)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_schedule(optim_config: Any, total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to `lr` over `warmup_steps`, then cosine to `lr * min_lr_ratio`."""
  warmup = int(optim_config.warmup_steps)
  if not 0 <= warmup < total_steps:
    raise ValueError(f"optim.warmup_steps={warmup} must be in [0, total_steps={total_steps})")
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=float(optim_config.lr),
    warmup_steps=warmup,
    decay_steps=total_steps,
    end_value=float(optim_config.lr) * float(optim_config.get("min_lr_ratio", 0.0)),
  )


def make_optimizer(
  optim_config: Any, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns `(tx, schedule)`. `optim_config` fields: lr, warmup_steps, weight_decay, b1, b2, eps,
  grad_clip (<= 0 disables), min_lr_ratio."""
  schedule = make_schedule(optim_config, total_steps)
  adamw = optax.adamw(
    schedule,
    b1=float(optim_config.get("b1", 0.9)),
    b2=float(optim_config.get("b2", 0.999)),
    eps=float(optim_config.get("eps", 1e-8)),
    weight_decay=float(optim_config.get("weight_decay", 0.0)),
    mask=decay_mask,
  )
  clip = float(optim_config.get("grad_clip", 0.0))
  tx = optax.chain(optax.clip_by_global_norm(clip), adamw) if clip > 0 else adamw
  return tx, schedule
