"""Test set-up: 8 simulated CPU devices, set before JAX initialises."""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

# Grain's multiprocessing paths read absl flags; tests do not run under absl.app.run.
flags.FLAGS.mark_as_parsed()
