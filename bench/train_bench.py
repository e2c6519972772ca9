r"""Train-step throughput, MFU, compile time and memory of configs on this machine.

  PYTHONPATH=. python bench/train_bench.py --configs=configs/clip.py:demo,configs/tcl.py:demo \
      --steps=5
  PYTHONPATH=. python bench/train_bench.py --config=configs/clip.py:demo --config.batch_size=128

Uses the real sharded step on synthetic device-resident batches, so it measures the model and the
step, not the input pipeline (see bench/data_bench.py for that). One table row per config:
samples/s and step time over `--steps` timed steps (after `--warmup` untimed ones: on a CPU the
host allocator settles over the first few steps, see `perf.retain_host_memory`), the achieved
TFLOP/s per device and MFU (XLA's FLOPs of the compiled step against the device's peak,
`vlalign.perf`), the time to lower and compile the step, and the peak device memory: XLA's
estimate from the compiled step's memory analysis and, where the runtime reports it (GPU, TPU),
the measured peak.
"""

import runpy
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from vlalign import cli, perf, sharding, testing, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "A config file (overrides allowed).")
_CONFIGS = flags.DEFINE_list("configs", [], "Config files path[:variant], one row each.")
_STEPS = flags.DEFINE_integer("steps", 30, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compiling, before the timed ones.")
_PEAK = flags.DEFINE_float("peak_tflops_per_device", None, "Device peak for the MFU column.")

HEADER = (
  "| config | devices | batch | samples/s | step (ms) | TFLOP/s/device | MFU | compile (s) "
  "| memory estimate (MiB) | measured peak (MiB) |"
)


def load_config(spec: str):
  """The config of `path[:variant]`."""
  path, _, variant = spec.partition(":")
  get_config = runpy.run_path(path)["get_config"]
  return get_config(variant) if variant else get_config()


def measured_peak_mib() -> float | None:
  """The runtime's peak bytes in use on the first device so far (None on a CPU)."""
  stats = jax.devices()[0].memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return stats["peak_bytes_in_use"] / 2**20


def bench(config, steps: int, peak: perf.Peak, warmup: int) -> dict:
  """Builds, compiles and times `config`'s train step; returns one row's numbers."""
  setup = trainer.build(config, data=False)
  state = trainer.fresh_state(setup, jax.random.PRNGKey(0))
  start = time.perf_counter()
  with perf.CacheHits() as cache:
    lowered = trainer.lower_step(setup)
    compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  memory = trainer.log_memory_analysis(compiled)
  flops = trainer.step_flops(setup, lowered, compiled)
  batch = jax.device_put(testing.synthetic_batch(setup.spec), sharding.batch_sharding(setup.mesh))
  with jax.set_mesh(setup.mesh):
    for _ in range(max(1, warmup)):
      state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
  seconds = time.perf_counter() - start
  steps_per_s = steps / seconds
  return {
    "name": f"{config.get('name', '')}:{config.get('variant', '')}",
    "batch": int(config.batch_size),
    "samples_per_s": steps_per_s * config.batch_size,
    "step_ms": 1e3 / steps_per_s,
    **perf.utilisation(flops, steps_per_s, peak.tflops),
    "gflop_per_step": flops / 1e9 if flops else None,
    "compile_s": compile_s,
    "compile_cached": cache.count > 0,
    "memory_mib": perf.peak_memory_mib(memory),
    "measured_mib": measured_peak_mib(),
  }


def _fmt(value, spec: str) -> str:
  return "n/a" if value is None else format(value, spec)


def row(r: dict) -> str:
  mfu = None if "mfu" not in r else 100 * r["mfu"]
  compile_s = _fmt(r["compile_s"], ".1f") + (" (cached)" if r["compile_cached"] else "")
  cells = [
    r["name"],
    str(jax.device_count()),
    str(r["batch"]),
    _fmt(r["samples_per_s"], ".0f"),
    _fmt(r["step_ms"], ".1f"),
    _fmt(r.get("tflops_per_device"), ".4g"),
    _fmt(mfu, ".1f") + ("%" if mfu is not None else ""),
    compile_s,
    _fmt(r["memory_mib"], ".0f"),
    _fmt(r["measured_mib"], ".0f"),
  ]
  return "| " + " | ".join(cells) + " |"


def main(argv):
  del argv
  configs = [load_config(spec) for spec in _CONFIGS.value]
  if _CONFIG.value is not None:
    configs.append(_CONFIG.value)
  if not configs:
    raise app.UsageError("give --config or --configs")
  print(perf.describe_devices())
  peak = perf.device_peak(_PEAK.value)
  print(f"device peak: {_fmt(peak.tflops, '.4g')} TFLOP/s per device ({peak.source})")
  rows = []
  for config in configs:
    logging.info("benchmarking %s", config.get("name", ""))
    rows.append(bench(config, _STEPS.value, peak, _WARMUP.value))
  print(HEADER)
  print("|" + "---|" * HEADER.count(" | ") + "---|")
  for r in rows:
    print(row(r))
  for r in rows:
    print(f"{r['name']}: {_fmt(r['gflop_per_step'], '.4g')} GFLOP per step per device")


if __name__ == "__main__":
  cli.run(main)  # the binaries' flags too: --retain_host_memory (on), --compilation_cache_dir
