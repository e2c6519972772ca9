r"""Trains a model from a config file.

  python -m vlalign.train --config=configs/clip.py:demo --workdir=workdirs/clip_demo
  python -m vlalign.train --config=configs/clip.py:tiny --config.total_steps=20 --workdir=/tmp/w

Rerunning with the same --workdir resumes from its latest checkpoint. For several processes (a pod
or a Slurm job), pass --coordinator_address, --num_processes and --process_id, or set
--jax_distributed to let JAX detect them.
"""

from absl import app, flags, logging
from ml_collections import config_flags

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
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  initialize_distributed()
  import jax

  from vlalign import trainer

  logging.info(
    "process %d/%d, %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  if _DRY_RUN.value:
    setup = trainer.build(_CONFIG.value)
    print(trainer.describe_params(setup.abstract_state.params, setup.frozen))
    memory = trainer.log_memory_analysis(trainer.lower_step(setup).compile())
    print(f"compiled {_CONFIG.value.get('name', '')}: per-device memory (MiB) {memory}")
    return
  trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
