import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlalign import optim


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
