"""Input pipelines: the per-process Grain train iterator, eval arrays, and global batches.

`data_config` (`config.data`, an `ml_collections.ConfigDict` or a dict) fields: `name` ("shapes"),
`image_size`, `max_len`, `tokenizer`, `train_size` / `val_size` / `test_size` (None = the dataset's
default), `seed` (which images the dataset holds), `num_threads` (Grain read threads, default 0) and
optionally `prefetch_buffer_size` (default 0 without threads, 4 batches with). Train-only fields:

- `augment`: None / absent (train images unchanged) or a dict for `augment.build_augment`, e.g.
  `dict(name="tcl")`; its `image_size` defaults to `image_size` and must equal it.
- `augment_views`: 1 (default) or 2. With 2, every train example also holds `image_aug`, a second
  draw of the same recipe on the same source image from an independent random stream (TCL's
  momentum-teacher view), normalised like `image`. It needs a random `augment` recipe (not
  "none" / "resize"), since the two views would otherwise be the same image. `image` is the same
  draw with 1 or 2 views. `train_batch_keys` gives the batch keys.

Train order: source -> this process's shard `[process_index::process_count]` -> shuffle -> repeat
forever -> random maps (caption, then view 2, then view 1) -> tokenise -> batch -> normalise.
Grain's `MapDataset.shuffle` uses the seed `seed + epoch` for each epoch of the repeated index
space and every random map has its own seed and is keyed by the element's position in the repeated
dataset, so every epoch has a new order and new random choices, all reproducible from `seed`. The
iterator is a Grain `DatasetIterator`: `get_state()` / `set_state()` and
`grain.checkpoint.CheckpointSave` work on it.
"""

from typing import Any

import grain
import jax
import numpy as np

from vlalign.data import augment, shapes
from vlalign.data import transforms as T
from vlalign.errors import ConfigError

# Recipes without randomness: two views of one of them would be the same image.
_DETERMINISTIC_RECIPES = ("none", "resize")


def _field(data_config: Any, name: str, default: Any = None) -> Any:
  return data_config.get(name, default)


def make_source(data_config: Any, split: str) -> shapes.ShapesSource:
  """The random-access source of `split` described by `data_config`."""
  name = _field(data_config, "name", "shapes")
  if name != "shapes":
    raise ConfigError(f"unknown dataset {name!r}; available: ['shapes']")
  return shapes.ShapesSource(
    split,
    num_examples=_field(data_config, f"{split}_size"),
    image_size=int(data_config["image_size"]),
    seed=int(_field(data_config, "seed", 0)),
  )


def split_size(data_config: Any, split: str) -> int:
  """Number of examples (images) of `split`, without loading them; ConfigError if it is empty."""
  return len(make_source(data_config, split))


def check_train_split(data_config: Any, global_batch_size: int, process_count: int) -> None:
  """ConfigError when a process's shard of the train split cannot fill its batch."""
  size = split_size(data_config, "train")
  local_batch, shard = global_batch_size // process_count, size // process_count
  if local_batch > shard:
    raise ConfigError(
      f"the per-process batch {local_batch} is larger than the {shard} train examples of a "
      f"process's shard (train split: {size}, {process_count} processes); use a smaller batch "
      "or a larger train_size"
    )


def truncated_fraction(
  data_config: Any, tokenizer: Any, split: str = "train", sample: int = 256
) -> tuple[float, int]:
  """`(fraction, longest)`: the fraction of the captions of the first `sample` examples of `split`
  that `data.max_len` cuts, and the longest one's length in tokens ([CLS] and [EOS] included)."""
  source = make_source(data_config, split)
  captions = [c for i in range(min(sample, len(source))) for c in source[i]["captions"]]
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
      `data_config.augment` (no augmentation when that is absent); a function overrides it.
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
  source = make_source(data_config, "train")
  ds = grain.MapDataset.source(source)[process_index::process_count]
  if len(ds) == 0:
    raise ConfigError(
      f"process {process_index} of {process_count} gets no train examples "
      f"(train split has {len(source)})"
    )
  if local_batch > len(ds):
    raise ConfigError(
      f"the per-process batch {local_batch} is larger than the {len(ds)} train examples of "
      f"process {process_index}'s shard; use a smaller batch or a larger train_size"
    )
  ds = ds.shuffle(seed=_stream_seed(seed, 0)).repeat()
  ds = ds.random_map(T.PickCaption(), seed=_stream_seed(seed, 1))
  if num_views == 2:  # Reads the raw `image`, so before view 1 replaces it.
    second_view = T.AugmentImage(augment_fn, output_key=T.SECOND_VIEW_KEY)
    ds = ds.random_map(second_view, seed=_stream_seed(seed, 3))
  if augment_fn is not None:
    ds = ds.random_map(T.AugmentImage(augment_fn), seed=_stream_seed(seed, 2))
  ds = ds.map(T.TokenizeCaption(tokenizer, int(data_config["max_len"])))
  keys = _keys_for_views(num_views)
  ds = ds.map(T.ToTrainFeatures(keys))
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds.map(T.NormalizeImage(keys[:num_views]))
  num_threads = int(_field(data_config, "num_threads", 0))
  prefetch = _field(data_config, "prefetch_buffer_size", None)
  prefetch = (0 if num_threads == 0 else 4) if prefetch is None else int(prefetch)
  return ds.to_iter_dataset(
    grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  )


def _examples(source: shapes.ShapesSource) -> list[dict]:
  return [source[i] for i in range(len(source))]


def make_eval_data(data_config: Any, tokenizer: Any, split: str) -> dict[str, np.ndarray]:
  """The whole `split` as arrays for retrieval (K = 5 captions per image).

  Returns:
    `images` float32 `[N, H, W, 3]` (normalised), `text_ids` int32 `[K*N, L]`, `text_mask` int32
    `[K*N, L]`, `txt2img` int32 `[K*N]` (caption j describes image `txt2img[j]`), `img2txt` int32
    `[N, K]` (the captions of image i). Caption `K*i + k` is the k-th caption of image i.
  """
  examples = _examples(make_source(data_config, split))
  captions = [c for ex in examples for c in ex["captions"]]
  per_image = len(examples[0]["captions"])
  text_ids, text_mask = tokenizer.encode_batch(captions, int(data_config["max_len"]))
  num_images = len(examples)
  return {
    "images": T.normalize_image(np.stack([ex["image"] for ex in examples])),
    "text_ids": text_ids.astype(np.int32),
    "text_mask": text_mask.astype(np.int32),
    "txt2img": np.repeat(np.arange(num_images, dtype=np.int32), per_image),
    "img2txt": np.arange(num_images * per_image, dtype=np.int32).reshape(num_images, per_image),
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
