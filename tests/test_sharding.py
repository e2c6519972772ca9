import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from vlalign import sharding


def test_make_mesh_fills_the_minus_one_axis():
  mesh = sharding.make_mesh({"data": -1, "fsdp": 2})
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
  mesh = sharding.make_mesh({"data": 2, "fsdp": -1}, devices=jax.devices()[:4])
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2}


@pytest.mark.parametrize(
  "cfg", [{"data": 3, "fsdp": -1}, {"data": -1, "fsdp": -1}, {"data": 2, "fsdp": 2}]
)
def test_make_mesh_rejects_sizes_that_do_not_fit(cfg):
  with pytest.raises(ValueError, match="mesh"):
    sharding.make_mesh(cfg)


def test_fsdp_spec_splits_the_largest_divisible_dimension():
  assert sharding.fsdp_spec((256, 512), 4) == P(None, "fsdp")
  assert sharding.fsdp_spec((512, 6), 4, min_size=1) == P("fsdp", None)
  assert sharding.fsdp_spec((255, 129), 4, min_size=1) == P()  # nothing divides
  assert sharding.fsdp_spec((8,), 4) == P()  # small arrays stay replicated
  assert sharding.fsdp_spec((256, 512), 1) == P()


def test_state_shardings_follow_the_rule():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  tree = {
    "w": jax.ShapeDtypeStruct((128, 256), np.float32),
    "b": jax.ShapeDtypeStruct((256,), np.float32),
  }
  shardings = sharding.state_shardings(tree, mesh)
  assert shardings["w"].spec == P(None, "fsdp")
  assert shardings["b"].spec == P()


def test_check_batch_size_names_the_devices():
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
  sharding.check_batch_size(16, mesh)
  with pytest.raises(ValueError, match="not divisible by the 8 devices"):
    sharding.check_batch_size(12, mesh)


def test_host_fn_takes_process_rows_and_tells_them():
  """One process holds every row; a `ProcessRows` of all of them is the plain array's call."""
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
  np.testing.assert_array_equal(sharding.process_rows(mesh, 16), np.arange(16))
  np.testing.assert_array_equal(sharding.process_rows(mesh, 6), np.arange(6))  # replicated
  call = sharding.host_fn(lambda p, x, y: x * p + y.sum(), mesh)
  np.testing.assert_array_equal(call.process_rows(16), np.arange(16))
  x = np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32)
  y = np.arange(5.0, dtype=np.float32)  # 5 rows: replicated
  want = call(2.0, x, y)
  np.testing.assert_array_equal(call(2.0, sharding.ProcessRows(x, 16), y), want)
  with pytest.raises(ValueError, match="not a multiple of 8"):
    call(2.0, sharding.ProcessRows(x[:6], 6), y)
  assert sharding.union_over_processes([5, 1, 5, 3]).tolist() == [1, 3, 5]
  assert sharding.union_over_processes([]).tolist() == []
