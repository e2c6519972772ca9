import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vlalign import optim
from vlalign.errors import ConfigError


def _cfg(**kw):
  base = dict(lr=1e-3, warmup_steps=10, weight_decay=0.1, grad_clip=1.0, min_lr_ratio=0.1)
  return ml_collections.ConfigDict({**base, **kw})


def test_schedule_warms_up_linearly_then_decays_to_the_floor():
  schedule = optim.make_schedule(_cfg(), total_steps=100)
  np.testing.assert_allclose(schedule(0), 0.0)
  np.testing.assert_allclose(schedule(5), 5e-4, rtol=1e-6)
  np.testing.assert_allclose(schedule(10), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(schedule(100), 1e-4, rtol=1e-5)
  assert schedule(50) < schedule(20)


def test_warmup_longer_than_the_run_is_rejected():
  with pytest.raises(ValueError, match="warmup_steps"):
    optim.make_schedule(_cfg(warmup_steps=100), total_steps=100)


def test_no_weight_decay_on_vectors_and_scalars():
  params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,)), "logit_scale": jnp.ones(())}
  tx, _ = optim.make_optimizer(_cfg(warmup_steps=0, lr=0.1, grad_clip=0.0), total_steps=10)
  zero_grads = {k: jnp.zeros_like(v) for k, v in params.items()}
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  assert float(jnp.abs(updates["kernel"]).sum()) > 0  # decayed
  assert float(jnp.abs(updates["bias"]).sum()) == 0
  assert float(jnp.abs(updates["logit_scale"]).sum()) == 0


# ------------------------------------------------------- the official ALBEF / TCL schedule


class _OfficialCosine:
  """A slow transcription of timm's `CosineLRScheduler` (TCL `scheduler/cosine_lr.py`) for one
  parameter group, with the arguments `scheduler_factory.create_scheduler` gives it for the
  ALBEF / TCL configs: t_initial = epochs, t_mul = 1, decay_rate = 1, cycle_limit = 1,
  warmup_prefix = True, no noise. `self.lr` is the group's current learning rate."""

  def __init__(self, lr, epochs, min_lr, warmup_t, warmup_lr):
    self.base_lr, self.t_initial, self.lr_min = lr, epochs, min_lr
    self.warmup_t, self.warmup_lr_init = warmup_t, warmup_lr
    self.lr = lr  # `Scheduler.__init__` writes the base value into the group...
    if warmup_t:  # ...and the warm-up start overwrites it.
      self.warmup_increment = (lr - warmup_lr) / warmup_t
      self.lr = warmup_lr

  def _get_lr(self, t):
    if t < self.warmup_t:
      return self.warmup_lr_init + t * self.warmup_increment
    t = t - self.warmup_t  # warmup_prefix
    cycle = t // self.t_initial
    t_curr = t - self.t_initial * cycle
    if cycle < 1:  # cycle_limit = 1
      cos = math.cos(math.pi * t_curr / self.t_initial)
      return self.lr_min + 0.5 * (self.base_lr - self.lr_min) * (1 + cos)
    return self.lr_min

  def step(self, epoch):
    self.lr = self._get_lr(epoch)


def _official_lrs(loop, lr, min_lr, warmup_lr, warmup_t, step_size, steps_per_epoch, epochs):
  """The learning rate every `optimizer.step()` uses in `Pretrain.py` or `Retrieval.py` (`main`
  and `train`), one entry per iteration."""
  scheduler = _OfficialCosine(lr, epochs, min_lr, warmup_t, warmup_lr)
  used = []
  for epoch in range(epochs):
    if loop == "pretrain" and epoch > 0:
      scheduler.step(epoch + warmup_t)
    for i in range(steps_per_epoch):
      used.append(scheduler.lr)  # optimizer.step() with param_groups[0]["lr"]
      if epoch == 0 and i % step_size == 0 and i <= warmup_t * step_size:
        scheduler.step(i // step_size)
    if loop == "retrieval":
      scheduler.step(epoch + warmup_t + 1)
  return used


ALBEF_CASES = {
  # name: (lr, min_lr_ratio, warmup_lr, warmup_intervals, interval_steps, steps_per_epoch, epochs)
  "pretrain_like": (1e-4, 0.1, 1e-5, 2, 100, 250, 4),
  "warmup_cut_by_epoch_0": (1e-4, 0.1, 1e-5, 5, 100, 250, 4),
  "retrieval_like": (1e-5, 0.1, 1e-5, 1, 100, 130, 5),
  "no_warmup": (1e-4, 0.1, 1e-5, 0, 100, 60, 3),
  "short_intervals": (3e-4, 0.2, 2e-5, 3, 7, 30, 6),
  "zero_floor": (1e-4, 0.0, 0.0, 2, 10, 40, 7),
}


def _albef_fields(lr, ratio, warmup_lr, intervals, interval_steps, steps_per_epoch, **kw):
  return dict(
    schedule="albef",
    lr=lr,
    min_lr_ratio=ratio,
    warmup_steps=0,
    warmup_lr=warmup_lr,
    warmup_intervals=intervals,
    warmup_interval_steps=interval_steps,
    steps_per_epoch=steps_per_epoch,
    **kw,
  )


def _albef_cfg(*args, **kw):
  return _cfg(**_albef_fields(*args, **kw))


@pytest.mark.parametrize("case", sorted(ALBEF_CASES))
def test_albef_schedule_equals_the_official_scheduler_at_every_step(case):
  lr, ratio, warmup_lr, intervals, interval_steps, steps_per_epoch, epochs = ALBEF_CASES[case]
  total = steps_per_epoch * epochs
  args = (lr, lr * ratio, warmup_lr, intervals, interval_steps, steps_per_epoch, epochs)
  pretrain = _official_lrs("pretrain", *args)
  # Retrieval.py steps at the end of each epoch with epoch + warmup + 1, Pretrain.py at the start
  # with epoch + warmup: the same value for every epoch.
  assert _official_lrs("retrieval", *args) == pretrain
  schedule = optim.make_schedule(
    _albef_cfg(lr, ratio, warmup_lr, intervals, interval_steps, steps_per_epoch), total
  )
  ours = np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(total)))
  np.testing.assert_allclose(ours, pretrain, rtol=2e-6, atol=1e-12)
  for step in (0, 1, total - 1):  # Python ints too (logging, tests).
    np.testing.assert_allclose(schedule(step), pretrain[step], rtol=2e-6)
  np.testing.assert_allclose(schedule(total), lr * ratio, rtol=1e-6)  # past the cycle: min_lr


def test_albef_schedule_shape_in_words():
  # steps_per_epoch 250, 2 intervals of 100: warmup_lr for iterations 0..100, the midpoint for
  # 101..200, lr for 201..249, then one cosine value per epoch.
  schedule = optim.make_schedule(_albef_cfg(1e-4, 0.1, 1e-5, 2, 100, 250), total_steps=1000)
  for step, expected in [(0, 1e-5), (100, 1e-5), (101, 5.5e-5), (200, 5.5e-5), (201, 1e-4)]:
    np.testing.assert_allclose(schedule(step), expected, rtol=1e-6)
  cosine = [1e-5 + 0.5 * 9e-5 * (1 + math.cos(math.pi * e / 4)) for e in (1, 2, 3)]
  for e, expected in zip((1, 2, 3), cosine, strict=True):
    np.testing.assert_allclose(schedule(250 * e), expected, rtol=1e-6)
    np.testing.assert_allclose(schedule(250 * e + 249), expected, rtol=1e-6)


@pytest.mark.parametrize(
  "overrides, message",
  [
    (dict(schedule="step"), "optim.schedule"),
    (dict(steps_per_epoch=None), "steps_per_epoch is required"),
    (dict(steps_per_epoch=0), "steps_per_epoch=0"),
    (dict(steps_per_epoch=300), "multiple of config.optim.steps_per_epoch"),
    (dict(warmup_intervals=None), "warmup_intervals is required"),
    (dict(warmup_intervals=-1), "warmup_intervals=-1"),
    (dict(warmup_intervals=1.5), "must be an integer"),
    (dict(warmup_interval_steps=0), "warmup_interval_steps=0"),
    (dict(warmup_lr=-1e-5), "warmup_lr"),
    (dict(warmup_steps=2000), "warmup_steps=2000 is not used by schedule 'albef'"),
    (dict(warmup_epochs=20), "config.optim.warmup_intervals"),
    (dict(schedule="warmup_cosine"), "belong to schedule 'albef'"),
  ],
)
def test_albef_schedule_config_errors(overrides, message):
  fields = {**_albef_fields(1e-4, 0.1, 1e-5, 2, 100, 250), **overrides}
  config = _cfg(**{k: v for k, v in fields.items() if v is not None})
  with pytest.raises(ConfigError, match=message):
    optim.make_schedule(config, total_steps=1000)


def test_make_optimizer_runs_the_albef_schedule():
  config = _albef_cfg(1e-4, 0.1, 1e-5, 2, 100, 250, grad_clip=0.0, weight_decay=0.0)
  tx, schedule = optim.make_optimizer(config, total_steps=1000)
  np.testing.assert_allclose(schedule(101), 5.5e-5, rtol=1e-6)
  params = {"kernel": jnp.ones((2, 2))}
  updates, _ = tx.update({"kernel": jnp.ones((2, 2))}, tx.init(params), params)
  # The first Adam update of a unit gradient is -lr(0) = -warmup_lr.
  np.testing.assert_allclose(updates["kernel"], -1e-5, rtol=1e-4)  # float32 bias corrections


def test_default_schedule_is_unchanged_when_named():
  named = optim.make_schedule(_cfg(schedule="warmup_cosine"), total_steps=100)
  default = optim.make_schedule(_cfg(), total_steps=100)
  steps = jnp.arange(101)
  np.testing.assert_array_equal(jax.vmap(named)(steps), jax.vmap(default)(steps))


# ---------------------------------------------------------------- parameter ranges (clamp)


def test_clamp_keeps_params_in_range_and_leaves_in_range_updates_alone():
  config = _cfg(warmup_steps=0, lr=0.1, grad_clip=0.0, weight_decay=0.0, clamp=(("t", 0.1, 0.5),))
  plain, _ = optim.make_optimizer(_cfg(warmup_steps=0, lr=0.1, grad_clip=0.0, weight_decay=0.0), 10)
  tx, _ = optim.make_optimizer(config, total_steps=10)
  grads = {"t": jnp.float32(-1.0), "kernel": -jnp.ones((2,))}
  for start, expected in [(0.45, 0.5), (0.3, None)]:
    params = {"t": jnp.float32(start), "kernel": jnp.zeros((2,))}
    updates, _ = tx.update(grads, tx.init(params), params)
    reference, _ = plain.update(grads, plain.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(updates["kernel"], reference["kernel"])  # not matched
    if expected is None:  # In range: the same update, bit for bit.
      np.testing.assert_array_equal(updates["t"], reference["t"])
    else:
      assert float(new["t"]) == expected
  params = {"t": jnp.float32(0.15), "kernel": jnp.zeros((2,))}
  updates, _ = tx.update(
    {"t": jnp.float32(1.0), "kernel": jnp.zeros((2,))}, tx.init(params), params
  )
  assert float(optax.apply_updates(params, updates)["t"]) == np.float32(0.1)


def test_clamp_lands_in_range_next_to_the_bound():
  # params + updates is all a transformation controls: the result is in [lo, hi] and as close to
  # the bound as a float32 sum with p can get (exactly on it when that sum can represent it, as
  # for 0.5 from any p in (0.25, 0.5); 0.001 from 0.07 is a grid point apart at best).
  tx = optim.clamp_params([("t", 0.001, 0.5)])
  lo, hi = np.float32(0.001), np.float32(0.5)
  starts = np.float32([0.07, 0.3, 0.4999, 0.0011, 0.07, 0.2, 0.49, -3.0, 7.0])
  steps = np.float32([0.9, 0.3333, 0.001, -0.07, -0.0691, -0.2, 1e3, 0.5, 1.0])
  for p, u in zip(starts, steps, strict=True):
    params = {"t": jnp.float32(p)}
    updates, _ = tx.update({"t": jnp.float32(u)}, tx.init(params), params)
    new = np.float32(optax.apply_updates(params, updates)["t"])
    target = np.clip(np.float32(p + u), lo, hi)
    assert lo <= new <= hi, (p, u, new)
    assert abs(new - target) <= np.spacing(max(abs(p), abs(target))), (p, u, new)
    if target == hi and 0.25 < p < 0.5:
      assert new == hi, (p, u, new)


def test_clamp_leaves_frozen_params_alone():
  config = _cfg(warmup_steps=0, lr=0.1, grad_clip=0.0, clamp=(("t", 0.1, 0.5),))
  params = {"t": jnp.float32(0.9), "kernel": jnp.zeros((2,))}
  tx, _ = optim.make_optimizer(config, 10, frozen={"t": True, "kernel": False})
  grads = {"t": jnp.float32(1.0), "kernel": jnp.ones((2,))}
  updates, _ = tx.update(grads, tx.init(params), params)
  assert float(updates["t"]) == 0.0


@pytest.mark.parametrize(
  "clamp, message",
  [
    ((("t", 0.5, 0.1),), "lo < hi"),
    ((("t", 0.1),), "triple"),
    ("t", "sequence of"),
    ((("t", "a", 1.0),), "not numbers"),
    ((("(", 0.1, 0.5),), "bad pattern"),
  ],
)
def test_clamp_config_errors(clamp, message):
  with pytest.raises(ConfigError, match=message):
    optim.make_optimizer(_cfg(warmup_steps=0, clamp=clamp), total_steps=10)


def test_clamp_patterns_must_match_one_param_each():
  params = {"t": jnp.float32(0.1), "kernel": jnp.zeros((2,))}
  tx, _ = optim.make_optimizer(_cfg(warmup_steps=0, clamp=(("temp", 0.1, 0.5),)), total_steps=10)
  with pytest.raises(ConfigError, match="match no parameter"):
    tx.init(params)
  config = _cfg(warmup_steps=0, clamp=(("t", 0.1, 0.5), (".*", 0.0, 1.0)))
  tx, _ = optim.make_optimizer(config, total_steps=10)
  with pytest.raises(ConfigError, match="several patterns"):
    tx.init(params)
