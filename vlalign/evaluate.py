r"""Evaluates a checkpoint with the evaluators of its config.

  python -m vlalign.evaluate --config=configs/clip.py:demo --workdir=workdirs/clip_demo [--step=N]

Restores the parameters only (no optimizer state), runs every evaluator of `config.evals` and writes
`<workdir>/eval_step<N>.json` and `.md` (or under --output_dir).
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/clip.py:demo.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
_OUTPUT_DIR = flags.DEFINE_string(
  "output_dir", None, "Where to write the report (default: workdir)."
)
flags.mark_flags_as_required(["config", "workdir"])


def evaluate(config, workdir: str, step: int | None = None, output_dir: str | None = None):
  """Restores params of `step` (default latest) and runs `config.evals`.

  Returns `(step, {evaluator: {metric: value}}, (json_path, md_path))`.
  """
  import jax

  from vlalign import checkpoint as ckpt_lib
  from vlalign import trainer
  from vlalign import workdir as workdir_lib
  from vlalign.evaluation import report

  ckpt_dir = workdir_lib.as_path(workdir) / workdir_lib.CHECKPOINTS
  if not ckpt_dir.is_dir():
    raise FileNotFoundError(f"no checkpoints/ in {workdir}: train first, or check --workdir")
  ckpt = ckpt_lib.Checkpointer(str(ckpt_dir), async_save=False, create=False)
  steps = ckpt.all_steps()
  if not steps:
    raise FileNotFoundError(f"{ckpt_dir} holds no checkpoint")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise ValueError(f"no checkpoint for step {step} in {ckpt_dir}; available: {steps}")
  if not config.get("evals"):
    raise ValueError("config.evals is empty: nothing to evaluate")

  setup = trainer.build(config)
  params = ckpt.restore_params(step, setup.abstract_state.params)
  ckpt.close()

  evaluators = trainer.build_evaluators(setup)
  results = {}
  with jax.set_mesh(setup.mesh):
    for name, ev in evaluators.items():
      results[name] = {k: float(v) for k, v in ev.run(params).items()}
      logging.info("%s: %s", name, results[name])
  paths = None
  if jax.process_index() == 0:
    out = output_dir or workdir
    paths = report.write_report(results, out, step, header=f"{config.get('name', '')} {workdir}")
  return step, results, paths


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  step, _, paths = evaluate(_CONFIG.value, _WORKDIR.value, _STEP.value, _OUTPUT_DIR.value)
  if paths:
    from etils import epath

    print(epath.Path(paths[1]).read_text())
    print(f"step {step}: wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
  app.run(main)
