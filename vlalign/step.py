"""The pure train step, the same for every method:

    rng     = fold_in(state.rng, state.step)
    ctx     = method.before_gradient(state, batch, rng)
    grads   = grad of sum_i weight_i(step) * loss_i(method.forward(params, ctx), ctx)
              (frozen parameters enter the forward pass through stop_gradient)
    params  = optax update
    extras  = method.after_update(ctx, outputs, params)
    params  = method.refresh_params(ctx, params, extras); frozen leaves carried over unchanged
    metrics = losses' metrics + method.step_metrics(ctx, outputs, extras) + norms, lr

Everything method-specific (teachers, queues, masking, views, schedules) is in the method's hooks
(`vlalign/methods/base.py`); everything a loss reads is in the `LossContext`
(`vlalign/losses/__init__.py`).
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from vlalign import losses as losses_lib
from vlalign.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def select(mask: Any, when_true: Any, when_false: Any) -> Any:
  """Leaf by leaf, `when_true` where the boolean pytree `mask` is True, else `when_false`."""
  return jax.tree.map(lambda m, a, b: a if m else b, mask, when_true, when_false)


def make_train_step(
  method: Any,
  tx: optax.GradientTransformation,
  loss_entries: list[losses_lib.LossEntry],
  schedule: optax.Schedule,
  frozen: Any = None,
  group_size: int | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """Builds `train_step(state, batch) -> (state, metrics)`, pure and jit-able.

  Args:
    method: a `vlalign.methods.base.Method`.
    tx: the optimizer (it must give zero updates to the frozen leaves: `optim.make_optimizer`).
    loss_entries: `losses.parse_entries(config.losses)`.
    schedule: the learning-rate schedule, logged as `lr`.
    frozen: a boolean pytree like the params, True on leaves that never change; None: none.
    group_size: loss group size (`losses.groups.group_size_of(config)`); None: the global batch.
  """

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    rng = jax.random.fold_in(state.rng, state.step)
    ctx = method.before_gradient(state, batch, rng)

    def loss_fn(params):
      if frozen is not None:
        params = select(frozen, jax.lax.stop_gradient(params), params)
      outputs = method.forward(params, ctx)
      total, metrics = losses_lib.sum_losses(loss_entries, outputs, ctx, group_size)
      return total, (metrics, outputs)

    grads, (metrics, outputs) = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    outputs = jax.lax.stop_gradient(outputs)
    extras = method.after_update(ctx, outputs, params)
    params = method.refresh_params(ctx, params, extras)
    if frozen is not None:
      params = select(frozen, state.params, params)
    metrics = {
      **{k: jnp.asarray(v, jnp.float32) for k, v in ctx.schedules.items()},
      **metrics,
      **method.step_metrics(ctx, outputs, extras),
      "grad_norm": optax.global_norm(grads),
      "param_norm": optax.global_norm(params),
      "lr": schedule(state.step),
    }
    new_state = state.replace(
      step=state.step + 1, params=params, opt_state=opt_state, extras=extras
    )
    return new_state, metrics

  return train_step


def make_loss_probe(
  method: Any, loss_entries: list[losses_lib.LossEntry], group_size: int | None = None
) -> Callable[[TrainState, Batch], Metrics]:
  """`probe(state, batch) -> metrics`: the losses of the state's own parameters on `batch`, as
  the next step would compute them, without gradient or update. The trainer checks them before
  saving a checkpoint, so that no checkpoint holds parameters whose loss is not finite."""

  def probe(state: TrainState, batch: Batch) -> Metrics:
    ctx = method.before_gradient(state, batch, jax.random.fold_in(state.rng, state.step))
    outputs = method.forward(state.params, ctx)
    _, metrics = losses_lib.sum_losses(loss_entries, outputs, ctx, group_size)
    return {**{k: jnp.asarray(v, jnp.float32) for k, v in ctx.schedules.items()}, **metrics}

  return probe


def make_params_init(model: Any, example_batch: Callable[[], Batch]) -> Callable[[jax.Array], Any]:
  """`init_params(rng) -> params`; `example_batch()` builds (inside the trace) inputs of the train
  batch's shapes. Meant to run under `jax.jit(..., out_shardings=...)`, so that no device ever
  holds an unsharded copy."""

  def init_params(rng):
    init_rng = jax.random.split(rng, 3)[0]
    rngs = {"params": init_rng, "dropout": init_rng, "sample": init_rng}
    return model.init(rngs, example_batch(), train=False)

  return init_params


def make_state_init(
  method: Any, tx: optax.GradientTransformation
) -> Callable[[Any, jax.Array], TrainState]:
  """`init_state(params, rng) -> TrainState` around given parameters (fresh or loaded through
  `config.init`): optimizer state, step 0, and the method's extras (e.g. an EMA teacher copied from
  `params`). `rng` is the key `init_params` got."""

  def init_state(params, rng):
    _, state_rng, extras_rng = jax.random.split(rng, 3)
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      rng=state_rng,
      extras=method.init_extras(params, extras_rng),
    )

  return init_state
