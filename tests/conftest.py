"""Test set-up: 8 simulated CPU devices, set before JAX initialises, and one persistent compilation
cache for the whole run."""

import os
import shutil
import tempfile

import pytest

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

# Grain's multiprocessing paths read absl flags; tests do not run under absl.app.run.
flags.FLAGS.mark_as_parsed()

# Many tests compile the same programs (the tiny configs' train steps, the evaluators' encoders), in
# different worker processes: the first compilation of each is written to a cache directory made
# for this run, the others read it (`perf.enable_compilation_cache`, the trainer's
# `--compilation_cache_dir`). The controller makes the directory before the xdist workers start, so
# they inherit it; it is deleted when the run ends. Subprocesses started by tests do not use it.
CACHE_ENV = "VLALIGN_TEST_COMPILATION_CACHE"
_OWNER = pytest.StashKey[bool]()  # set in the process that made the directory


def pytest_configure(config):
  from vlalign import perf  # noqa: PLC0415 (imports JAX: after XLA_FLAGS above)

  if not os.environ.get(CACHE_ENV):
    os.environ[CACHE_ENV] = tempfile.mkdtemp(prefix="vlalign-test-xla-cache-")
    config.stash[_OWNER] = True
  perf.enable_compilation_cache(os.environ[CACHE_ENV], min_compile_secs=0.5)


def pytest_unconfigure(config):
  if config.stash.get(_OWNER, False):
    shutil.rmtree(os.environ.pop(CACHE_ENV), ignore_errors=True)
