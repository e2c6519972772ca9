r"""Train-step throughput of a config on this machine (compile excluded).

  PYTHONPATH=. python bench/train_bench.py --config=configs/clip.py:demo --steps=30

Uses the real sharded step on synthetic device-resident batches, so it measures the model and the
step, not the input pipeline (see bench/data_bench.py for that).
"""

import time

import jax
from absl import app, flags
from ml_collections import config_flags

from vlalign import sharding, testing, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_STEPS = flags.DEFINE_integer("steps", 30, "Timed steps.")


def main(argv):
  del argv
  config = _CONFIG.value
  setup = trainer.build(config)
  state = trainer.fresh_state(setup, jax.random.PRNGKey(0))
  compiled = trainer.lower_step(setup).compile()
  batch = jax.device_put(testing.synthetic_batch(setup.spec), sharding.batch_sharding(setup.mesh))
  state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(_STEPS.value):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  seconds = time.perf_counter() - start
  steps_per_s = _STEPS.value / seconds
  print(
    f"{config.name}: {steps_per_s:.2f} steps/s, {steps_per_s * config.batch_size:.0f} samples/s "
    f"(batch {config.batch_size}, {jax.device_count()} devices)"
  )


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
