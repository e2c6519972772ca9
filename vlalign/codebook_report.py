r"""What the codes of a codebook stand for: the images and captions nearest to the most used codes.

  python -m vlalign.codebook_report --config=configs/codis.py:demo --workdir=workdirs/codis_demo \
    [--step=N] [--split=test] [--codes=12] [--per_code=6]

Restores the parameters of a checkpoint (the newest that reads, or --step), assigns every image and
caption of the split to its nearest centre, and writes `<workdir>/codebook/step<N>/index.md`: for
each of the `--codes` most used codes, its usage and the `--per_code` images (thumbnails, PNG next
to the page) and captions closest to the centre. It only reads the checkpoints, like the eval
binary, and needs a config whose method has a codebook (`codis`).
"""

from typing import Any

import numpy as np
from absl import flags, logging
from ml_collections import config_flags

from vlalign import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file of the run.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest that reads).")
_SPLIT = flags.DEFINE_string("split", "test", "Split whose images and captions are shown.")
_CODES = flags.DEFINE_integer("codes", 12, "How many of the most used codes to show.")
_PER_CODE = flags.DEFINE_integer("per_code", 6, "Images and captions shown per code.")
flags.mark_flags_as_required(["config", "workdir"])

THUMBNAIL = 96


def nearest(scores: np.ndarray, members: np.ndarray, count: int) -> np.ndarray:
  """Indices of the `count` highest `scores` among `members` (indices), best first."""
  if len(members) == 0:
    return members
  order = np.argsort(-scores[members], kind="stable")
  return members[order[:count]]


def code_page(
  codebook: np.ndarray,
  image_emb: np.ndarray,
  text_emb: np.ndarray,
  captions: list[str],
  num_codes: int,
  per_code: int,
) -> list[dict[str, Any]]:
  """The most used codes, each `{code, images, texts, image_ids, captions}` (the nearest images
  and distinct captions), most used first.

    Args:
      codebook: `[K, E]` unit centres.
      image_emb: `[N_img, E]`, text_emb `[N_txt, E]` unit embeddings of the split.
      captions: the `N_txt` caption strings.
      num_codes: how many codes; per_code: how many members of each to show.
  """
  image_scores, text_scores = image_emb @ codebook.T, text_emb @ codebook.T
  image_codes, text_codes = image_scores.argmax(1), text_scores.argmax(1)
  usage = np.bincount(np.concatenate([image_codes, text_codes]), minlength=len(codebook))
  entries = []
  for code in np.argsort(-usage, kind="stable")[:num_codes]:
    if usage[code] == 0:
      break
    image_ids = nearest(image_scores[:, code], np.flatnonzero(image_codes == code), per_code)
    members = np.flatnonzero(text_codes == code)
    distinct = []  # the nearest distinct captions (many images share a caption)
    for i in nearest(text_scores[:, code], members, len(members)):
      if captions[i] not in distinct:
        distinct.append(captions[i])
      if len(distinct) == per_code:
        break
    entries.append(
      {
        "code": int(code),
        "images": int(np.sum(image_codes == code)),
        "texts": int(np.sum(text_codes == code)),
        "image_ids": [int(i) for i in image_ids],
        "captions": distinct,
      }
    )
  return entries


def write_report(entries, images: list[np.ndarray], out_dir, title: str) -> str:
  """Writes the thumbnails and `index.md` into `out_dir`; returns the page's path."""
  import io

  from PIL import Image

  from vlalign import workdir as workdir_lib

  lines = [f"# {title}", "", "| code | images | captions | nearest images | nearest captions |"]
  lines.append("|---:|---:|---:|---|---|")
  for entry in entries:
    cells = []
    for i in entry["image_ids"]:
      name = f"code{entry['code']}_image{i}.png"
      buffer = io.BytesIO()
      Image.fromarray(images[i]).resize((THUMBNAIL, THUMBNAIL)).save(buffer, format="PNG")
      workdir_lib.write_bytes(out_dir / name, buffer.getvalue())
      cells.append(f"![image {i}]({name})")
    texts = "<br>".join(c.replace("|", "/") for c in entry["captions"])
    lines.append(
      f"| {entry['code']} | {entry['images']} | {entry['texts']} | {' '.join(cells)} | {texts} |"
    )
  page = out_dir / "index.md"
  workdir_lib.write_text(page, "\n".join(lines) + "\n")
  return str(page)


def report(config, workdir: str, step: int | None, split: str, codes: int, per_code: int) -> str:
  """Builds the page for a checkpoint of `workdir`; returns its path."""
  import jax

  from vlalign import checkpoint as ckpt_lib
  from vlalign import sharding, trainer
  from vlalign import workdir as workdir_lib
  from vlalign.data import pipeline
  from vlalign.errors import ConfigError
  from vlalign.evaluation.retrieval import embed_in_batches

  root = workdir_lib.as_path(workdir)
  ckpt_lib.check_run_checkpoints(root, step)  # before the (slower) model build
  setup = trainer.build(config)
  fns = setup.method.predict_fns()
  if "codebook" not in fns:
    raise ConfigError(f"method {config.method!r} has no codebook; use a 'codis' config")
  step, params = ckpt_lib.restore_run_params(root, setup.abstract_state.params, step)
  predict = {k: sharding.host_fn(fns[k], setup.mesh) for k in ("encode_image", "encode_text")}
  data = pipeline.make_eval_data(config.data, setup.tokenizer, split)
  source = pipeline.make_source(config.data, split)
  with jax.set_mesh(setup.mesh):
    batch = max(sharding.num_batch_shards(setup.mesh), 64)
    image_emb = embed_in_batches(predict["encode_image"], params, (data["images"],), batch)
    text_emb = embed_in_batches(
      predict["encode_text"], params, (data["text_ids"], data["text_mask"]), batch
    )
    codebook = np.asarray(jax.device_get(jax.jit(fns["codebook"])(params)), np.float32)
  examples = [source[i] for i in range(len(source))]
  captions = [c for ex in examples for c in ex["captions"]]
  entries = code_page(codebook, image_emb, text_emb, captions, codes, per_code)
  out_dir = root / "codebook" / f"step{step}"
  title = f"Codebook of {config.get('name', '')} at step {step}: the {len(entries)} most used codes"
  title += f" on the {split} split ({len(codebook)} codes)"
  return write_report(entries, [ex["image"] for ex in examples], out_dir, title)


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {argv[1:]}")
  config = cli.config_value(_CONFIG)
  path = report(config, _WORKDIR.value, _STEP.value, _SPLIT.value, _CODES.value, _PER_CODE.value)
  logging.info("wrote %s", path)
  print(f"wrote {path}")


if __name__ == "__main__":
  cli.run(main)
