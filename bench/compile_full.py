r"""Lowers and compiles the train step of full-size configs; prints time and XLA's memory analysis.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 PYTHONPATH=. \
    .venv/bin/python bench/compile_full.py --configs=albef,tcl --batch_size=0

Nothing is allocated: the state and batch are abstract. `--batch_size=0` keeps each config's own
global batch; the memory figures are per device for the mesh of the simulated devices (bytes of
the compiled CPU program, a lower bound of what an accelerator needs for the same sharding).
"""

import importlib
import time

from absl import app, flags

from vlalign import trainer

_CONFIGS = flags.DEFINE_list("configs", ["albef", "tcl"], "Config modules under configs/.")
_VARIANT = flags.DEFINE_string("variant", "full", "Config variant.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Global batch override; 0 keeps the config's.")
_TOKENIZER = flags.DEFINE_string(
  "tokenizer_path",
  None,
  "Replaces data.tokenizer_path (e.g. an `hf:` one that cannot be fetched offline) by a local "
  "tokenizer of the same kind: the compiled step depends on the model's vocabulary size, not on "
  "the tokenizer's (e.g. tests/fixtures/tiny_spm/tokenizer.model for Llama 2's).",
)


def main(argv):
  del argv
  for name in _CONFIGS.value:
    config = importlib.import_module(f"configs.{name}").get_config(_VARIANT.value)
    if _TOKENIZER.value:
      config.data.tokenizer_path = _TOKENIZER.value
    if _BATCH.value:
      config.batch_size = _BATCH.value
      if "teacher" in config:
        queue = int(config.teacher.queue_size)
        config.teacher.queue_size = max(queue - queue % _BATCH.value, _BATCH.value)
    start = time.perf_counter()
    lowered = trainer.lower_step(trainer.build(config, data=False))
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    memory = trainer.log_memory_analysis(compiled)
    print(
      f"{name}:{_VARIANT.value} batch {config.batch_size}: lower {lowered_at - start:.1f}s, "
      f"compile {done - lowered_at:.1f}s; per device MiB: "
      + ", ".join(f"{k} {v:.0f}" for k, v in memory.items() if v)
    )


if __name__ == "__main__":
  app.run(main)
