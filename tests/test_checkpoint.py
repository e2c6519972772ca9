"""Orbax wrapper: restore onto another device count, params-only restore, incompatible models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlalign import checkpoint, sharding
from vlalign.state import TrainState


def _state(width=64):
  rng = np.random.default_rng(0)
  params = {"params": {"dense": {"kernel": rng.normal(size=(256, width)).astype(np.float32)}}}
  opt_state = {"mu": jax.tree.map(np.zeros_like, params)}
  return TrainState(
    step=jnp.int32(7), params=params, opt_state=opt_state, rng=jax.random.PRNGKey(3), extras={}
  )


def _place(state, mesh):
  abstract = jax.eval_shape(lambda: state)
  shardings = sharding.state_shardings(abstract, mesh)
  return jax.device_put(state, shardings), checkpoint.abstract_with_shardings(abstract, shardings)


def _mesh(n, fsdp):
  return sharding.make_mesh({"data": -1, "fsdp": fsdp}, devices=jax.devices()[:n])


def test_written_on_8_devices_restores_on_4_and_1(tmp_path):
  state8, _ = _place(_state(), _mesh(8, 8))
  kernel8 = state8.params["params"]["dense"]["kernel"]
  assert kernel8.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
  ckpt.save(7, state8)
  ckpt.wait()
  for n, fsdp in [(4, 2), (1, 1)]:
    _, target = _place(_state(), _mesh(n, fsdp))
    restored = checkpoint.Checkpointer(str(tmp_path)).restore(7, target)
    kernel = restored.params["params"]["dense"]["kernel"]
    assert len(kernel.sharding.device_set) == n
    np.testing.assert_array_equal(kernel, _state().params["params"]["dense"]["kernel"])
    assert int(restored.step) == 7
    np.testing.assert_array_equal(restored.rng, _state().rng)


def test_restore_params_only(tmp_path):
  state, _ = _place(_state(), _mesh(8, 1))
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(1, state)
  ckpt.wait()
  _, target = _place(_state(), _mesh(8, 1))
  params = checkpoint.Checkpointer(str(tmp_path)).restore_params(1, target.params)
  np.testing.assert_array_equal(
    params["params"]["dense"]["kernel"], _state().params["params"]["dense"]["kernel"]
  )


def test_incompatible_model_is_a_clear_error_and_leaves_the_checkpoint(tmp_path):
  state, _ = _place(_state(width=64), _mesh(8, 1))
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(3, state)
  ckpt.wait()
  _, other = _place(_state(width=32), _mesh(8, 1))
  with pytest.raises(
    checkpoint.IncompatibleCheckpointError, match=r"\(256, 64\) vs config \(256, 32\)"
  ):
    checkpoint.Checkpointer(str(tmp_path)).restore(3, other)
  with pytest.raises(checkpoint.IncompatibleCheckpointError, match="fresh --workdir"):
    checkpoint.Checkpointer(str(tmp_path)).restore_params(3, other.params)
  assert checkpoint.Checkpointer(str(tmp_path)).latest_step() == 3


def test_keeps_last_n_and_every_period(tmp_path):
  state, _ = _place(_state(), _mesh(1, 1))
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2, keep_period=4, async_save=False)
  for step in range(1, 10):
    ckpt.save(step, state)
  ckpt.close()
  assert checkpoint.Checkpointer(str(tmp_path)).all_steps() == [4, 8, 9]
