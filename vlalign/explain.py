r"""What a lexical model (LexVLA) sees in one image: its top words, and where each of them fires.

  python -m vlalign.explain --config=configs/lexvla.py:demo --workdir=workdirs/lexvla_demo \
    --out=DIR [--split=test --index=0 | --image=path.png] [--topk=10] [--maps=4] [--step=N]

Restores the parameters of a checkpoint of the run (the newest that reads, or --step), computes the
lexical vectors of one image, the `--index`-th of `--split` or the file `--image` (centre-cropped to
a square and resized to `data.image_size`), and writes (`<name>` = `<split><index>`, e.g.
`test0`, or the image file's stem):

* `DIR/explain_<name>.json`: `config`, `step`, `source`, `image_size`, `grid` (`g`: the image has
  `g x g` patches), `top_words` (the `--topk` highest positive entries of the image's vector, best
  first, each `{entry, id, word, score}`), `patches` (row-major, each `{row, col, words}` with the
  patch's 3 highest positive entries) and `maps` (the words drawn in the PNG);
* `DIR/explain_<name>.png`: the image, then for each of the `--maps` top words the per-patch score
  of that word upsampled bilinearly to the image, stretched from its minimum to its maximum over
  the image and blended over it, titled with the word and that maximum.

`--out` defaults to `<workdir>/explain`. It only reads the checkpoints, like the eval binary, and
needs a config whose method has lexical representations (prediction functions `lexical_patches`,
`lexicon_ids` and, if provided, `lexical_image`; without it the image vector is the maximum over
the patches). A missing workdir or checkpoint, an index out of range and an image file that is
missing or cannot be decoded are one-line errors.
"""

import io
import json
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import flags, logging
from ml_collections import config_flags

from vlalign import cli
from vlalign.errors import ConfigError, PathError
from vlalign.evaluation.lexical import grid_side, upsample_grid

PATCH_WORDS = 3  # Words listed per patch.
PANEL = 192  # Smallest side of a panel of the PNG in pixels (images are scaled by an integer).
TITLE = 16  # Height of the title strip above each panel.
GAP = 6  # Space around the panels.
ALPHA = (0.15, 0.7)  # Heat-map opacity at zero heat, and its increase up to full heat.
# Heat colours at 0, 0.5 and 1: blue, red, yellow.
_RAMP = np.array([(40, 40, 160), (230, 60, 40), (255, 240, 80)], np.float32)


# --- Pure parts ---------------------------------------------------------------------------------


def top_words(
  vector: np.ndarray,
  lexicon_ids: np.ndarray,
  decode: Callable[[Sequence[int]], str],
  count: int,
) -> list[dict[str, Any]]:
  """The `count` highest positive entries of one lexical vector, best first (fewer when fewer are
  positive; ties go to the lower entry).

  Args:
    vector: `[V]` lexical vector.
    lexicon_ids: `[V]` tokenizer id of each entry.
    decode: the tokenizer's `decode(ids) -> str`.
    count: how many entries at most.

  Returns:
    `[{entry, id, word, score}]`: the lexicon index, its tokenizer id, `decode([id])` and the value.
  """
  vector = np.asarray(vector, np.float32)
  out = []
  for entry in np.argsort(-vector, kind="stable")[:count].tolist():
    if not vector[entry] > 0:
      break
    token = int(lexicon_ids[entry])
    out.append(
      {"entry": entry, "id": token, "word": decode([token]), "score": float(vector[entry])}
    )
  return out


def explanation(
  image_lex: np.ndarray,
  patch_lex: np.ndarray,
  lexicon_ids: np.ndarray,
  decode: Callable[[Sequence[int]], str],
  topk: int,
  per_patch: int = PATCH_WORDS,
) -> dict[str, Any]:
  """The words of one image and of each of its patches.

  Args:
    image_lex: `[V]` the image's lexical vector.
    patch_lex: `[N, V]` the patches' vectors, `N = g * g` in row-major grid order.
    lexicon_ids: `[V]` tokenizer id of each entry.
    decode: the tokenizer's `decode(ids) -> str`.
    topk: words of the image.
    per_patch: words of each patch.

  Returns:
    `{grid: g, top_words: [...], patches: [{row, col, words: [...]}]}` (`top_words` entries).
  """
  patch_lex = np.asarray(patch_lex, np.float32)
  if patch_lex.ndim != 2 or len({patch_lex.shape[1], len(lexicon_ids), len(image_lex)}) != 1:
    raise ValueError(
      f"expected image [V], patches [N, V] and lexicon [V]; got {np.shape(image_lex)}, "
      f"{patch_lex.shape} and {np.shape(lexicon_ids)}"
    )
  side = grid_side(len(patch_lex))
  patches = [
    {
      "row": n // side,
      "col": n % side,
      "words": top_words(patch_lex[n], lexicon_ids, decode, per_patch),
    }
    for n in range(len(patch_lex))
  ]
  return {
    "grid": side,
    "top_words": top_words(image_lex, lexicon_ids, decode, topk),
    "patches": patches,
  }


def panel_side(image_size: int) -> int:
  """Side of a panel: the image scaled by the smallest integer that reaches `PANEL` pixels."""
  return image_size * max(1, math.ceil(PANEL / image_size))


def png_size(image_size: int, num_maps: int) -> tuple[int, int]:
  """`(width, height)` of `heatmap_png`'s picture of an `S x S` image with `num_maps` maps."""
  side = panel_side(image_size)
  return (num_maps + 1) * side + (num_maps + 2) * GAP, TITLE + side + 2 * GAP


def heat_colours(heat: np.ndarray) -> np.ndarray:
  """`[...]` heat in [0, 1] -> `[..., 3]` float32 RGB along the blue-red-yellow ramp."""
  heat = np.clip(np.asarray(heat, np.float32), 0.0, 1.0)[..., None] * (len(_RAMP) - 1)
  low = np.minimum(np.floor(heat).astype(np.int64), len(_RAMP) - 2)[..., 0]
  frac = heat - low[..., None]
  return (1.0 - frac) * _RAMP[low] + frac * _RAMP[low + 1]


def blend_heat(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
  """`image [S, S, 3]` uint8 with `heat [S, S]` in [0, 1] blended over it -> `[S, S, 3]` uint8."""
  alpha = (ALPHA[0] + ALPHA[1] * np.clip(heat, 0.0, 1.0))[..., None]
  out = (1.0 - alpha) * np.asarray(image, np.float32) + alpha * heat_colours(heat)
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def heatmap_png(image: np.ndarray, patch_scores: np.ndarray, words: Sequence[str]) -> bytes:
  """A row of panels as PNG bytes: the image, then one heat map per word.

  Each map is the word's per-patch score upsampled bilinearly to the image (`upsample_grid`),
  stretched from its minimum (cold) to its maximum (hot) over the image (a flat map stays cold:
  `elu1p` scores are positive everywhere, so dividing by the maximum alone would paint the whole
  image warm) and blended over it; its title is the word and the maximum score. The size is
  `png_size(S, M)`.

  Args:
    image: `[S, S, 3]` uint8.
    patch_scores: `[M, N]` (or `[N]` for one word) scores of the `N = g * g` patches, row-major.
    words: the `M` titles.
  """
  from PIL import Image, ImageDraw

  image = np.asarray(image)
  scores = np.atleast_2d(np.asarray(patch_scores, np.float32))
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[0] != image.shape[1]:
    raise ValueError(f"expected a square uint8 [S, S, 3] image; got {image.dtype} {image.shape}")
  if len(scores) != len(words):
    raise ValueError(f"{len(scores)} score maps for {len(words)} words")
  size, side = image.shape[0], panel_side(image.shape[0])
  grid = grid_side(scores.shape[1])
  maps = upsample_grid(scores.T.reshape(1, grid, grid, len(scores)), size)[0]  # [S, S, M]
  peaks = np.maximum(scores.max(axis=1), 0.0)
  floors = np.minimum(scores.min(axis=1), peaks)
  canvas = Image.new("RGB", png_size(size, len(words)), "white")
  draw = ImageDraw.Draw(canvas)
  panels = [("image", image)]
  for m, word in enumerate(words):
    spread = peaks[m] - floors[m]
    heat = (maps[..., m] - floors[m]) / spread if spread > 0 else np.zeros((size, size), np.float32)
    panels.append((f"{word} {peaks[m]:.3f}", blend_heat(image, heat)))
  max_chars = max(1, side // 6)
  for i, (title, pixels) in enumerate(panels):
    left = GAP + i * (side + GAP)
    draw.text((left, GAP), title[:max_chars], fill="black")
    panel = Image.fromarray(pixels).resize((side, side), Image.Resampling.NEAREST)
    canvas.paste(panel, (left, GAP + TITLE))
  buffer = io.BytesIO()
  canvas.save(buffer, format="PNG")
  return buffer.getvalue()


def map_scores(
  explained: dict[str, Any], patch_lex: np.ndarray, count: int
) -> tuple[np.ndarray, list[str]]:
  """`(scores [M, N], words [M])`: the per-patch scores of the first `M <= count` top words of
  `explained` (an `explanation` of the image whose patch vectors are `patch_lex [N, V]`)."""
  chosen = explained["top_words"][:count]
  entries = [w["entry"] for w in chosen]
  return np.asarray(patch_lex, np.float32)[:, entries].T, [w["word"] for w in chosen]


# --- Inputs -------------------------------------------------------------------------------------


def load_image(path: str, image_size: int) -> np.ndarray:
  """The image file at `path` as `[S, S, 3]` uint8: RGB, centre-cropped to a square, resized
  (bicubic) to `image_size`. PathError when it is missing or cannot be decoded."""
  from PIL import Image, UnidentifiedImageError

  from vlalign import workdir as workdir_lib

  location = workdir_lib.as_path(path)
  if not location.is_file():
    raise PathError(f"--image: no file {path}")
  try:
    picture = Image.open(io.BytesIO(location.read_bytes()))
    picture = picture.convert("RGB")
  except (UnidentifiedImageError, OSError, ValueError) as e:
    raise PathError(f"--image: cannot decode {path} as an image: {e}") from e
  width, height = picture.size
  crop = min(width, height)
  left, top = (width - crop) // 2, (height - crop) // 2
  picture = picture.crop((left, top, left + crop, top + crop))
  picture = picture.resize((image_size, image_size), Image.Resampling.BICUBIC)
  return np.asarray(picture, np.uint8)


def split_image(data_config: Any, split: str, index: int) -> np.ndarray:
  """The `[S, S, 3]` uint8 image `index` of `split`; ConfigError when the index is out of range."""
  from vlalign.data import pipeline

  source = pipeline.make_source(data_config, split)
  if not 0 <= index < len(source):
    raise ConfigError(
      f"--index={index} is out of range: the {split!r} split has {len(source)} images"
    )
  return np.asarray(source[index]["image"], np.uint8)


def output_name(split: str, index: int, image: str | None) -> str:
  """`<split><index>`, or the image file's stem with characters other than letters, digits, `_`
  and `-` replaced by `_`."""
  if image is None:
    return f"{split}{index}"
  stem = re.sub(r"\.[^./]*$", "", image.rstrip("/").rsplit("/", 1)[-1])
  return re.sub(r"[^A-Za-z0-9_-]", "_", stem) or "image"


# --- The command --------------------------------------------------------------------------------


def _lexical_vectors(setup: Any, params: Any, pixels: np.ndarray):
  """`(image_lex [V], patch_lex [N, V], lexicon_ids [V])` of one uint8 image."""
  import jax

  from vlalign import sharding
  from vlalign.data import transforms

  fns = setup.method.predict_fns()
  missing = [f for f in ("lexical_patches", "lexicon_ids") if f not in fns]
  if missing:
    raise ConfigError(
      f"method {setup.config.method!r} has no lexical representations (it lacks the prediction "
      f"functions {missing}); use a 'lexvla' config"
    )
  images = transforms.normalize_image(pixels[None])
  with jax.set_mesh(setup.mesh):
    call = lambda name, *arrays: sharding.host_fn(fns[name], setup.mesh)(params, *arrays)
    patch_lex = np.asarray(call("lexical_patches", images), np.float32)[0]
    if "lexical_image" in fns:
      image_lex = np.asarray(call("lexical_image", images), np.float32)[0]
    else:
      image_lex = patch_lex.max(axis=0)
    lexicon_ids = np.asarray(call("lexicon_ids")).astype(np.int64)
  return image_lex, patch_lex, lexicon_ids


def explain(
  config: Any,
  workdir: str,
  out: str | None = None,
  *,
  split: str = "test",
  index: int = 0,
  image: str | None = None,
  topk: int = 10,
  maps: int = 4,
  step: int | None = None,
) -> tuple[str, str]:
  """Explains one image with a checkpoint of `workdir` (see the module docstring).

  Args:
    config: the run's config.
    workdir: the run's workdir (holding checkpoints/).
    out: output directory; None: `<workdir>/explain`.
    split: split of the image when `image` is None.
    index: index of the image in `split`.
    image: path of an image file to explain instead.
    topk: words of the whole image.
    maps: top words drawn as heat maps.
    step: checkpoint step; None: the newest that reads.

  Returns:
    `(json path, png path)`.
  """
  from vlalign import checkpoint as ckpt_lib
  from vlalign import trainer
  from vlalign import workdir as workdir_lib

  if topk < 1 or maps < 0:
    raise ConfigError(f"--topk={topk} must be positive and --maps={maps} non-negative")
  root = workdir_lib.as_path(workdir)
  ckpt_lib.check_run_checkpoints(root, step)  # Cheap checks before the (slower) model build.
  image_size = int(config.data["image_size"])
  if image is None:
    pixels = split_image(config.data, split, index)
    source = {"split": split, "index": int(index)}
  else:
    pixels = load_image(image, image_size)
    source = {"image": str(image)}
  setup = trainer.build(config)
  step, params = ckpt_lib.restore_run_params(root, setup.abstract_state.params, step)
  image_lex, patch_lex, lexicon_ids = _lexical_vectors(setup, params, pixels)
  explained = explanation(image_lex, patch_lex, lexicon_ids, setup.tokenizer.decode, topk)
  scores, words = map_scores(explained, patch_lex, maps)
  name = output_name(split, index, image)
  out_dir = workdir_lib.as_path(out) if out else root / "explain"
  payload = {
    "config": config.get("name", ""),
    "step": int(step),
    "source": source,
    "image_size": image_size,
    **explained,
    "maps": words,
  }
  json_path, png_path = out_dir / f"explain_{name}.json", out_dir / f"explain_{name}.png"
  workdir_lib.write_text(json_path, json.dumps(payload, indent=1) + "\n")
  workdir_lib.write_bytes(png_path, heatmap_png(pixels, scores, words))
  return str(json_path), str(png_path)


def define_flags() -> dict[str, Any]:
  """The command's flags, defined only when it runs as a program, so that importing this module
  (tests, notebooks) never collides with another binary's `--config` / `--workdir`."""
  defined = dict(
    config=config_flags.DEFINE_config_file("config", None, "Config file of the run."),
    workdir=flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/."),
    out=flags.DEFINE_string("out", None, "Output directory (default: <workdir>/explain)."),
    step=flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest that reads)."),
    split=flags.DEFINE_string("split", "test", "Split of the image (with --index)."),
    index=flags.DEFINE_integer("index", 0, "Index of the image in --split."),
    image=flags.DEFINE_string("image", None, "An image file to explain instead of a split's one."),
    topk=flags.DEFINE_integer("topk", 10, "Words of the whole image listed in the JSON."),
    maps=flags.DEFINE_integer("maps", 4, "Top words drawn as heat maps in the PNG."),
  )
  flags.mark_flags_as_required(["config", "workdir"])
  return defined


def main(argv, defined: dict[str, Any]):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {argv[1:]}")
  value = {name: flag.value for name, flag in defined.items() if name != "config"}
  if value["image"] is not None and (flags.FLAGS["split"].present or flags.FLAGS["index"].present):
    cli.fail("give either --image or --split/--index, not both")
  config = cli.config_value(defined["config"])
  workdir, out = value.pop("workdir"), value.pop("out")
  paths = explain(config, workdir, out, **value)
  for path in paths:
    logging.info("wrote %s", path)
    print(f"wrote {path}")


if __name__ == "__main__":
  _DEFINED = define_flags()
  cli.run(lambda argv: main(argv, _DEFINED))
