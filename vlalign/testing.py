"""Helpers shared by the tests: run a function on sharded global arrays and on one device."""

import os
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def subprocess_env(devices: int = 8, **extra: str) -> dict[str, str]:
  """The environment for a binary started by a test: this process's environment and XLA flags
  (the suite's, set in tests/conftest.py) with `devices` simulated CPU devices, plus `extra`."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
  flags = f"{flags.strip()} --xla_force_host_platform_device_count={devices}".strip()
  return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", **extra}


def data_mesh(num_devices: int | None = None) -> Mesh:
  """A `('data', 'fsdp')` mesh over the first `num_devices` devices, all on 'data'."""
  devices = jax.devices()[: num_devices or jax.device_count()]
  return Mesh(np.array(devices).reshape(len(devices), 1), ("data", "fsdp"))


def shard_leading(tree: Any, mesh: Mesh) -> Any:
  """Places every array of `tree` on `mesh`, split along its leading (batch) axis.

  Scalars and arrays whose leading axis does not divide the mesh are replicated.
  """
  n = mesh.shape["data"] * mesh.shape["fsdp"]

  def place(x):
    x = np.asarray(x)
    spec = P(("data", "fsdp")) if x.ndim and x.shape[0] % n == 0 else P()
    return jax.device_put(x, NamedSharding(mesh, spec))

  return jax.tree.map(place, tree)


def run_sharded_and_single(fn: Callable[..., Any], *args: Any) -> tuple[Any, Any]:
  """Returns `(jit(fn)(*args) on 8-way sharded inputs, jit(fn)(*args) on one device)`.

  Use it to check that a loss (or its gradient) written on global arrays gives the same value
  whatever the device count.
  """
  mesh = data_mesh()
  single = jax.jit(fn)(*jax.device_put(args, jax.devices()[0]))
  sharded = jax.jit(fn)(*shard_leading(args, mesh))
  return jax.device_get(sharded), jax.device_get(single)


def synthetic_batch(spec: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
  """Random host inputs matching `pipeline.train_batch_spec`: normal images, all-real text of word
  ids (>= 5, past the special tokens), unique image ids."""
  rng = np.random.default_rng(seed)
  batch = {}
  for key, s in spec.items():
    if np.issubdtype(s.dtype, np.floating):
      batch[key] = rng.normal(size=s.shape).astype(s.dtype)
    elif key == "text_mask":
      batch[key] = np.ones(s.shape, s.dtype)
    elif key == "image_id":
      batch[key] = (np.arange(s.shape[0]) + 100 * seed).astype(s.dtype)
    else:
      batch[key] = rng.integers(5, 60, size=s.shape).astype(s.dtype)
  return batch


def loss_context(flat: dict[str, Any] | None = None, batch: dict[str, Any] | None = None, **fields):
  """A `LossContext` from one flat dict, the way tests write a teacher's state: keys `queue/*` go
  to `extras`, `alpha` to `schedules`, `mlm_ids` / `mlm_labels` to `inputs`, the rest to `teacher`
  (None when nothing is left). `fields` set other `LossContext` fields (e.g. `step`)."""
  from vlalign import losses

  teacher, extras, schedules, inputs = {}, {}, {}, {}
  for key, value in (flat or {}).items():
    if key.startswith("queue/"):
      extras[key] = value
    elif key == "alpha":
      schedules[key] = value
    elif key in ("mlm_ids", "mlm_labels"):
      inputs[key] = value
    else:
      teacher[key] = value
  return losses.context(
    batch=batch or {},
    teacher=teacher or None,
    extras=extras,
    schedules=schedules,
    inputs=inputs,
    **fields,
  )
