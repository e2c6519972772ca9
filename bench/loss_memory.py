r"""Per-device memory of the compiled contrastive losses, dense against chunked (ring).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 PYTHONPATH=. \
    .venv/bin/python bench/loss_memory.py --per_device_batch=1024,2048,4096,8192 --devices=8,4

Lowers and compiles only the loss and its gradient, `value_and_grad` of `itc` / `siglip` w.r.t.
`img/emb`, `txt/emb` (`[B, E]` float32, split over the devices' batch axes, E the CLIP full
config's `model.embed_dim`), `logit_scale` (and `logit_bias`), under `jax.set_mesh` as the trainer
runs it, and prints XLA's memory analysis per device (nothing is allocated: the inputs are
abstract). Each `--devices` entry is a data-parallel mesh over the first that many simulated
devices, so one per-device batch on 8 and on 4 devices gives two global batches at the same
per-device batch. The figures are those of the CPU program, a lower bound of what an accelerator
needs for the same sharding. `--time_runs=5` also runs each loss on random embeddings (small
batches only on a CPU: that allocates the dense logits).
"""

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import clip
from vlalign import losses, sharding

_PER_DEVICE = flags.DEFINE_list("per_device_batch", ["4096", "8192"], "Pairs per device.")
_DEVICES = flags.DEFINE_list("devices", ["8"], "Mesh sizes (the first N simulated devices).")
_LOSSES = flags.DEFINE_list("losses", ["itc"], "Losses: itc, siglip.")
_IMPLS = flags.DEFINE_list("impls", ["dense", "chunked"], "dense and/or chunked.")
_CHUNK = flags.DEFINE_integer("chunk_size", 1024, "chunk_size of the chunked losses.")
_TIME = flags.DEFINE_integer(
  "time_runs",
  0,
  "Also run each compiled loss on random unit embeddings this many times and print the median "
  "seconds (allocates the inputs and temporaries: keep the batches small on a CPU).",
)
_DENSE_MAX = flags.DEFINE_integer(
  "dense_max_batch", 1 << 30, "Skip the dense loss above this global batch (slow CPU compiles)."
)

MIB = 1 << 20


def compile_loss(name: str, impl: str, per_device: int, num_devices: int, embed_dim: int):
  """`(memory analysis, compile seconds, run seconds or None)` of the jitted loss and gradient on
  a data-parallel mesh over the first `num_devices` devices."""
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1}, jax.devices()[:num_devices])
  rows = NamedSharding(mesh, P(sharding.BATCH_AXES))
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(mesh))
  emb = jax.ShapeDtypeStruct((per_device * num_devices, embed_dim), jnp.float32, sharding=rows)
  outputs = {"img/emb": emb, "txt/emb": emb, "logit_scale": scalar}
  if name == "siglip":
    outputs["logit_bias"] = scalar
  kwargs = {"chunked": True, "chunk_size": _CHUNK.value} if impl == "chunked" else {}
  fn = losses.get(name)
  # Gradients split like the embeddings (as the train step consumes them), the rest replicated.
  grad_shardings = jax.tree.map(lambda x: x.sharding, outputs)
  step = jax.jit(
    jax.value_and_grad(lambda o: fn(o, losses.context(), **kwargs), has_aux=True),
    out_shardings=(sharding.replicated(mesh), grad_shardings),
  )
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = step.lower(outputs).compile()
  seconds = time.perf_counter() - start
  return compiled.memory_analysis(), seconds, _run_time(compiled, outputs)


def _run_time(compiled: Any, abstract: dict[str, jax.ShapeDtypeStruct]) -> float | None:
  """Median seconds of `--time_runs` calls of `compiled` on random inputs, None without."""
  if not _TIME.value:
    return None
  keys = jax.random.split(jax.random.key(0), len(abstract))
  inputs = {}
  for key, (name, spec) in zip(keys, abstract.items(), strict=True):
    x = jax.random.normal(key, spec.shape, spec.dtype)
    x = x / jnp.linalg.norm(x, axis=-1, keepdims=True) if x.ndim else x
    inputs[name] = jax.device_put(x, spec.sharding)
  jax.block_until_ready(compiled(inputs))
  times = []
  for _ in range(_TIME.value):
    start = time.perf_counter()
    jax.block_until_ready(compiled(inputs))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main(argv):
  del argv
  embed_dim = clip.get_config("full").model.embed_dim
  print(
    f"{jax.device_count()} simulated {jax.devices()[0].platform} devices, E = {embed_dim}, "
    f"chunk_size {_CHUNK.value}; MiB per device"
  )
  print(
    "| loss | form | devices | per-device batch | global batch | temp | arguments | outputs | "
    "compile (s) |" + (" run (s) |" if _TIME.value else "")
  )
  print("|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if _TIME.value else ""))
  for name in _LOSSES.value:
    for per_device in map(int, _PER_DEVICE.value):
      for num_devices in map(int, _DEVICES.value):
        for impl in _IMPLS.value:
          global_batch = per_device * num_devices
          if impl == "dense" and global_batch > _DENSE_MAX.value:
            continue
          mem, seconds, run = compile_loss(name, impl, per_device, num_devices, embed_dim)
          print(
            f"| {name} | {impl} | {num_devices} | {per_device:,} | {global_batch:,} | "
            f"{mem.temp_size_in_bytes / MIB:,.1f} | {mem.argument_size_in_bytes / MIB:,.1f} | "
            f"{mem.output_size_in_bytes / MIB:,.1f} | {seconds:.1f} |"
            + (f" {run:.3f} |" if run is not None else ""),
            flush=True,
          )
  print("one [B/D, B] float32 dense logits buffer per device, MiB: B/D * B * 4 / 2**20")
  print(f"one [B/D, chunk] float32 block per device, MiB: B/D * {_CHUNK.value} * 4 / 2**20")


if __name__ == "__main__":
  app.run(main)
