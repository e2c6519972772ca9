r"""Exports a run's tower as a Hugging Face checkpoint (`model.safetensors` + `config.json`).

  python -m vlalign.export --config=configs/lit.py:demo --workdir=workdirs/lit_demo \
    --tower=text --out=exports/lit_text [--step=N]

Restores the parameters of `--step` (default: the newest readable checkpoint), takes the sub-tree
of the tower `config.model.<tower>` (`text_encoder` / `image_encoder`) and writes it in the
family's Hugging Face layout (`vlalign/weights/hf.py`; a `bert` tower loads with
`transformers.BertModel.from_pretrained(out)`). With a `tokenizer_json` tokenizer, its
`tokenizer.json` (and the special-token files beside it) are copied too. `--out` must not hold a
checkpoint already: nothing is overwritten.
"""

from absl import flags
from ml_collections import config_flags

from vlalign import cli

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file of the run, e.g. configs/lit.py:demo."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
_TOWER = flags.DEFINE_enum("tower", "text", ["text", "image"], "Which tower to export.")
_OUT = flags.DEFINE_string("out", None, "Directory to write (created; must not hold a checkpoint).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest readable).")
flags.mark_flags_as_required(["config", "workdir", "out"])

TOWER_PARAMS = {"text": "text_encoder", "image": "image_encoder"}
TOKENIZER_FILES = (
  "tokenizer.json",
  "special_tokens_map.json",
  "tokenizer_config.json",
  "vocab.txt",
)


def check_model_matches(root, config) -> None:
  """WorkdirError naming the `model.*` / `data.tokenizer*` fields in which `config` differs from
  the run's `config.json` (the only fields that decide what the exported tower is)."""
  import json

  from vlalign import workdir as workdir_lib
  from vlalign.errors import WorkdirError

  reference = workdir_lib.config_path(root)
  if not reference.exists():
    return
  diffs = [
    (field, a, b)
    for field, a, b in workdir_lib.config_differences(
      json.loads(reference.read_text()), workdir_lib.config_dict(config), ()
    )
    if field.startswith(("model.", "data.tokenizer"))
  ]
  if diffs:
    lines = "\n".join(f"  {field}: {a!r} (run) -> {b!r} (now)" for field, a, b in diffs[:20])
    raise WorkdirError(
      f"the config's model differs from the one the run in {root} was trained with "
      f"({reference}):\n{lines}\nExport with the run's config."
    )


def export(config, workdir: str, tower: str, out: str, step: int | None = None):
  """Writes the tower `tower` of the run in `workdir` to `out`; returns `(step, out path)`."""
  import jax

  from vlalign import checkpoint as ckpt_lib
  from vlalign import trainer
  from vlalign import workdir as workdir_lib
  from vlalign.data.tokenizer import JsonTokenizer
  from vlalign.errors import WorkdirError
  from vlalign.weights import hf

  root = workdir_lib.as_path(workdir)
  target = workdir_lib.as_path(out)
  if (target / hf.WEIGHTS_FILE).exists() or (target / hf.INDEX_FILE).exists():
    raise WorkdirError(f"{target} already holds a checkpoint; choose another --out")
  check_model_matches(root, config)
  ckpt_lib.check_run_checkpoints(root, step)  # before the (slower) model build
  setup = trainer.build(config)
  step, params = ckpt_lib.restore_run_params(root, setup.abstract_state.params, step)
  tower_config = config.model[tower].to_dict()
  sub_tree = jax.device_get(params["params"][TOWER_PARAMS[tower]])
  extra = {}
  if tower == "text":  # The ids the tokenizer of the run uses (CLIP pools at eos_token_id).
    tok = setup.tokenizer
    extra = dict(bos_token_id=tok.cls_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    extra = {k: v for k, v in extra.items() if v is not None}
  hf.export_tower(sub_tree, tower_config, target, f"model.{tower}", extra)
  if tower == "text" and isinstance(setup.tokenizer, JsonTokenizer):
    for name in TOKENIZER_FILES:
      source = setup.tokenizer.path.parent / name
      if source.exists():
        workdir_lib.write_bytes(target / name, source.read_bytes())
  return step, target


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {argv[1:]}")
  config = cli.config_value(_CONFIG)
  step, path = export(config, _WORKDIR.value, _TOWER.value, _OUT.value, _STEP.value)
  print(f"step {step}: wrote the {_TOWER.value} tower to {path}")


if __name__ == "__main__":
  cli.run(main)
