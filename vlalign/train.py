r"""Trains a model from a config file.

  python -m vlalign.train --config=configs/clip.py:demo --workdir=workdirs/clip_demo
  python -m vlalign.train --config=configs/clip.py:tiny --config.total_steps=20 --workdir=/tmp/w

Rerunning with the same --workdir resumes from its latest checkpoint. For several processes (a pod
or a Slurm job), pass --coordinator_address, --num_processes and --process_id, or set
--jax_distributed to let JAX detect them. SIGTERM, SIGINT (Ctrl-C) and SIGQUIT (Ctrl-\\) save a
checkpoint after the current step and stop (exit status 0 for SIGTERM, 130 / 131 for the others).
User errors (flags, config, paths, the workdir's state) print one line and exit with status 2.

On a GPU or TPU machine, --platform=gpu|tpu stops at once (naming the install line) when JAX did
not find that accelerator (requirements.txt installs the CPU jaxlib; see requirements-cuda.txt and
requirements-tpu.txt) instead of training on the host. The progress line and metrics.jsonl report
`perf/tflops_per_device` and `perf/mfu` against the device's bf16 peak (vlalign/perf.py; override
with --peak_tflops_per_device). --compilation_cache_dir keeps compiled steps across restarts.
--profile_steps=10,15 writes a jax.profiler trace of steps 10 to 15 into <workdir>/profile/
(`tensorboard --logdir=<workdir>/profile` with the profile plugin, or XProf).
"""

from absl import flags, logging
from ml_collections import config_flags

from vlalign import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/clip.py:demo.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and reports go.")
_DISTRIBUTED = flags.DEFINE_bool(
  "jax_distributed",
  False,
  "Call jax.distributed.initialize() with auto-detection (TPU pods, Slurm).",
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_DRY_RUN = flags.DEFINE_bool(
  "dry_run",
  False,
  "Build, lower and compile the train step on abstract inputs, print memory, exit.",
)
_OVERRIDE = flags.DEFINE_string(
  "override_config",
  None,
  "Train on in a workdir whose config.json differs from --config; results go to files tagged "
  "with this name and the workdir's existing checkpoints are never deleted.",
)
_PLATFORM = flags.DEFINE_enum(
  "platform",
  None,
  ["cpu", "gpu", "tpu"],
  "Stop with an error unless JAX runs on this platform (default: whatever JAX finds).",
)
_PEAK_TFLOPS = flags.DEFINE_float(
  "peak_tflops_per_device",
  None,
  "Peak TFLOP/s of one device for perf/mfu (default: the bf16 figure of known accelerators, a "
  "measured matmul on a CPU).",
)
_PROFILE_STEPS = flags.DEFINE_string(
  "profile_steps",
  None,
  "FIRST,LAST (or N): write a jax.profiler trace of train steps FIRST..LAST (1-based, inclusive) "
  "into <workdir>/profile/, for TensorBoard's profile plugin or XProf; skip the first few steps. "
  "A profiler failure is a warning, never the end of the run.",
)
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed() -> None:
  """Starts JAX's multi-process runtime when asked to by flags."""
  import jax

  if _COORDINATOR.value:
    jax.distributed.initialize(
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
    )
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {argv[1:]}")
  config = cli.config_value(_CONFIG)
  initialize_distributed()
  from vlalign import perf, trainer

  profile_steps = trainer.parse_profile_steps(_PROFILE_STEPS.value)
  logging.info(perf.describe_devices())
  perf.check_platform(_PLATFORM.value)
  if _DRY_RUN.value:
    setup = trainer.build(config)
    print(trainer.describe_params(setup.abstract_state.params, setup.frozen))
    for warning in setup.warnings:
      print(f"warning: {warning}")
    lowered = trainer.lower_step(setup)
    compiled = lowered.compile()
    memory = trainer.log_memory_analysis(compiled)
    print(f"compiled {config.get('name', '')}: per-device memory (MiB) {memory}")
    flops = trainer.step_flops(setup, lowered, compiled)
    if flops is not None:
      print(f"train step: {flops / 1e9:.4g} GFLOP per device")
    return
  trainer.train_and_evaluate(
    config, _WORKDIR.value, _OVERRIDE.value, _PEAK_TFLOPS.value, profile_steps=profile_steps
  )


if __name__ == "__main__":
  cli.run(main)
