r"""Evaluates a checkpoint with the evaluators of its config.

  python -m vlalign.evaluate --config=configs/clip.py:demo --workdir=workdirs/clip_demo [--step=N]

Restores the parameters only (no optimizer state), runs every evaluator of `config.evals` and writes
`<workdir>/eval_step<N>.json` and `.md` (or under --output_dir). It only reads the workdir's
checkpoints, so it may run while training goes on.

The workdir's `config.json` is the reference: a config that would evaluate differently (another
model, data or evaluator setting; optimizer and run-length fields do not count) is an error naming
the fields, unless --override_config=NAME is given, which writes `eval_step<N>.NAME.json` / `.md`
instead. Without --step, a damaged newest checkpoint is skipped (with a warning naming it) and the
newest one that reads is evaluated; with --step, that step or an error.
"""

from absl import flags, logging
from ml_collections import config_flags

from vlalign import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/clip.py:demo.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
_OUTPUT_DIR = flags.DEFINE_string(
  "output_dir", None, "Where to write the report (default: workdir)."
)
_OVERRIDE = flags.DEFINE_string(
  "override_config",
  None,
  "Evaluate with a config that differs from the workdir's config.json; the report goes to "
  "eval_step<N>.<NAME>.json/.md.",
)
flags.mark_flags_as_required(["config", "workdir"])


def evaluate(
  config,
  workdir: str,
  step: int | None = None,
  output_dir: str | None = None,
  override_tag: str | None = None,
):
  """Restores params of `step` (default: the newest readable) and runs `config.evals`.

  Returns `(step, {evaluator: {metric: value}}, (json_path, md_path))`.
  """
  import jax

  from vlalign import checkpoint as ckpt_lib
  from vlalign import trainer
  from vlalign import workdir as workdir_lib
  from vlalign.errors import ConfigError
  from vlalign.evaluation import report

  root = workdir_lib.as_path(workdir)
  tag = workdir_lib.check_tag(override_tag)
  ignore = workdir_lib.OPERATIONAL_FIELDS + workdir_lib.TRAINING_ONLY_FIELDS
  workdir_lib.check_config_matches(root, config, tag, ignore, "evaluate")
  if not config.get("evals"):
    raise ConfigError("config.evals is empty: nothing to evaluate")
  ckpt_lib.check_run_checkpoints(root, step)  # before the (slower) model build
  setup = trainer.build(config)
  step, params = ckpt_lib.restore_run_params(root, setup.abstract_state.params, step)

  evaluators = trainer.build_evaluators(setup, workdir_lib.as_path(output_dir or workdir))
  results = {}
  with jax.set_mesh(setup.mesh):
    for name, ev in evaluators.items():
      results[name] = {k: float(v) for k, v in ev.run(params, step=step).items()}
      logging.info("%s: %s", name, results[name])
  paths = None
  if jax.process_index() == 0:
    out = output_dir or root
    header = f"{config.get('name', '')} {root}"
    paths = report.write_report(results, out, step, header=header, tag=tag)
  return step, results, paths


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {argv[1:]}")
  config = cli.config_value(_CONFIG)
  step, _, paths = evaluate(config, _WORKDIR.value, _STEP.value, _OUTPUT_DIR.value, _OVERRIDE.value)
  if paths:
    from etils import epath

    print(epath.Path(paths[1]).read_text())
    print(f"step {step}: wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
  cli.run(main)
