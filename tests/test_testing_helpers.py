import jax
import jax.numpy as jnp
import numpy as np

from vlalign import testing


def test_eight_simulated_devices():
  assert jax.device_count() == 8


def test_run_sharded_and_single_matches_for_a_global_reduction():
  x = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
  sharded, single = testing.run_sharded_and_single(lambda a: jnp.sum(a @ a.T), x)
  np.testing.assert_allclose(sharded, single, rtol=1e-5)
  np.testing.assert_allclose(single, np.sum(x @ x.T), rtol=1e-4)
