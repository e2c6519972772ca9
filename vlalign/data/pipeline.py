"""Input pipelines: the per-process Grain train iterator, eval data, and global batches.

`data_config` (`config.data`, an `ml_collections.ConfigDict` or a dict) fields: `name` ("shapes":
the embedded data, or "files": datasets on disk), `image_size`, `max_len`, `tokenizer`, `seed`,
`num_threads` (Grain read threads, default 0) and optionally `prefetch_buffer_size` (examples;
default 0 without threads, 4 batches with). For "shapes": `train_size` / `val_size` / `test_size`
(None = the dataset's default) and `seed` (which images the dataset holds). For "files": one
source spec per split used (`train`, `val`, `test`, or any name an evaluator's `split` gives; see
`vlalign.data.files`), `paths` (`{name: path}` substituted for `{name}` in the specs' strings, so a
command line sets `--config.data.paths.coco=/data/coco`), `resize` ("squash" / "center_crop"),
`decoder` ("pil" / "simplejpeg") and `eval_threads` (decoding threads of evaluation images, 8).
`max_len` is the token length of train captions; `eval_max_len` (default: `max_len`) that of every
evaluation text (retrieval captions, zero-shot prompts; `eval_text_len`), as ALBEF/TCL pre-train on
25 tokens and evaluate retrieval on 30. `check_text_lengths` checks both against the text tower.
Train-only fields:

- `augment`: None / absent (train images unchanged) or a dict for `augment.build_augment`, e.g.
  `dict(name="tcl")`; its `image_size` defaults to `image_size` and must equal it.
- `train_decode`: "original" (default) or "resized", for a file dataset (`name = "files"`) with a
  cropping `augment` recipe (`CROP_RECIPES`: crop_flip, albef, tcl). "original": each train image
  is decoded at its stored resolution and the recipe's random resized crop is cut from it and
  resized (bicubic) to `image_size`, as ALBEF/TCL's `RandomResizedCrop` crops the full-resolution
  photo; batches keep their fixed `[b, S, S, 3]`. "resized": the image is first decoded and resized
  to `image_size` like an evaluation image (`resize`), and the crop is cut from that (faster; the
  crops are blurrier and their aspect ratios follow the squashed image). The embedded data, other
  recipes, a custom `augment_fn` and every evaluation image keep the resized path.
- `train_decode_min_side`: None (default: exact full resolution) or an int B: with "original", a
  JPEG is decoded at the smallest power-of-two scale (1/2, 1/4, 1/8; libjpeg's DCT scaling, PIL's
  draft mode) that keeps both sides >= B, which makes decoding and cropping of large photos
  cheaper (other formats: full resolution). The crop box is still drawn on the stored size (the
  same draws as at full resolution) and cut from the drafted pixels at the same place (sub-pixel),
  so only the decoder's downscaling differs: with `crop_flip` at 256 px, a mean absolute
  difference of ~0.2 grey levels at B = 2 * image_size (drafting only photos >= 1024 px on both
  sides) and ~1-1.5 at B = image_size (which drafts a 1000x750 photo to 500x375, so the smallest
  crops are upsampled); `bench/decode_bench.py --crops`.
- `augment_views`: 1 (default) or 2. With 2, every train example also holds `image_aug`, a second
  draw of the same recipe on the same source image from an independent random stream (TCL's
  momentum-teacher view), normalised like `image`. It needs a random `augment` recipe (not
  "none" / "resize"), since the two views would otherwise be the same image. `image` is the same
  draw with 1 or 2 views. `train_batch_keys` gives the batch keys.

Train order: source -> this process's shard `[process_index::process_count]` -> shuffle -> repeat
forever -> random maps (caption, then view 2, then view 1) -> tokenise -> (read threads) -> drop
unreadable examples, counting them -> batch -> normalise. A webdataset train source of at least
`process_count` shards is divided by file instead: process p indexes and reads only the shards
`i % process_count == p` (`files.webdataset`), and its stream takes all of them (no record
slicing); shard counts that the process count does not divide leave processes with different
record counts, and since each process repeats its own part forever, records of the smaller parts
are drawn a little more often (a warning says so). A `Mixture` shards, shuffles and repeats
each source on its own seed and mixes the infinite streams by weight (Grain's `MapDataset.mix`).
Grain's `MapDataset.shuffle` uses the seed `seed + epoch` for each epoch of the repeated index
space and every random map has its own seed and is keyed by the element's position in the repeated
dataset, so every epoch has a new order and new random choices, all reproducible from `seed`. The
iterator is a Grain `DatasetIterator`: `get_state()` / `set_state()` and
`grain.checkpoint.CheckpointSave` work on it; the state holds the count of dropped examples, so a
resumed run continues the same stream with the same count.

Bad data: a file source flags an example it cannot use (missing, truncated or undecodable image,
no caption) with `valid = 0`; `DropInvalid` drops it before batching, so batches stay full and
later examples keep their place in the stream. Every batch carries `SKIPPED_KEY` (the count so
far), which the trainer logs as `data/skipped` and keeps out of the step.

Evaluation: `make_eval_data` of a file split tokenises the captions (any number per image) up
front and decodes images batch by batch (`ImageRows`), so host memory holds one batch of pixels
and the `[N, E]` embeddings, whatever the split's size. On several processes each process decodes
only the rows of each batch that its devices hold (`vlalign.evaluation.retrieval.embed_in_batches`
with `sharding.host_fn` functions); captions and embeddings are whole on every process.
"""

import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grain
import jax
import numpy as np
from absl import logging

from vlalign.data import augment, shapes
from vlalign.data import transforms as T
from vlalign.errors import ConfigError

# Recipes without randomness: two views of one of them would be the same image.
_DETERMINISTIC_RECIPES = ("none", "resize")
# Recipes that cut a random resized crop: on files they crop the stored image (`train_decode`).
CROP_RECIPES = ("crop_flip", "albef", "tcl")
TRAIN_DECODE_MODES = ("original", "resized")


def _field(data_config: Any, name: str, default: Any = None) -> Any:
  return data_config.get(name, default)


DATASETS = ("shapes", "files")
# Batch key of the number of examples this process's stream has dropped so far (unreadable images,
# empty captions); the trainer logs it as `data/skipped` and keeps it out of the step.
SKIPPED_KEY = "data_skipped"
# A stream that drops this many examples in a row stops with an error instead of spinning.
MAX_CONSECUTIVE_SKIPS = 1000


def _whole_size(source: Any) -> int:
  """The size of the whole split `source` belongs to: its length, times P for a source that
  holds one process's files of P (`process_split`; exact when the files divide evenly)."""
  split = getattr(source, "process_split", None)
  return len(source) * (1 if split is None else split[1])


class Mixture:
  """Several train sources drawn in proportion to `weights` (one stream; see `make_train_dataset`).

  Attributes:
    sources: the component sources.
    weights: one positive float per source (default: the sources' sizes, i.e. concatenation; a
      source that holds only this process's files of P processes (`process_split`) counts P
      times its size, so each process draws its records of every source at one rate).
  """

  def __init__(self, sources: list, weights: list[float] | None = None):
    if not sources:
      raise ConfigError("a mixture needs at least one source")
    weights = [_whole_size(s) for s in sources] if weights is None else weights
    weights = [float(w) for w in weights]
    if len(weights) != len(sources) or min(weights) <= 0:
      raise ConfigError(
        f"mixture weights {weights} must be one positive number per source ({len(sources)})"
      )
    self.sources, self.weights = list(sources), weights

  def __len__(self) -> int:
    return sum(len(s) for s in self.sources)

  def __repr__(self) -> str:
    return f"Mixture({self.sources}, weights={self.weights})"


def resolve_paths(value: Any, paths: dict, where: str) -> Any:
  """`value` (a spec: nested dicts, lists, strings) with every `{name}` in its strings replaced
  by `paths[name]` (`data.paths`); a placeholder whose path is unset is a ConfigError."""
  if isinstance(value, str):
    for name in re.findall(r"\{(\w+)\}", value):
      if not paths.get(name):
        raise ConfigError(
          f"data.paths.{name} is not set; {where} needs it ({value!r}): pass "
          f"--config.data.paths.{name}=/path/to/it"
        )
    return re.sub(r"\{(\w+)\}", lambda m: str(paths[m.group(1)]), value)
  if hasattr(value, "items"):
    return {k: resolve_paths(v, paths, f"{where}.{k}") for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [resolve_paths(v, paths, f"{where}[{i}]") for i, v in enumerate(value)]
  return value


def _files_source(data_config: Any, split: str, process: tuple[int, int], original: bool) -> Any:
  """The `data.name = "files"` source of `split` (`data.<split>`: a spec or a mixture) for
  process `process[0]` of `process[1]`; `original`: examples hold images at their stored
  resolution (`files.ImageOptions.original`)."""
  from vlalign.data import files  # Imported here: the embedded data needs no file readers.

  spec = _field(data_config, split)
  if not spec:
    raise ConfigError(
      f"data.{split} is not set: with data.name='files' each split used is a source spec, e.g. "
      f"dict(format='albef_json', ann='coco_{split}.json', image_root='/data/coco') "
      "(vlalign/data/files.py)"
    )
  paths = _field(data_config, "paths") or {}
  spec = resolve_paths(spec, dict(paths.items()), f"data.{split}")
  options = files.ImageOptions(
    size=int(data_config["image_size"]),
    resize=str(_field(data_config, "resize", "squash")),
    decoder=str(_field(data_config, "decoder", "pil")),
    original=original,
    original_min_side=_train_decode(data_config)[1] if original else None,
  )
  if "mixture" not in spec:
    return files.make_source(spec, options, *process)
  if split != "train":
    raise ConfigError(f"data.{split} is a mixture; only the train split can be one")
  weights = spec.get("weights")
  return Mixture(
    [files.make_source(s, options, *process) for s in spec["mixture"]], weights and list(weights)
  )


def _train_decode(data_config: Any) -> tuple[str, int | None]:
  """`(data.train_decode, data.train_decode_min_side)`, checked (ConfigError)."""
  mode = _field(data_config, "train_decode", "original")
  mode = "original" if mode is None else mode
  if mode not in TRAIN_DECODE_MODES:
    raise ConfigError(f"data.train_decode={mode!r} must be one of {TRAIN_DECODE_MODES}")
  min_side = _field(data_config, "train_decode_min_side")
  if min_side is not None and (
    isinstance(min_side, bool) or not isinstance(min_side, int | np.integer) or min_side < 1
  ):
    raise ConfigError(f"data.train_decode_min_side={min_side!r} must be None or an integer >= 1")
  return str(mode), None if min_side is None else int(min_side)


def _crops_originals(data_config: Any, augment_name: str | None) -> bool:
  """Whether train examples hold images at their stored resolution: files, a cropping recipe
  from `data.augment` and `data.train_decode = "original"`."""
  mode, _ = _train_decode(data_config)
  files_data = _field(data_config, "name", "shapes") == "files"
  return files_data and augment_name in CROP_RECIPES and mode == "original"


def make_source(
  data_config: Any,
  split: str,
  *,
  process_index: int | None = None,
  process_count: int | None = None,
  original_images: bool = False,
) -> Any:
  """The random-access source of `split` described by `data_config` (a `Mixture` for a mixed
  train split).

  Args:
    data_config: see the module docstring.
    split: a split name (`data.<split>` for files).
    process_index, process_count: given (both) for one process's train stream: a file source
      that divides by file among processes (webdataset) then holds only this process's part
      (its `process_split`). None: the whole split.
    original_images: file examples hold their images at stored resolution (train crops).
  """
  name = _field(data_config, "name", "shapes")
  if name == "files":
    process = (0, 1) if process_count is None else (int(process_index or 0), int(process_count))
    return _files_source(data_config, split, process, original_images)
  if name != "shapes":
    raise ConfigError(f"unknown dataset {name!r}; available: {list(DATASETS)}")
  return shapes.ShapesSource(
    split,
    num_examples=_field(data_config, f"{split}_size"),
    image_size=int(data_config["image_size"]),
    seed=int(_field(data_config, "seed", 0)),
  )


def split_size(data_config: Any, split: str) -> int:
  """Number of examples (images) of `split`, without loading them; ConfigError if it is empty."""
  return len(make_source(data_config, split))


def _captions_of(source: Any, index: int) -> tuple[str, ...]:
  """The captions of example `index`, without decoding its image where the source allows."""
  captions_of = getattr(source, "captions_of", None)
  return tuple(captions_of(index)) if captions_of else tuple(source[index]["captions"])


def _process_size(part: Any, process_index: int, process_count: int) -> int:
  """Examples of `part` in process `process_index`'s stream; a part sliced by record gets the
  smallest share of any process (`len // process_count`), so every process decides alike."""
  if getattr(part, "process_split", None) is not None:
    return len(part)
  return len(part) // process_count


def check_train_split(
  data_config: Any, global_batch_size: int, process_count: int, process_index: int | None = None
) -> None:
  """ConfigError when a process's shard of the train split cannot fill its batch (also checks
  `data.train_decode*`). Builds the train source as process `process_index` (default
  `jax.process_index()`) does, so a webdataset divided by file indexes only its shards."""
  _train_decode(data_config)
  process_index = jax.process_index() if process_index is None else int(process_index)
  source = make_source(
    data_config, "train", process_index=process_index, process_count=process_count
  )
  parts = source.sources if isinstance(source, Mixture) else [source]
  shard = sum(_process_size(part, process_index, process_count) for part in parts)
  local_batch = global_batch_size // process_count
  by_file = any(getattr(part, "process_split", None) is not None for part in parts)
  size = f"{len(source)} examples in this process's files" if by_file else str(len(source))
  if local_batch > shard:
    raise ConfigError(
      f"the per-process batch {local_batch} is larger than the {shard} train examples of a "
      f"process's shard (train split: {size}, {process_count} processes); use a smaller batch "
      "or a larger train_size"
    )


def eval_text_len(data_config: Any) -> int:
  """The token length `L` of evaluation texts: `data.eval_max_len`, or `data.max_len` when it is
  unset (None or absent)."""
  value = _field(data_config, "eval_max_len")
  field = "max_len" if value is None else "eval_max_len"
  value = data_config["max_len"] if value is None else value
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 2:
    raise ConfigError(f"data.{field}={value!r} must be an integer >= 2 ([CLS] / [EOS] and a token)")
  return int(value)


def check_text_lengths(data_config: Any, text_config: Any) -> None:
  """ConfigError when `data.max_len` or `data.eval_max_len` exceeds the text tower's position
  table (`model.text.max_len`, when the tower config sets it), before anything is traced: the
  tower refuses longer texts itself, but only once it runs on them (train batches when the model
  is initialised, evaluation texts at the first evaluation, possibly hours later)."""
  lengths = {"max_len": int(data_config["max_len"]), "eval_max_len": eval_text_len(data_config)}
  table = text_config.get("max_len") if text_config is not None else None
  if table is None:
    return
  for field, length in lengths.items():
    if length > int(table):
      raise ConfigError(
        f"data.{field}={length} exceeds model.text.max_len={table} (the text tower's position "
        f"table); shorten data.{field} or give the tower more positions"
      )


def truncated_fraction(
  data_config: Any, tokenizer: Any, split: str = "train", sample: int = 256
) -> tuple[float, int]:
  """`(fraction, longest)`: the fraction of the captions of the first `sample` examples of `split`
  that `data.max_len` cuts, and the longest one's length in tokens ([CLS] and [EOS] included).
  The train split is built as this process's stream builds it (a webdataset divided by file:
  this process's shards only)."""
  if split == "train":
    process = dict(process_index=jax.process_index(), process_count=jax.process_count())
  else:
    process = {}
  source = make_source(data_config, split, **process)
  source = source.sources[0] if isinstance(source, Mixture) else source
  captions = [c for i in range(min(sample, len(source))) for c in _captions_of(source, i)]
  captions = captions or [""]
  _, mask = tokenizer.encode_batch(captions, 1024)
  lengths = np.asarray(mask).sum(axis=1)
  return float(np.mean(lengths > int(data_config["max_len"]))), int(lengths.max())


def _stream_seed(seed: int, stream: int) -> int:
  """An independent 32-bit seed per random stream (Grain wants seeds in [0, 2**32))."""
  return int(np.random.SeedSequence([int(seed), stream]).generate_state(1)[0])


def _augment_config(data_config: Any) -> dict | None:
  """`data_config.augment` as a validated dict with `image_size` filled in, or None."""
  aug_config = _field(data_config, "augment")
  if aug_config is None:
    return None
  fields = dict(aug_config.to_dict() if hasattr(aug_config, "to_dict") else aug_config)
  image_size = int(data_config["image_size"])
  if fields.get("image_size") is None:
    fields["image_size"] = image_size
  size = augment.augment_config_from(fields).image_size  # Unknown recipe or field -> ValueError.
  if size not in (image_size, (image_size, image_size)):
    raise ConfigError(
      f"data.augment.image_size={fields['image_size']} differs from data.image_size={image_size}; "
      "the augmented image must have the size the model is built for (leave it out to inherit it)"
    )
  return fields


def _num_views(data_config: Any, augment_name: str | None) -> int:
  """`data_config.augment_views` checked against the augmentation (`augment_name`, None = none)."""
  views = _field(data_config, "augment_views", 1)
  views = 1 if views is None else views
  if isinstance(views, bool) or views not in (1, 2):
    raise ConfigError(f"data.augment_views={views!r} must be 1 or 2")
  if views == 2 and augment_name is None:
    raise ConfigError(
      "data.augment_views=2 needs an augmentation (data.augment, e.g. dict(name='tcl')): "
      "without one the two views would be the same image"
    )
  if views == 2 and augment_name in _DETERMINISTIC_RECIPES:
    raise ConfigError(
      f"data.augment_views=2 with the deterministic augmentation recipe {augment_name!r} gives "
      "two identical views; use a random recipe (crop_flip, albef, tcl)"
    )
  return int(views)


def _keys_for_views(num_views: int) -> tuple[str, ...]:
  if num_views == 1:
    return T.TRAIN_KEYS
  return (T.TRAIN_KEYS[0], T.SECOND_VIEW_KEY, *T.TRAIN_KEYS[1:])


def train_batch_keys(data_config: Any) -> tuple[str, ...]:
  """Keys of a train batch for `data_config`, in order.

  `("image", "text_ids", "text_mask", "image_id")` with one view and
  `("image", "image_aug", "text_ids", "text_mask", "image_id")` with `augment_views = 2`. Raises
  ValueError for an invalid `augment` / `augment_views` (see the module docstring).
  """
  aug_config = _augment_config(data_config)
  return _keys_for_views(
    _num_views(data_config, None if aug_config is None else aug_config["name"])
  )


def train_batch_spec(data_config: Any, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Global shapes and dtypes of a train batch of `batch_size` (docs/architecture.md, "Batch")."""
  size, length = int(data_config["image_size"]), int(data_config["max_len"])
  image = jax.ShapeDtypeStruct((batch_size, size, size, 3), np.float32)
  specs = {
    "image": image,
    T.SECOND_VIEW_KEY: image,
    "text_ids": jax.ShapeDtypeStruct((batch_size, length), np.int32),
    "text_mask": jax.ShapeDtypeStruct((batch_size, length), np.int32),
    "image_id": jax.ShapeDtypeStruct((batch_size,), np.int32),
  }
  return {key: specs[key] for key in train_batch_keys(data_config)}


def _resolve_augment(
  data_config: Any, augment_fn: T.AugmentFn | None
) -> tuple[T.AugmentFn | None, str | None]:
  """(augment function, its recipe name); an explicit `augment_fn` wins over `data.augment`."""
  if augment_fn is not None:
    return augment_fn, "a custom augment_fn"
  aug_config = _augment_config(data_config)
  if aug_config is None:
    return None, None
  return augment.build_augment(aug_config), aug_config["name"]


def make_train_dataset(
  data_config: Any,
  tokenizer: Any,
  *,
  global_batch_size: int,
  seed: int,
  process_index: int | None = None,
  process_count: int | None = None,
  augment_fn: T.AugmentFn | None = None,
) -> grain.IterDataset:
  """Infinite per-process train batches; `iter(...)` gives a checkpointable Grain iterator.

  Each batch: `image` float32 `[b, H, W, 3]` (normalised), with `augment_views = 2` also
  `image_aug` float32 `[b, H, W, 3]` (the second view), `text_ids` int32 `[b, L]`, `text_mask`
  int32 `[b, L]`, `image_id` int32 `[b]`, with `b = global_batch_size // process_count`; keys in
  the order of `train_batch_keys`.

  Args:
    data_config: see the module docstring.
    tokenizer: a `vlalign.data.tokenizer.Tokenizer`.
    global_batch_size: examples per step over all processes.
    seed: shuffle / caption choice / augmentation seed (the training seed).
    process_index: this process; defaults to `jax.process_index()`.
    process_count: number of processes; defaults to `jax.process_count()`.
    augment_fn: optional `(image uint8 [H, W, 3], rng) -> uint8 [H, W, 3]`, applied before
      normalisation (to both views with `augment_views = 2`). None builds it from
      `data_config.augment` (no augmentation when that is absent); a function overrides it and
      always gets the image resized to `image_size` (`train_decode` applies to recipes only).
  """
  augment_fn, augment_name = _resolve_augment(data_config, augment_fn)
  num_views = _num_views(data_config, augment_name)
  process_index = jax.process_index() if process_index is None else int(process_index)
  process_count = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= process_index < process_count:
    raise ConfigError(f"process_index={process_index} not in [0, process_count={process_count})")
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ConfigError(
      f"global batch size {global_batch_size} is not divisible by the process count {process_count}"
    )
  local_batch = global_batch_size // process_count
  original = _crops_originals(data_config, augment_name)
  source = make_source(
    data_config,
    "train",
    process_index=process_index,
    process_count=process_count,
    original_images=original,
  )
  ds = _train_examples(source, seed, process_index, process_count, local_batch)
  ds = ds.random_map(T.PickCaption(), seed=_stream_seed(seed, 1))
  size = int(data_config["image_size"])
  if num_views == 2:  # Reads the raw `image`, so before view 1 replaces it.
    second_view = _view_map(augment_fn, original, size, T.SECOND_VIEW_KEY)
    ds = ds.random_map(second_view, seed=_stream_seed(seed, 3))
  if augment_fn is not None:
    ds = ds.random_map(_view_map(augment_fn, original, size), seed=_stream_seed(seed, 2))
  ds = ds.map(T.TokenizeCaption(tokenizer, int(data_config["max_len"])))
  keys = _keys_for_views(num_views)
  ds = ds.map(T.ToTrainFeatures(keys))
  num_threads = int(_field(data_config, "num_threads", 0))
  prefetch = _field(data_config, "prefetch_buffer_size", None)
  prefetch = (0 if num_threads == 0 else 4 * local_batch) if prefetch is None else int(prefetch)
  examples = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  )
  batches = DropInvalid(examples).batch(local_batch, drop_remainder=True)
  return batches.map(T.NormalizeImage(keys[:num_views]))


class CropOriginal(grain.transforms.RandomMap):
  """Sets `output_key` to `augment_fn(image uint8 [h, w, 3], rng) -> uint8 [S, S, 3]` where
  `image` is the source image at its stored resolution (any size) and `augment_fn` a recipe that
  crops it and resizes the crop to S. For an image decoded at a reduced scale (the example's
  `source_scale` < 1, a JPEG draft) the call also passes `source_size=(H, W)` and `source_scale`,
  so the recipe draws the box on the stored size (`vlalign.data.augment`). An example flagged
  unreadable (`valid == 0`) keeps its black `[S, S, 3]` placeholder, for `DropInvalid` to drop.
  """

  def __init__(self, augment_fn: T.AugmentFn, size: int, output_key: str = "image"):
    self.augment_fn = augment_fn
    self.size = int(size)
    self.output_key = output_key

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    source = element["image"]
    if not element.get("valid", 1):
      return {**element, self.output_key: source}
    scale = float(element.get("source_scale", 1.0))
    if scale == 1.0:
      image = self.augment_fn(source, rng)
    else:
      size = tuple(int(v) for v in element["source_size"])
      image = self.augment_fn(source, rng, source_size=size, source_scale=scale)
    want = (self.size, self.size, 3)
    if image.dtype != np.uint8 or image.shape != want:
      raise ValueError(
        f"augment_fn must return uint8 {want} (the data image size), got {image.dtype} "
        f"{image.shape}"
      )
    return {**element, self.output_key: image}


def _view_map(
  augment_fn: T.AugmentFn, original: bool, size: int, output_key: str = "image"
) -> grain.transforms.RandomMap:
  """The random map that draws one augmented view: from the stored image (`CropOriginal`) or
  from the image already resized to `size` (`transforms.AugmentImage`)."""
  if original:
    return CropOriginal(augment_fn, size, output_key)
  return T.AugmentImage(augment_fn, output_key=output_key)


def _process_part(part: Any, process_index: int, process_count: int) -> grain.MapDataset:
  """Process `process_index`'s examples of `part`: all of them for a part that holds only this
  process's files (`process_split`), else the slice `[process_index::process_count]`."""
  split = getattr(part, "process_split", None)
  if split is None:
    return grain.MapDataset.source(part)[process_index::process_count]
  if tuple(split) != (process_index, process_count):
    raise ValueError(
      f"{part!r} holds the part of process {split[0]} of {split[1]}, not of process "
      f"{process_index} of {process_count}"
    )
  return grain.MapDataset.source(part)


def _train_examples(
  source: Any, seed: int, process_index: int, process_count: int, local_batch: int
) -> grain.MapDataset:
  """This process's infinite stream of `source`: its shard `[process_index::process_count]` (or,
  for a source divided by file, all of its examples), shuffled anew each epoch. A `Mixture`'s
  sources are each sharded, shuffled and repeated on their own seed, then mixed by weight."""
  sources = source.sources if isinstance(source, Mixture) else [source]
  shards = [_process_part(part, process_index, process_count) for part in sources]
  for part, shard in zip(sources, shards):
    if len(shard) == 0:
      raise ConfigError(
        f"process {process_index} of {process_count} gets no train examples of {part!r} "
        f"({len(part)} examples)"
      )
  if local_batch > sum(len(shard) for shard in shards):
    raise ConfigError(
      f"the per-process batch {local_batch} is larger than the {sum(map(len, shards))} train "
      f"examples of process {process_index}'s shard; use a smaller batch or a larger train_size"
    )
  if not isinstance(source, Mixture):
    return shards[0].shuffle(seed=_stream_seed(seed, 0)).repeat()
  streams = [s.shuffle(seed=_stream_seed(seed, 100 + k)).repeat() for k, s in enumerate(shards)]
  return grain.MapDataset.mix(streams, source.weights)


class _DropInvalidIterator(grain.DatasetIterator):
  """Drops examples with `valid == 0`, counts them, and adds the count so far (`SKIPPED_KEY`) to
  every example it passes on; the count is part of the iterator's checkpointed state."""

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)
    self.skipped = 0

  def __next__(self) -> dict:
    for _ in range(MAX_CONSECUTIVE_SKIPS):
      element = dict(next(self._parent))
      valid = element.pop("valid", 1)
      error = element.pop("error", None)
      if valid:
        element[SKIPPED_KEY] = np.int64(self.skipped)
        return element
      self.skipped += 1
      if self.skipped <= 10 or self.skipped % 1000 == 0:
        logging.warning("skipped train example %d: %s", self.skipped, error or "invalid")
    raise RuntimeError(
      f"{MAX_CONSECUTIVE_SKIPS} train examples in a row could not be read (the last: "
      f"{error}); check the data paths"
    )

  def get_state(self) -> dict:
    return {"parent": self._parent.get_state(), "skipped": self.skipped}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["parent"])
    self.skipped = int(state["skipped"])


class DropInvalid(grain.IterDataset):
  """`IterDataset` stage of `_DropInvalidIterator`."""

  def __iter__(self) -> _DropInvalidIterator:
    return _DropInvalidIterator(self._parent.__iter__())


class ImageRows:
  """Images of a source decoded on demand: `rows[idx]` is float32 `[len(idx), S, S, 3]`
  (normalised), decoded by a thread pool, so an evaluation holds one batch of pixels at a time
  whatever the split's size. On several processes each decodes only the rows its devices hold
  (`vlalign.evaluation.retrieval.embed_in_batches`).

  Args:
    load: `index -> uint8 [S, S, 3]`; a `BlackIfUnreadable` also tells which images it could not
      read (`unreadable`).
    num_images: N.
    num_threads: decoding threads (0 = decode in the calling thread).

  Attributes:
    decoded: images decoded so far by this process (each row asked for counts once).
  """

  def __init__(self, load: Any, num_images: int, num_threads: int = 8):
    self._load = load
    self.num_images = int(num_images)
    self._pool = ThreadPoolExecutor(num_threads) if num_threads > 0 else None
    self.decoded = 0

  def __len__(self) -> int:
    return self.num_images

  @property
  def unreadable(self) -> set[int]:
    """Indices of the images this process could not read so far (black images; `load.skipped`),
    empty for a `load` that does not tell."""
    return set(getattr(self._load, "skipped", ()))

  def __getitem__(self, rows: Any) -> np.ndarray:
    rows = [int(i) for i in np.asarray(rows).reshape(-1)]
    decoded = self._pool.map(self._load, rows) if self._pool else map(self._load, rows)
    images = T.normalize_image(np.stack(list(decoded)))
    self.decoded += len(rows)
    return images


def _examples(source: shapes.ShapesSource) -> list[dict]:
  return [source[i] for i in range(len(source))]


def make_eval_data(data_config: Any, tokenizer: Any, split: str) -> dict[str, np.ndarray]:
  """The whole `split` for retrieval; captions are `L = eval_text_len(data_config)` tokens.

  Returns:
    `images` float32 `[N, H, W, 3]` (normalised; for a file split an `ImageRows` that decodes the
    rows asked for), `text_ids` int32 `[N_txt, L]`, `text_mask` int32 `[N_txt, L]`, `txt2img`
    int32 `[N_txt]` (caption j describes image `txt2img[j]`), `img2txt` int32 `[N, K]` (the
    captions of image i, -1 padded; K is the most captions an image has: 5 for the embedded data,
    where caption `5*i + k` is the k-th caption of image i).
  """
  source = make_source(data_config, split)
  if not isinstance(source, shapes.ShapesSource):
    return _streamed_eval_data(source, data_config, tokenizer)
  examples = _examples(source)
  captions = [c for ex in examples for c in ex["captions"]]
  per_image = len(examples[0]["captions"])
  text_ids, text_mask = tokenizer.encode_batch(captions, eval_text_len(data_config))
  num_images = len(examples)
  return {
    "images": T.normalize_image(np.stack([ex["image"] for ex in examples])),
    "text_ids": text_ids.astype(np.int32),
    "text_mask": text_mask.astype(np.int32),
    "txt2img": np.repeat(np.arange(num_images, dtype=np.int32), per_image),
    "img2txt": np.arange(num_images * per_image, dtype=np.int32).reshape(num_images, per_image),
  }


def caption_maps(counts: Any) -> tuple[np.ndarray, np.ndarray]:
  """`(txt2img [sum(counts)], img2txt [N, max(counts)])` for images with `counts[i]` captions each,
  captions numbered image by image; `img2txt` rows are padded with -1."""
  counts = np.asarray(counts, dtype=np.int64)
  txt2img = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
  img2txt = np.full((len(counts), int(counts.max())), -1, dtype=np.int32)
  starts = np.cumsum(counts) - counts
  for i, (start, count) in enumerate(zip(starts, counts)):
    img2txt[i, :count] = np.arange(start, start + count)
  return txt2img, img2txt


class BlackIfUnreadable:
  """`index -> uint8 [S, S, 3]` by `load(index)`; an image that cannot be read is black, its
  index kept in `skipped` and the first ten logged (an evaluation protocol keeps every image of
  its split; callers decide what a black image counts for). Thread-safe (`ImageRows` decodes in a
  pool). `skipped` holds what this process read: on several processes each decodes only its rows
  of every batch, so a count over the split merges the processes' sets
  (`sharding.union_over_processes`; the evaluators do).

  Args:
    load: `index -> uint8 [S, S, 3]`; raises OSError or ValueError (`UnreadableImageError`).
    size: S.
    what: the data's name, for the log.
  """

  def __init__(self, load: Any, size: int, what: str):
    self._load, self.size, self.what = load, int(size), what
    self.skipped: set[int] = set()
    self._lock = threading.Lock()

  def __call__(self, index: int) -> np.ndarray:
    try:
      return self._load(index)
    except (OSError, ValueError) as e:
      with self._lock:
        self.skipped.add(int(index))
        count = len(self.skipped)
      if count <= 10:
        logging.warning("%s: image %d is unreadable (black image used): %s", self.what, index, e)
      return np.zeros((self.size, self.size, 3), np.uint8)


def _streamed_eval_data(source: Any, data_config: Any, tokenizer: Any) -> dict[str, Any]:
  """`make_eval_data` of a file source: captions tokenised up front, images as `ImageRows`
  decoded batch by batch. Examples without a caption are left out."""
  captions = [source.captions_of(i) for i in range(len(source))]
  kept = [i for i, c in enumerate(captions) if c]
  if not kept:
    raise ConfigError(f"{source!r} holds no example with a caption")
  texts = [c for i in kept for c in captions[i]]
  text_ids, text_mask = tokenizer.encode_batch(texts, eval_text_len(data_config))
  txt2img, img2txt = caption_maps([len(captions[i]) for i in kept])
  threads = int(_field(data_config, "eval_threads", 8))
  return {
    "images": ImageRows(
      BlackIfUnreadable(lambda i: source.image(kept[i]), source.options.size, repr(source)),
      len(kept),
      threads,
    ),
    "text_ids": np.asarray(text_ids, np.int32),
    "text_mask": np.asarray(text_mask, np.int32),
    "txt2img": txt2img,
    "img2txt": img2txt,
  }


def make_zeroshot_data(data_config: Any, split: str, task_name: str) -> dict[str, Any]:
  """The examples of `split` that qualify for zero-shot task `task_name` (`shapes.ZEROSHOT_TASKS`).

  Returns:
    `images` float32 `[M, H, W, 3]` (normalised), `labels` int32 `[M]`, `class_names` list of str,
    `templates` list of str with one `{}` each.
  """
  if task_name not in shapes.ZEROSHOT_TASKS:
    raise ConfigError(
      f"unknown zero-shot task {task_name!r}; available: {sorted(shapes.ZEROSHOT_TASKS)}"
    )
  task = shapes.ZEROSHOT_TASKS[task_name]
  source = make_source(data_config, split)
  images, labels = [], []
  for example in _examples(source):
    label = task.label(example)
    if label >= 0:
      images.append(example["image"])
      labels.append(label)
  if not labels:
    raise ConfigError(
      f"no example of the {split!r} split ({len(source)} examples) qualifies for the "
      f"{task_name!r} zero-shot task; use a larger {split}_size"
    )
  return {
    "images": T.normalize_image(np.stack(images)),
    "labels": np.asarray(labels, dtype=np.int32),
    "class_names": list(task.class_names),
    "templates": list(task.templates),
  }


def to_global_batch(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict:
  """Per-process numpy batch `[b, ...]` -> global `jax.Array`s `[b * process_count, ...]`."""
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
  )
