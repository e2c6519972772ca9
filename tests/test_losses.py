"""The loss registry, config entries, scheduled weights and their sum."""

import jax.numpy as jnp
import numpy as np
import pytest

from vlalign import losses
from vlalign.losses import LossEntry


def test_weight_ramp_matches_a_loop():
  for step in range(12):
    for power, start in ((1.0, 0.0), (2.0, 0.0), (1.0, 0.25)):
      progress = min(1.0, step / 8)
      expected = start + (1 - start) * progress**power
      got = losses.weight_ramp(jnp.int32(step), 8, power, start)
      np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_sum_losses_applies_scheduled_weights_at_the_step():
  def constant(outputs, ctx, value=1.0):
    del outputs, ctx
    return jnp.float32(value), {"half": jnp.float32(value / 2)}

  entries = [
    LossEntry("a", constant, 2.0, {"value": 3.0}),
    LossEntry("b", constant, 0.5, {"value": 4.0}, {"warmup_steps": 10, "power": 1.0}),
  ]
  total, metrics = losses.sum_losses(entries, {}, losses.context(step=jnp.int32(4)))
  np.testing.assert_allclose(total, 2.0 * 3.0 + 0.5 * 0.4 * 4.0, rtol=1e-6)
  assert metrics["a"] == 3.0 and metrics["a/half"] == 1.5 and "a/weight" not in metrics
  np.testing.assert_allclose(metrics["b/weight"], 0.2, rtol=1e-6)
  np.testing.assert_allclose(metrics["loss"], total)


def test_parse_entries_checks_every_field():
  entries = losses.parse_entries(
    {
      "itc": {"weight": 1.0},
      "sig": {"fn": "siglip", "weight": 0.5, "weight_schedule": {"warmup_steps": 10, "power": 2}},
    }  # fmt: skip
  )
  assert [(e.name, e.fn.__name__, e.weight) for e in entries] == [
    ("itc", "itc", 1.0),
    ("sig", "siglip", 0.5),
  ]
  assert entries[1].schedule == {"warmup_steps": 10, "power": 2.0}
  bad = [
    ({"itc": {}}, "needs a 'weight'"),
    ({"itc": {"weight": 1.0, "max_scale": 3.0}}, "unexpected keyword argument 'max_scale'"),
    ({"itc": {"weight": 1.0, "weight_schedule": {"steps": 3}}}, "needs warmup_steps"),
    ({"itc": {"weight": 1.0, "weight_schedule": {"warmup_steps": 0}}}, "must be > 0"),
    ({"x": {"fn": "nope", "weight": 1.0}}, "unknown loss 'nope'"),
    ({}, "config.losses is empty"),
  ]
  for config, message in bad:
    with pytest.raises(ValueError, match=message):
      losses.parse_entries(config)


def test_require_names_the_missing_context_entries():
  ctx = losses.context(teacher={"img/emb": jnp.zeros((2, 3))})
  losses.require(ctx, "x", teacher=("img/emb",))
  with pytest.raises(ValueError, match=r"loss 'x' needs ctx.extras entries \['queue/img'\]"):
    losses.require(ctx, "x", teacher=("img/emb",), extras=("queue/img",))
