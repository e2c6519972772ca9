"""Test set-up: 8 simulated CPU devices and no LLVM optimisation, set before JAX initialises, one
persistent compilation cache for the whole run, and the binaries' lowering of random draws."""

import os
import shutil
import tempfile

import pytest

# The suite's time is mostly XLA CPU compilation of small programs that then run a few steps.
# `--xla_backend_optimization_level=0` skips LLVM's optimisation of the generated kernels (the HLO
# passes, fusion and SPMD partitioning still run): the tiny ALBEF step compiles in ~9 s instead of
# ~15 s. Results are the same programs' values, computed by less optimised kernels; speed figures
# come from `bench/`, which runs at the default level. Set XLA_FLAGS to override.
_TEST_XLA_FLAGS = {
  "--xla_force_host_platform_device_count": "8",
  "--xla_backend_optimization_level": "0",
}
_user_flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(
  [_user_flags]
  + [f"{name}={value}" for name, value in _TEST_XLA_FLAGS.items() if name not in _user_flags]
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
  perf.unroll_threefry_on_cpu()  # as the binaries do (vlalign.cli)


def pytest_unconfigure(config):
  if config.stash.get(_OWNER, False):
    shutil.rmtree(os.environ.pop(CACHE_ENV), ignore_errors=True)
