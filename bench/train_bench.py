r"""Train-step throughput, MFU, compile time and memory of configs on this machine.

  PYTHONPATH=. python bench/train_bench.py --configs=configs/clip.py:demo,configs/tcl.py:demo
  PYTHONPATH=. python bench/train_bench.py --configs=configs/tcl.py:demo --steps=3 --rounds=9
  PYTHONPATH=. python bench/train_bench.py --config=configs/clip.py:demo --config.batch_size=128

Uses the real sharded step on synthetic device-resident batches, so it measures the model and the
step, not the input pipeline (see bench/data_bench.py for that). After `--warmup` untimed steps
(on a CPU the host allocator settles over the first few, see `perf.retain_host_memory`) it times
`--rounds` rounds of `--steps` steps. Where the device peak is measured (a CPU), each round
measures it again just before its steps, so that every round's MFU is a ratio of two speeds
measured side by side: a shared machine's speed drifts by 10-20% within a minute, and a peak
measured once at start-up against steps timed later mixes that drift into the MFU.

One table row per config: samples/s, step time and TFLOP/s per device of the median round, MFU
(XLA's FLOPs of the compiled step against the device's peak, `vlalign.perf`) as the median of the
rounds' MFUs with their range, the time to lower and compile the step, and the peak device memory:
XLA's estimate from the compiled step's memory analysis and, where the runtime reports it (GPU,
TPU), the measured peak. A line per config lists every round.
"""

import runpy
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from vlalign import cli, perf, sharding, testing, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "A config file (overrides allowed).")
_CONFIGS = flags.DEFINE_list("configs", [], "Config files path[:variant], one row each.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timed rounds (each after a new peak probe on a CPU).")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed steps after compiling, before the timed ones.")
_PEAK = flags.DEFINE_float("peak_tflops_per_device", None, "Device peak for the MFU column.")

HEADER = (
  "| config | devices | batch | samples/s | step (ms) | TFLOP/s/device | MFU, median (range) "
  "| compile (s) "
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


def bench(config, steps: int, rounds: int, peak: perf.Peak, warmup: int) -> dict:
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
  step_seconds, peaks = [], []
  with jax.set_mesh(setup.mesh):
    for _ in range(max(1, warmup)):
      state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    for _ in range(rounds):
      peaks.append(perf.remeasured(peak).tflops)
      start = time.perf_counter()
      for _ in range(steps):
        state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
      step_seconds.append((time.perf_counter() - start) / steps)
  return {
    "name": f"{config.get('name', '')}:{config.get('variant', '')}",
    "batch": int(config.batch_size),
    **perf.summarize_rounds(step_seconds, peaks, flops, int(config.batch_size)),
    "peaks": peaks,
    "gflop_per_step": flops / 1e9 if flops else None,
    "compile_s": compile_s,
    "compile_cached": cache.count > 0,
    "memory_mib": perf.peak_memory_mib(memory),
    "measured_mib": measured_peak_mib(),
  }


def _fmt(value, spec: str) -> str:
  return "n/a" if value is None else format(value, spec)


def describe_rounds(r: dict) -> str:
  """Every round's step time, and its MFU against the peak measured just before it."""
  cells = []
  for i, ms in enumerate(r["rounds_ms"]):
    cell = f"{ms:.1f} ms"
    if "rounds_mfu" in r:
      cell += f" / {1e3 * r['peaks'][i]:.0f} GFLOP/s = {100 * r['rounds_mfu'][i]:.1f}%"
    cells.append(cell)
  return "rounds: " + "; ".join(cells)


def row(r: dict) -> str:
  mfu = "n/a"
  if "mfu" in r:
    mfu = f"{100 * r['mfu']:.1f}% ({100 * r['mfu_min']:.1f}-{100 * r['mfu_max']:.1f})"
  compile_s = _fmt(r["compile_s"], ".1f") + (" (cached)" if r["compile_cached"] else "")
  cells = [
    r["name"],
    str(jax.device_count()),
    str(r["batch"]),
    _fmt(r["samples_per_s"], ".0f"),
    _fmt(r["step_ms"], ".1f"),
    _fmt(r.get("tflops_per_device"), ".4g"),
    mfu,
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
  if _STEPS.value < 1 or _ROUNDS.value < 1:
    raise app.UsageError(f"--steps={_STEPS.value} and --rounds={_ROUNDS.value} must be >= 1")
  print(perf.describe_devices())
  peak = perf.device_peak(_PEAK.value)
  again = "; measured again before each round" if peak.source == "measured" else ""
  print(f"device peak: {_fmt(peak.tflops, '.4g')} TFLOP/s per device ({peak.source}{again})")
  rows = []
  for config in configs:
    logging.info("benchmarking %s", config.get("name", ""))
    rows.append(bench(config, _STEPS.value, _ROUNDS.value, peak, _WARMUP.value))
  print(HEADER)
  print("|" + "---|" * HEADER.count(" | ") + "---|")
  for r in rows:
    print(row(r))
  for r in rows:
    print(f"{r['name']}: {_fmt(r['gflop_per_step'], '.4g')} GFLOP per step per device")
    print(f"{r['name']}: {describe_rounds(r)}")


if __name__ == "__main__":
  cli.run(main)  # the binaries' flags too: --retain_host_memory (on), --compilation_cache_dir
