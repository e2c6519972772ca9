"""Throughput accounting: FLOPs per step, device peaks, MFU, and what the accelerator is.

The FLOPs of a step are XLA's count for the compiled executable (`cost_analysis()`), per device:
an SPMD executable is the program of one device, so a step sharded over N devices reports 1/N of
the global FLOPs. Everything XLA executes counts (elementwise ops, the optimizer update, the
backward recomputation of `model.remat`), so this is the utilisation of the hardware, not of an
analytic "6 x parameters x tokens" model count.

    compiled = jitted.lower(*args).compile()
    flops = perf.step_flops(compiled)                      # per device, or None
    peak = perf.device_peak()                              # TFLOP/s per device, and its source
    tflops, mfu = perf.utilisation(flops, steps_per_s, peak.tflops)

The peak is, in order: an explicit override (`--peak_tflops_per_device`), the vendor's dense bf16
figure for the device kind (`PEAK_BF16_TFLOPS`), and on a CPU a float32 matmul measured once per
process. An accelerator the table does not know has no peak: MFU is then not reported.
"""

import ctypes
import functools
import math
import statistics
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vlalign.errors import UserError

# Dense (no 2:4 sparsity) bf16 peak per chip in TFLOP/s, by `jax.Device.device_kind` (lower case,
# exact: "tpu v5" is a v5p, "tpu v5 lite" a v5e). Sources: NVIDIA's datasheets (the H100/H200
# figure is half of the 1,979 quoted with sparsity; A100: 312 for SXM and PCIe), Google Cloud's
# TPU system-architecture pages ("peak compute per chip (bf16)"). JAX reports an H200 NVL (835)
# as "NVIDIA H200" too: pass --peak_tflops_per_device there.
PEAK_BF16_TFLOPS = {
  "nvidia h100 80gb hbm3": 989.0,  # H100 SXM5
  "nvidia h100 pcie": 756.0,
  "nvidia h200": 989.0,  # H200 SXM
  "nvidia a100-sxm4-40gb": 312.0,
  "nvidia a100-sxm4-80gb": 312.0,
  "nvidia a100-pcie-40gb": 312.0,
  "nvidia a100 80gb pcie": 312.0,
  "tpu v4": 275.0,
  "tpu v5 lite": 197.0,  # v5e
  "tpu v5e": 197.0,
  "tpu v5": 459.0,  # v5p
  "tpu v5p": 459.0,
  "tpu v6 lite": 918.0,  # v6e (Trillium)
  "tpu v6e": 918.0,
}

# What makes JAX run on each platform: its install line (the repository's requirement files) and
# what else to check.
INSTALL = {
  "gpu": "install JAX's CUDA build with `pip install -r requirements-cuda.txt` (requirements.txt "
  "has the CPU jaxlib only) and check that `nvidia-smi` lists the GPUs",
  "tpu": "install JAX's TPU build with `pip install -r requirements-tpu.txt` (requirements.txt "
  "has the CPU jaxlib only) on a TPU VM whose chips no other process holds",
  "cpu": "set JAX_PLATFORMS=cpu (or install with `pip install -r requirements.txt`)",
}


class Peak(NamedTuple):
  """A device's peak in TFLOP/s (None: unknown) and where the figure comes from."""

  tflops: float | None
  source: str  # "override", "table", "measured" or "unknown"


def step_flops(compiled: Any) -> float | None:
  """FLOPs of one call of a compiled executable, per device, from XLA's cost analysis; None where
  the backend reports none. `cost_analysis()` returns a dict, or (older JAX, some backends) a list
  of dicts, one per program: their FLOPs are summed."""
  try:
    analysis = compiled.cost_analysis()
  except Exception as e:  # noqa: BLE001 - not every backend implements it.
    logging.info("cost analysis unavailable: %s", e)
    return None
  if isinstance(analysis, dict):
    analysis = [analysis]
  flops = [float(a["flops"]) for a in analysis or () if a and a.get("flops") is not None]
  total = sum(flops)
  return total if flops and math.isfinite(total) and total > 0 else None


def table_peak_tflops(device_kind: str) -> float | None:
  """The dense bf16 peak of `device_kind` from `PEAK_BF16_TFLOPS`, or None."""
  return PEAK_BF16_TFLOPS.get(device_kind.strip().lower())


def probe_cpu_tflops(size: int = 2048, repeats: int = 5) -> float:
  """The host's float32 matmul throughput in TFLOP/s, measured now: a jitted
  `[size, size] @ [size, size]` on the first device, the fastest of `repeats` timed calls after
  one warm-up (about a second on 2 cores)."""
  matmul = jax.jit(jnp.matmul)
  a = jnp.ones((size, size), jnp.float32)
  b = jnp.full((size, size), 0.5, jnp.float32)
  matmul(a, b).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best / 1e12


@functools.cache
def measured_cpu_tflops(size: int = 2048, repeats: int = 5) -> float:
  """`probe_cpu_tflops`, measured once per process and logged."""
  tflops = probe_cpu_tflops(size, repeats)
  logging.info(
    "measured CPU peak: %.1f GFLOP/s (float32 %dx%d matmul, best of %d)",
    tflops * 1e3,
    size,
    size,
    repeats,
  )
  return tflops


def device_peak(override: float | None = None, device: Any = None) -> Peak:
  """The peak TFLOP/s of one device (default: `jax.devices()[0]`): `override` if given (> 0), the
  table's figure for its kind, or on a CPU the measured matmul throughput divided by the local
  device count (simulated CPU devices share the host's cores)."""
  if override is not None and override > 0:
    return Peak(float(override), "override")
  device = device if device is not None else jax.devices()[0]
  known = table_peak_tflops(device.device_kind)
  if known is not None:
    return Peak(known, "table")
  if device.platform == "cpu":
    return _measured_peak(measured_cpu_tflops())
  return Peak(None, "unknown")


def _measured_peak(host_tflops: float) -> Peak:
  """A host's measured TFLOP/s per local device: simulated CPU devices share its cores."""
  return Peak(host_tflops / max(jax.local_device_count(), 1), "measured")


def remeasured(peak: Peak) -> Peak:
  """`peak` measured again now if it was measured (a CPU's speed drifts with the load of the
  machine it shares); a table or override figure as it is. A benchmark that alternates this
  probe with timed steps gets ratios measured side by side."""
  return _measured_peak(probe_cpu_tflops()) if peak.source == "measured" else peak


def utilisation(
  flops_per_step: float | None, steps_per_s: float, peak_tflops: float | None
) -> dict[str, float]:
  """`{"tflops_per_device": achieved TFLOP/s, "mfu": achieved / peak}`, each present only when
  its inputs are known (`flops_per_step` per device, as `step_flops` gives it)."""
  if not flops_per_step or not math.isfinite(steps_per_s):
    return {}
  tflops = flops_per_step * steps_per_s / 1e12
  out = {"tflops_per_device": tflops}
  if peak_tflops:
    out["mfu"] = tflops / peak_tflops
  return out


def summarize_rounds(
  step_seconds: list[float], peaks: list[float | None], flops: float | None, batch: int
) -> dict:
  """A benchmark's figures from timed rounds: round i took `step_seconds[i]` per step against a
  device peak of `peaks[i]` TFLOP/s (None: unknown), `flops` per step per device, `batch` samples
  per step. Samples/s, step time and TFLOP/s are those of the median step time; MFU is the median
  of the rounds' own MFUs (each round against its own peak), with their range."""
  step_s = statistics.median(step_seconds)
  out = {
    "samples_per_s": batch / step_s,
    "step_ms": 1e3 * step_s,
    "rounds_ms": [1e3 * s for s in step_seconds],
    **utilisation(flops, 1 / step_s, None),
  }
  mfus = [utilisation(flops, 1 / s, p).get("mfu") for s, p in zip(step_seconds, peaks)]
  if mfus and None not in mfus:
    out.update(mfu=statistics.median(mfus), mfu_min=min(mfus), mfu_max=max(mfus), rounds_mfu=mfus)
  return out


class StepCost(NamedTuple):
  """What MFU reporting knows of a compiled train step."""

  flops_per_step: float | None  # per device
  peak: Peak


def step_cost(flops: float | None, peak_override: float | None = None) -> StepCost:
  """A step's FLOPs per device (`trainer.step_flops`) and the device peak, logged once; says once
  why MFU will not be reported when either is unknown."""
  peak = device_peak(peak_override)
  kind = jax.devices()[0].device_kind
  if flops is None:
    logging.warning("XLA reports no FLOPs for the train step on %s: MFU is not reported", kind)
  elif peak.tflops is None:
    logging.warning(
      "no known peak for device kind %r: MFU is not reported (pass --peak_tflops_per_device)", kind
    )
  else:
    logging.info(
      "train step: %.3g GFLOP per device; peak %.4g TFLOP/s per device (%s, %s)",
      flops / 1e9,
      peak.tflops,
      kind,
      peak.source,
    )
  return StepCost(flops, peak)


def describe_devices() -> str:
  """`"backend gpu (NVIDIA H200): 8 local / 16 global devices, process 0 of 2"`."""
  return (
    f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}): "
    f"{jax.local_device_count()} local / {jax.device_count()} global devices, "
    f"process {jax.process_index()} of {jax.process_count()}"
  )


def check_platform(requested: str | None, found: str | None = None) -> None:
  """Raises a UserError naming the install line when `requested` ("gpu", "tpu", "cpu"; empty or
  None: any) is not the platform JAX runs on (`found`, default `jax.default_backend()`). Without
  the accelerator's JAX build (requirements.txt pins the CPU jaxlib), JAX falls back to the CPU
  with only a warning; this makes a GPU or TPU job stop instead of training on the host."""
  if not requested:
    return
  requested = requested.lower()
  if requested not in INSTALL:
    raise UserError(f"--platform={requested}: choose one of {', '.join(sorted(INSTALL))}")
  found = found or jax.default_backend()
  if found != requested:
    raise UserError(
      f"--platform={requested} but JAX runs on {found} ({jax.devices()[0].device_kind}): "
      f"{INSTALL[requested]}"
    )


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def retain_host_memory() -> bool:
  """Makes glibc's malloc keep the memory a process frees, for its next allocations. Returns
  whether it could (False off glibc, e.g. macOS or musl: nothing changes).

  XLA on the CPU allocates each step's buffers (activations, gradients: hundreds of MB at the
  peer-bench size) and frees them when the step ends. By default glibc serves blocks above a
  threshold with fresh `mmap`s, gives them back at `free`, and its per-thread arenas return their
  free tops: every step then touches its memory for the first time again, ~100,000 page faults
  per step at the peer-bench size, ~20% of the step on 1 or 2 cores (docs/results.md, "Host
  memory"). Here: one arena, no `mmap` for large blocks, no trimming, so a step reuses the pages
  of the step before. The process keeps its peak host memory until it exits (as accelerator
  runtimes keep theirs; ~25% more resident memory at that size, constant over the run). Call
  before JAX creates its CPU client: a thread that allocated earlier keeps its own arena.
  """
  try:
    libc = ctypes.CDLL("libc.so.6")
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)
  except (OSError, AttributeError):
    return False


# Threefry-2x32's rotations, by round group (even groups, odd groups), and its key-schedule parity
# constant (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011).
_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_THREEFRY_PARITY = 0x1BD11BDA


def threefry2x32(
  key1: jax.Array, key2: jax.Array, x1: jax.Array, x2: jax.Array, unrolled: bool = True
) -> tuple[jax.Array, jax.Array]:
  """The Threefry-2x32 hash, the function of JAX's `threefry2x32_p`: uint32 key words broadcast
  against the uint32 counter words `x1`, `x2` (`[...]`). Returns the two hashed words, `[...]`
  each. `unrolled`: its 20 rounds as straight-line code; else a loop over its 5 round groups."""
  ks = (key1, key2, key1 ^ key2 ^ np.uint32(_THREEFRY_PARITY))

  def round_group(group, rotations, state):
    """One group of 4 rounds, then the key injection. `state`: the two words, then the key words
    to inject now, next and after that."""
    x1, x2, k_now, k_next, k_after = state
    for r in rotations:
      x1 = x1 + x2
      x2 = x1 ^ ((x2 << r) | (x2 >> (np.uint32(32) - r)))
    x1, x2 = x1 + k_now, x2 + k_next + (group + 1).astype(np.uint32)
    return x1, x2, k_next, k_after, k_now

  state = (x1 + ks[0], x2 + ks[1], ks[1], ks[2], ks[0])
  if unrolled:
    for group in range(5):
      rotations = np.asarray(_THREEFRY_ROTATIONS[group % 2], np.uint32)
      state = round_group(np.uint32(group), rotations, state)
  else:
    even, odd = (jnp.asarray(r, jnp.uint32) for r in _THREEFRY_ROTATIONS)
    state = jax.lax.fori_loop(
      0,
      5,
      lambda group, state: round_group(group, jnp.where(group % 2 == 0, even, odd), state),
      state,
    )
  return state[0], state[1]


def unroll_threefry_on_cpu(min_size: int = 2**14) -> None:
  """Lowers JAX's Threefry hash on the CPU as straight-line code for every call that hashes
  `min_size` counters or more, instead of a loop over its 5 round groups.

  Every `jax.random` call (dropout masks, MLM masking, negative sampling, `split`, `fold_in`)
  hashes its counters with Threefry-2x32. On the CPU JAX lowers the hash as a `while` loop (it
  compiles faster); XLA runs a loop's iterations one after another on one thread and copies the
  loop state between them. Written out, as JAX lowers it elsewhere, a call is one fused
  elementwise loop over its counters, split over the threads, but it compiles slower: with every
  call written out, the TCL demo step's compile went from ~15 s to ~23 s. So the small calls
  (`split`, `fold_in`, per-example draws) keep the loop; the large ones are dropout masks. On the
  TCL demo step (2 cores): ~5% faster (docs/results.md, "Random bits on the CPU"). The bits are
  the same: the same function of the same counters (tests/test_perf.py). Process-wide; call
  before the first lowering (functions lowered earlier keep their loops)."""
  from jax.extend import random as jex_random
  from jax.interpreters import mlir

  lowerings = {
    unrolled: mlir.lower_fun(
      functools.partial(threefry2x32, unrolled=unrolled), multiple_results=True
    )
    for unrolled in (False, True)
  }

  def lowering(ctx, *args):
    size = math.prod(ctx.avals_out[0].shape)  # symbolic under shape polymorphism: keep the loop
    return lowerings[isinstance(size, int) and size >= min_size](ctx, *args)

  mlir.register_lowering(jex_random.threefry2x32_p, lowering, platform="cpu")


def set_up_host(retain_memory: bool = True) -> None:
  """The process settings every binary applies at start-up (`vlalign.cli`), before JAX creates
  its CPU client and compiles: glibc keeps freed memory when `retain_memory`
  (`retain_host_memory`), and large Threefry calls are written out on the CPU
  (`unroll_threefry_on_cpu`)."""
  if retain_memory and not retain_host_memory():
    logging.info("host memory not retained: not glibc, the allocator keeps its defaults")
  unroll_threefry_on_cpu()


CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


def enable_compilation_cache(path: str, min_compile_secs: float | None = None) -> None:
  """Turns on JAX's persistent compilation cache in `path` (local or gs://; created when first
  written): executables whose compilation took at least `min_compile_secs` (JAX's default: 1 s)
  are written there, and a later process compiling the same program on the same devices and
  versions reads them instead of compiling. Call before the first compilation. The cache is
  trusted code: never point it at a directory others can write."""
  jax.config.update("jax_compilation_cache_dir", path)
  if min_compile_secs is not None:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
  logging.info("persistent compilation cache: %s", path)


class CacheHits:
  """Counts the persistent compilation cache's hits inside a `with` block (`.count`)."""

  def __init__(self):
    self.count = 0

  def _on_event(self, event: str, **kwargs) -> None:
    del kwargs
    if event == CACHE_HIT_EVENT:
      self.count += 1

  def __enter__(self) -> "CacheHits":
    jax.monitoring.register_event_listener(self._on_event)
    return self

  def __exit__(self, *exc) -> None:
    jax.monitoring.unregister_event_listener(self._on_event)


def peak_memory_mib(memory: dict[str, float]) -> float | None:
  """XLA's estimate of a compiled step's peak device memory (MiB) from `log_memory_analysis`'s
  dict: arguments + outputs + temporaries - what outputs alias (donated inputs)."""
  keys = ("argument_size_mib", "output_size_mib", "temp_size_mib")
  if not memory or any(k not in memory for k in keys):
    return None
  return sum(memory[k] for k in keys) - memory.get("alias_size_mib", 0.0)
