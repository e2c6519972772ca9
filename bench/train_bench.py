r"""Train-step throughput of a config on this machine (compile excluded).

  python bench/train_bench.py --config=configs/clip.py:demo --steps=30

Uses the real sharded step on synthetic device-resident batches, so it measures the model and the
step, not the input pipeline (see bench/data_bench.py for that).
"""

import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from vlalign import sharding, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_STEPS = flags.DEFINE_integer("steps", 30, "Timed steps.")


def main(argv):
  del argv
  config = _CONFIG.value
  setup = trainer.build(config)
  state = jax.jit(setup.init_fn, out_shardings=setup.state_shardings)(jax.random.PRNGKey(0))
  compiled = trainer.lower_step(setup).compile()
  rng = np.random.default_rng(0)
  batch = {}
  for key, spec in setup.spec.items():
    if np.issubdtype(spec.dtype, np.floating):
      value = rng.normal(size=spec.shape).astype(spec.dtype)
    elif key == "text_mask":
      value = np.ones(spec.shape, spec.dtype)
    else:
      value = rng.integers(0, 50, size=spec.shape).astype(spec.dtype)
    batch[key] = jax.device_put(value, sharding.batch_sharding(setup.mesh))
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
