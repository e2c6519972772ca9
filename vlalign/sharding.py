"""Device mesh and shardings: batch over ('data', 'fsdp'), parameters fully sharded over 'fsdp'.

The parameter rule is shape-based (as big_vision's `fsdp` strategy), so it needs no annotations
in the models and applies unchanged to optimizer states, EMA teachers and queues: each array of at
least `min_size` elements is split along its largest dimension that the 'fsdp' axis divides; every
other array is replicated.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vlalign.errors import ConfigError

BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_config: Any, devices: list[jax.Device] | None = None) -> Mesh:
  """A `('data', 'fsdp')` mesh. One of the two sizes may be -1 (= all remaining devices).

  Args:
    mesh_config: has `data` and `fsdp` ints, e.g. `{data: -1, fsdp: 1}`.
    devices: defaults to `jax.devices()`.
  """
  devices = list(devices if devices is not None else jax.devices())
  sizes = [int(mesh_config.get("data", -1)), int(mesh_config.get("fsdp", 1))]
  n = len(devices)
  if sizes.count(-1) > 1:
    raise ConfigError(f"at most one mesh axis may be -1, got data={sizes[0]} fsdp={sizes[1]}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if known <= 0 or n % known:
    raise ConfigError(f"mesh data={sizes[0]} fsdp={sizes[1]} does not fit {n} devices")
  sizes = [n // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != n:
    raise ConfigError(f"mesh data={sizes[0]} x fsdp={sizes[1]} != {n} devices")
  grid = np.array(devices).reshape(sizes)
  return Mesh(grid, BATCH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def num_batch_shards(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int = 2**14) -> P:
  """PartitionSpec putting the largest 'fsdp'-divisible dimension of `shape` on 'fsdp'."""
  if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
  """NamedShardings for every leaf of a (abstract) state pytree, by the fsdp rule."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(
    lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp)), abstract_state
  )


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
  """Clear error when the global batch cannot be split evenly over the devices and processes."""
  shards = num_batch_shards(mesh)
  if global_batch_size % shards:
    raise ConfigError(
      f"batch_size={global_batch_size} is not divisible by the {shards} devices of the mesh "
      f"{dict(mesh.shape)}; use a multiple of {shards}"
    )
  if global_batch_size % jax.process_count():
    raise ConfigError(
      f"batch_size={global_batch_size} is not divisible by {jax.process_count()} processes"
    )


def process_rows(mesh: Mesh, num_rows: int) -> np.ndarray:
  """The rows of a `[num_rows, ...]` array that this process's devices hold.

  For an array split by `batch_sharding(mesh)` these are the addressable devices' slices, in
  order; for `num_rows` not a multiple of `num_batch_shards(mesh)` (an array `host_fn` replicates)
  every row. One process: every row.

  Returns:
    `[n_local]` int64 sorted row indices (`np.arange(num_rows)` when this process holds all rows).
  """
  if jax.process_count() == 1 or num_rows % num_batch_shards(mesh):
    return np.arange(num_rows)
  held = np.zeros(num_rows, bool)
  for index in batch_sharding(mesh).addressable_devices_indices_map((num_rows,)).values():
    held[index[0]] = True
  return np.flatnonzero(held)


@dataclasses.dataclass(frozen=True)
class ProcessRows:
  """This process's part of a `[num_rows, ...]` host batch for `host_fn`: `local` holds the rows
  `process_rows(mesh, num_rows)`, in that order; the other processes give theirs."""

  local: np.ndarray
  num_rows: int


def host_fn(fn: Callable[..., Any], mesh: Mesh) -> Callable[..., Any]:
  """`fn(params, *arrays)` jitted on `mesh` for host callers: numpy in, numpy (pytrees) out.

  Array arguments are split over the devices along their leading axis when it divides the
  device count (else replicated); outputs come back replicated, then to every host. A numpy
  argument is the whole array, the same on every process; a `ProcessRows` argument holds only this
  process's rows of a batch split over the devices (each process gives its own; the global array
  is built with `jax.make_array_from_process_local_data`), so a caller that loads the batch
  itself (images decoded from files) loads only the rows its devices hold. The returned function
  has `process_rows(num_rows)` (`process_rows` on `mesh`): which rows those are.
  """
  jitted = jax.jit(fn, out_shardings=replicated(mesh))
  shards = num_batch_shards(mesh)

  def put(x: Any) -> jax.Array:
    if isinstance(x, ProcessRows):
      local = np.asarray(x.local)
      if x.num_rows % shards:
        raise ValueError(f"ProcessRows of {x.num_rows} rows: not a multiple of {shards} devices")
      global_shape = (x.num_rows, *local.shape[1:])
      return jax.make_array_from_process_local_data(batch_sharding(mesh), local, global_shape)
    x = np.asarray(x)
    target = batch_sharding(mesh) if len(x) % shards == 0 else replicated(mesh)
    return jax.device_put(x, target)

  def call(params: Any, *arrays: Any) -> Any:
    return jax.device_get(jitted(params, *(put(a) for a in arrays)))

  call.process_rows = lambda num_rows: process_rows(mesh, num_rows)
  return call


def rows_to_load(fn: Callable[..., Any], batch_size: int) -> np.ndarray | None:
  """The positions of a `[batch_size, ...]` batch this process loads for `fn`: those its devices
  hold, for a function that tells them (`process_rows`, as `host_fn` gives), or None for the
  whole batch (one process, or a plain function)."""
  fn_rows = getattr(fn, "process_rows", None)
  if fn_rows is None:
    return None
  positions = np.asarray(fn_rows(batch_size), np.int64)
  return None if len(positions) == batch_size else positions


def union_over_processes(indices: Any) -> np.ndarray:
  """The sorted union of every process's `indices` (int, possibly of different lengths); every
  process must call it. One process: `np.unique(indices)`, no communication.

  Args:
    indices: `[n_p]` non-negative ints of this process.

  Returns:
    `[n]` int64 sorted unique indices, the same on every process.
  """
  indices = np.unique(np.asarray(indices, np.int64).reshape(-1))
  if jax.process_count() == 1:
    return indices
  counts = multihost_utils.process_allgather(np.int32(len(indices)))
  padded = np.full(max(int(np.max(counts)), 1), -1, np.int32)  # Row indices fit in int32.
  padded[: len(indices)] = indices
  gathered = np.asarray(multihost_utils.process_allgather(padded))  # [P, max count]
  return np.unique(gathered[gathered >= 0]).astype(np.int64)


def owned_rows(rows: Any, num_rows: int) -> np.ndarray:
  """Of this process's `rows` (indices into `[num_rows]`), those that no process of lower index
  also has: when every process calls it with its own rows, each row that some process has is
  owned by exactly one, so per-row counts summed over the processes count every row once (also
  where a mesh puts a row on the devices of several processes). Every process must call it (a
  collective when there are several); one process: `np.unique(rows)`, no communication.

  Args:
    rows: `[n_p]` ints in `[0, num_rows)` of this process.
    num_rows: the size of the index space, the same on every process.

  Returns:
    `[n_owned]` int64 sorted unique indices, a subset of `rows`.
  """
  rows = np.unique(np.asarray(rows, np.int64).reshape(-1))
  if jax.process_count() == 1:
    return rows
  held = np.zeros(num_rows, np.int32)
  held[rows] = 1
  everyone = np.asarray(multihost_utils.process_allgather(held))  # [P, num_rows]
  first = np.argmax(everyone, axis=0)  # the lowest process holding each row
  return rows[first[rows] == jax.process_index()]


def sum_over_processes(array: Any) -> np.ndarray:
  """The elementwise sum of every process's integer `array` (the same shape on each) as int64,
  the same on every process. Exact: the values travel as two 31-bit halves, since JAX without
  x64 would narrow int64 to int32. Every process must call it (a collective when there are
  several); one process: the array as int64, no communication."""
  array = np.asarray(array)
  if not np.issubdtype(array.dtype, np.integer):
    raise TypeError(f"sum_over_processes sums integers; got {array.dtype}")
  array = array.astype(np.int64)
  if jax.process_count() == 1:
    return array
  halves = np.stack([array >> 31, array & (2**31 - 1)]).astype(np.int32)  # a = hi * 2^31 + lo
  gathered = np.asarray(multihost_utils.process_allgather(halves)).astype(np.int64)  # [P, 2, ...]
  return (gathered[:, 0] << 31).sum(axis=0) + gathered[:, 1].sum(axis=0)
