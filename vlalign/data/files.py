"""Image-text datasets on disk: the formats users already have, as Grain random-access sources.

A split of `data.name = "files"` is described by a *source spec* (a dict in the config):

- `dict(format="albef_json", ann=<file or list of files>, image_root=<dir>)`: ALBEF/TCL's
  annotation files. Each entry is `{"image": <path relative to image_root>, "caption": <str or
  list of str>, "image_id": <any, optional>}`; one example per entry (the train files have one
  caption per entry, the evaluation files a list). Entries with the same `image_id` (or, without
  one, the same image path) share an integer image id, as ALBEF's fine-tuning image-id queue wants.
  `strip_prefix` drops a leading part of the `image` paths first (e.g. the authors'
  `/export/share/datasets/vision/coco/images/` in the released pre-training files).
- `dict(format="karpathy", ann=<dataset_coco.json>, image_root=<dir>, split="test")`: Karpathy's
  split files (`images[]` with `filepath` (COCO only), `filename`, `split`, `sentences[].raw`);
  `split` is one name or a list (COCO's train is usually `["train", "restval"]`). One example per
  image with all its captions.
- `dict(format="webdataset", shards=<glob, brace pattern "a/{00000..00099}.tar", or list>)`: tar
  shards as `img2dataset` writes them: members `<key>.jpg` (or .jpeg/.png/.webp) with `<key>.txt`
  or `<key>.json` (field `caption`). The shards' headers are indexed once when the source is built
  (a few ms per shard on a local disk); reading is random access by byte offset. Built for one
  process of several (`make_source(..., process_index=p, process_count=P)`, the train split), a
  source of at least P shards holds only the shards `p, p + P, p + 2P, ...` (shard i goes to
  process `i % P`), so each process indexes and reads 1/P of the files; with fewer shards than
  processes, or with `max_examples`, every process indexes every shard and the pipeline shards
  the records instead (see `CaptionedImages.process_split`).
- `dict(format="tfds", name=<builder name>, data_dir=<dir>, split="train")` or
  `dict(format="tfds", builder_dir=<dir>, split=...)`: a prepared TFDS builder (ArrayRecord files,
  e.g. the output of `python -m vlalign.data.convert`), read with `tfds.data_source`, without
  TensorFlow. Fields `image_key` ("image": encoded bytes or a uint8 array), `caption_key`
  ("captions": a string or a list) and `image_id_key` ("image_id"; absent = the index).

Every spec also takes `max_examples` (the first N examples only). A train split may also be a
*mixture*: `dict(mixture=[spec, ...], weights=[...])` (weights default to the sources' sizes, i.e.
plain concatenation as ALBEF's 4M/14M sets are; see `vlalign.data.pipeline`).

Examples are dicts `image` uint8 `[S, S, 3]` (with `ImageOptions.original`: uint8 `[h, w, 3]`,
the stored image at its own resolution, for a train augmentation that crops it, with
`source_size` `(H, W)` and `source_scale` as `images.Original` has them), `captions` tuple of
str, `image_id` int, `valid` int32 (1, or 0 for an example the pipeline drops and counts: a
missing, truncated or undecodable image, or no non-empty caption; its `image` is then zeros
`[S, S, 3]`, whatever `original` says, and `error` says why). Building a source fails with a
`PathError` naming the path when an annotation file, image root or shard is missing, and when
none of the first images a spec names can be found (a wrong `image_root`).
"""

import dataclasses
import glob
import json
import os
import re
import tarfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import logging
from etils import epath

from vlalign.data import images
from vlalign.errors import ConfigError, PathError

FORMATS = ("albef_json", "karpathy", "webdataset", "tfds")
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
_PROBE = 8  # images checked for existence when a spec is built


@dataclasses.dataclass(frozen=True)
class ImageOptions:
  """How examples' images are decoded.

  Attributes:
    size: S, the side of `CaptionedImages.image` (and of the placeholder of an unreadable image).
    resize: how `image` fits the image to S x S (`images.RESIZE_MODES`).
    decoder: `images.DECODERS`.
    original: examples (`source[i]`) hold the image at its stored resolution, uint8 `[H, W, 3]`
      (`images.load_original`), not resized to S: the input of a train augmentation that cuts a
      random resized crop, as the references crop the full-resolution photo. `image(i)` (what
      evaluation reads) is S x S either way.
    original_min_side: with `original`, None (full resolution) or JPEGs decoded at the smallest
      power-of-two scale (1/2, 1/4, 1/8) keeping both sides >= this (PIL's draft mode).
  """

  size: int
  resize: str = "squash"
  decoder: str = "pil"
  original: bool = False
  original_min_side: int | None = None


def _spec_dict(spec: Any) -> dict:
  return dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)


def _paths(value: Any, what: str) -> list[str]:
  """`value` (a path or a list of paths) as a list; each must exist (PathError otherwise)."""
  paths = [value] if isinstance(value, str | os.PathLike) else list(value or [])
  if not paths:
    raise ConfigError(f"{what}: no file given")
  for path in paths:
    if not epath.Path(path).exists():
      raise PathError(f"{what}: {path} does not exist")
  return [os.fspath(p) for p in paths]


def _root(value: Any, what: str) -> str:
  if not value:
    raise ConfigError(f"{what}: image_root is not set")
  if not epath.Path(value).is_dir():
    raise PathError(f"{what}: image_root {value} is not a directory")
  return os.fspath(value)


def _read_json(path: str) -> Any:
  try:
    return json.loads(epath.Path(path).read_text())
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path} is not valid JSON: {e}") from None


def _dense_ids(keys: Sequence[Any]) -> np.ndarray:
  """`[N]` int32: equal keys get equal ids, numbered by first appearance."""
  ids: dict[Any, int] = {}
  return np.array([ids.setdefault(k, len(ids)) for k in keys], dtype=np.int32)


def _caption_tuple(caption: Any) -> tuple[str, ...]:
  """The non-empty captions of an entry's `caption` field (a string or a list of strings)."""
  if isinstance(caption, bytes):
    caption = caption.decode("utf-8")
  if isinstance(caption, str):
    caption = [caption]
  items = (c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in caption)
  return tuple(c.strip() for c in items if c and c.strip())


class CaptionedImages:
  """A Grain random-access source of images with captions (see the module docstring).

  Args:
    name: what the source is, for messages (e.g. "albef_json coco_test.json").
    num_examples: N.
    load_image: `index -> bytes, a uint8 [H, W, 3] array, or a path`; raises
      `images.UnreadableImageError` (or OSError) when the image cannot be had.
    captions: `index -> tuple of str` (cheap: no image is read).
    image_ids: `[N]` int32.
    options: how images are decoded.
    process_split: None, or `(p, P)` when the source holds only process p's part of a split
      divided among P processes by file (webdataset shards); a pipeline then takes every example
      instead of slicing `[p::P]`.
  """

  def __init__(
    self,
    name: str,
    num_examples: int,
    load_image: Callable[[int], Any],
    captions: Callable[[int], tuple[str, ...]],
    image_ids: np.ndarray,
    options: ImageOptions,
    process_split: tuple[int, int] | None = None,
  ):
    if num_examples <= 0:
      raise ConfigError(f"{name} holds no examples")
    self.name = name
    self.num_examples = int(num_examples)
    self._load_image = load_image
    self.captions_of = captions
    self.image_ids = np.asarray(image_ids, dtype=np.int32)
    self.options = options
    self.process_split = process_split

  def __len__(self) -> int:
    return self.num_examples

  def __repr__(self) -> str:
    return f"CaptionedImages({self.name}, {self.num_examples} examples)"

  def image(self, index: int) -> np.ndarray:
    """uint8 `[S, S, 3]` of example `index`; UnreadableImageError if it cannot be decoded."""
    options = self.options
    return images.load_image(self._load_image(index), options.size, options.resize, options.decoder)

  def original_image(self, index: int) -> images.Original:
    """Example `index`'s image at its stored resolution (uint8 `[h, w, 3]` pixels, JPEGs drafted
    to `options.original_min_side` when set, with the stored size and the decoding scale);
    UnreadableImageError if it cannot be decoded."""
    options = self.options
    raw = self._load_image(index)
    return images.load_original(raw, options.original_min_side, options.decoder)

  def _image_fields(self, index: int) -> dict:
    """`{"image": uint8 [S, S, 3]}`, or with `options.original` the pixels at stored resolution
    `[h, w, 3]` with `source_size` (H, W) and `source_scale` (`images.Original`)."""
    if not self.options.original:
      return {"image": self.image(index)}
    original = self.original_image(index)
    return {
      "image": original.image,
      "source_size": (original.height, original.width),
      "source_scale": original.scale,
    }

  def encoded_image(self, index: int) -> bytes:
    """The stored bytes of example `index`'s image (a uint8 array source's image as PNG);
    UnreadableImageError (or OSError) if they cannot be had."""
    raw = self._load_image(index)
    if isinstance(raw, np.ndarray):
      return images.encode_png(raw)
    if isinstance(raw, bytes):
      return raw
    try:
      return epath.Path(os.fspath(raw)).read_bytes()
    except FileNotFoundError:
      raise images.UnreadableImageError(f"{raw} does not exist") from None

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index {index} out of range for {self!r}")
    captions = self.captions_of(index)
    example = {"captions": captions, "image_id": int(self.image_ids[index]), "valid": np.int32(1)}
    error = None if captions else "no non-empty caption"
    if error is None:
      try:
        example.update(self._image_fields(index))
      except (images.UnreadableImageError, OSError) as e:
        error = str(e)
    if error is not None:
      size = self.options.size
      example.update(
        image=np.zeros((size, size, 3), np.uint8),
        captions=captions or ("",),
        valid=np.int32(0),
        error=error,
      )
    return example


def _check_some_exist(name: str, paths: Sequence[str]) -> None:
  """PathError when none of the first `_PROBE` image paths exists (a wrong image_root)."""
  probe = list(paths[:_PROBE])
  if probe and not any(epath.Path(p).exists() for p in probe):
    raise PathError(
      f"{name}: none of the first {len(probe)} images exists (e.g. {probe[0]}); "
      "is image_root right?"
    )


def _file_source(
  name: str, paths: list[str], captions: list[tuple[str, ...]], ids: np.ndarray, options
) -> CaptionedImages:
  _check_some_exist(name, paths)
  return CaptionedImages(
    name, len(paths), paths.__getitem__, captions.__getitem__, ids, options
  )  # fmt: skip


def _strip(path: str, prefix: str) -> str:
  return path[len(prefix) :] if prefix and path.startswith(prefix) else path


def albef_json(
  spec: dict, options: ImageOptions, process_index: int = 0, process_count: int = 1
) -> CaptionedImages:
  """ALBEF/TCL annotation files (see the module docstring)."""
  del process_index, process_count  # One index file: the whole split in every process.
  ann = _paths(spec.get("ann"), "albef_json ann")
  root = _root(spec.get("image_root"), f"albef_json {ann[0]}")
  entries = [e for path in ann for e in _read_json(path)]
  limit = spec.get("max_examples")
  entries = entries[: int(limit)] if limit else entries
  for i, entry in enumerate(entries[:1]):
    if not isinstance(entry, dict) or "image" not in entry or "caption" not in entry:
      raise ConfigError(f"{ann[0]}: entry {i} is not an {{image, caption}} object: {entry!r:.200}")
  prefix = spec.get("strip_prefix") or ""
  paths = [os.path.join(root, _strip(e["image"], prefix)) for e in entries]
  captions = [_caption_tuple(e.get("caption", "")) for e in entries]
  ids = _dense_ids([e.get("image_id", e["image"]) for e in entries])
  return _file_source(f"albef_json {os.path.basename(ann[0])}", paths, captions, ids, options)


def karpathy(
  spec: dict, options: ImageOptions, process_index: int = 0, process_count: int = 1
) -> CaptionedImages:
  """Karpathy's split files (see the module docstring)."""
  del process_index, process_count  # One index file: the whole split in every process.
  (ann,) = _paths(spec.get("ann"), "karpathy ann")[:1]
  root = _root(spec.get("image_root"), f"karpathy {ann}")
  wanted = spec.get("split", "test")
  wanted = {wanted} if isinstance(wanted, str) else set(wanted)
  data = _read_json(ann)
  entries = [e for e in data.get("images", []) if e.get("split") in wanted]
  if not entries:
    found = sorted({e.get("split") for e in data.get("images", [])})
    raise ConfigError(f"{ann} has no image in split(s) {sorted(wanted)}; its splits: {found}")
  limit = spec.get("max_examples")
  entries = entries[: int(limit)] if limit else entries
  paths = [os.path.join(root, e.get("filepath", ""), e["filename"]) for e in entries]
  captions = [_caption_tuple([s.get("raw", "") for s in e.get("sentences", [])]) for e in entries]
  ids = _dense_ids([e.get("cocoid", e.get("imgid", e["filename"])) for e in entries])
  return _file_source(f"karpathy {os.path.basename(ann)}", paths, captions, ids, options)


def expand_shards(shards: Any) -> list[str]:
  """A list of tar paths from a list, a glob or a brace range `dir/{00000..00099}.tar`."""
  if not isinstance(shards, str):
    return [p for s in shards for p in expand_shards(s)]
  match = re.search(r"\{(\d+)\.\.(\d+)\}", shards)
  if match:
    first, last = match.group(1), match.group(2)
    width = len(first)
    return [
      p
      for n in range(int(first), int(last) + 1)
      for p in expand_shards(shards[: match.start()] + f"{n:0{width}d}" + shards[match.end() :])
    ]
  if any(c in shards for c in "*?["):
    return sorted(glob.glob(shards))
  return [shards]


@dataclasses.dataclass(frozen=True)
class _Member:
  shard: int
  offset: int
  size: int


def _index_shard(path: str) -> dict[str, dict[str, _Member]]:
  """`{key: {extension: member}}` of one tar shard (keys are names up to their first dot)."""
  samples: dict[str, dict[str, _Member]] = {}
  with tarfile.open(path, "r:") as tar:
    for member in tar:
      if not member.isfile():
        continue
      base = os.path.basename(member.name)
      stem, dot, ext = base.partition(".")
      key = os.path.join(os.path.dirname(member.name), stem)
      if dot:
        samples.setdefault(key, {})["." + ext.lower()] = _Member(
          -1, member.offset_data, member.size
        )
  return samples


def _read_member(path: str, member: _Member) -> bytes:
  with open(path, "rb") as f:
    f.seek(member.offset)
    return f.read(member.size)


def _web_caption(path: str, members: dict[str, _Member]) -> tuple[str, ...]:
  if ".txt" in members:
    return _caption_tuple(_read_member(path, members[".txt"]).decode("utf-8", "replace"))
  if ".json" in members:
    try:
      meta = json.loads(_read_member(path, members[".json"]))
    except json.JSONDecodeError:
      return ()
    return _caption_tuple(meta.get("caption") or "")
  return ()


def _process_shards(
  shards: list[str], spec: dict, process_index: int, process_count: int
) -> list[int] | None:
  """The indices of the shards process `process_index` of `process_count` reads (`i % P == p`),
  or None when every process reads every shard (one process, fewer shards than processes, or
  `max_examples`, which counts examples in the order of all shards)."""
  if not 0 <= process_index < process_count:
    raise ConfigError(f"process_index={process_index} not in [0, process_count={process_count})")
  if process_count == 1:
    return None
  if len(shards) < process_count or spec.get("max_examples"):
    why = "max_examples is set" if spec.get("max_examples") else "fewer shards than processes"
    logging.info(
      "webdataset: %d shards, %d processes, %s: every process indexes every shard and reads every "
      "%d-th record", len(shards), process_count, why, process_count,
    )  # fmt: skip
    return None
  if len(shards) % process_count:
    logging.warning(
      "webdataset: %d shards over %d processes: processes hold %d or %d shards; each repeats its "
      "own records, so records of processes with fewer are drawn more often. A shard count that "
      "the process count divides gives every record the same rate.",
      len(shards), process_count, -(-len(shards) // process_count), len(shards) // process_count,
    )  # fmt: skip
  return list(range(process_index, len(shards), process_count))


def webdataset(
  spec: dict, options: ImageOptions, process_index: int = 0, process_count: int = 1
) -> CaptionedImages:
  """img2dataset-style tar shards (see the module docstring). Captions are read at index time.

  With several processes and at least as many shards, only this process's shards (`i % P == p`)
  are checked and indexed; its examples' `image_id`s are `p + P * k` (k: the example's position
  in this process's part), unique over the processes.
  """
  shards = expand_shards(spec.get("shards") or [])
  if not shards:
    raise ConfigError(f"webdataset: no shard matches {spec.get('shards')!r}")
  mine = _process_shards(shards, spec, int(process_index), int(process_count))
  read = range(len(shards)) if mine is None else mine
  for shard in read:
    if not os.path.isfile(shards[shard]):
      raise PathError(f"webdataset: shard {shards[shard]} does not exist")
  refs, captions = [], []
  limit = spec.get("max_examples")
  for shard in read:
    path = shards[shard]
    try:
      samples = _index_shard(path)
    except tarfile.TarError as e:
      raise PathError(f"webdataset: shard {path} is not a readable tar file: {e}") from None
    for key in sorted(samples):
      members = samples[key]
      image_ext = next((e for e in _IMAGE_EXTENSIONS if e in members), None)
      image = members.get(image_ext) if image_ext else None
      refs.append((shard, image))
      captions.append(_web_caption(path, members))
    if limit and len(refs) >= int(limit):
      break
  if limit:
    refs, captions = refs[: int(limit)], captions[: int(limit)]

  def load_image(index: int) -> bytes:
    shard, member = refs[index]
    if member is None:
      raise images.UnreadableImageError(f"sample {index} of {shards[shard]} has no image member")
    return _read_member(shards[shard], member)

  where = os.path.dirname(shards[0]) or "."
  if mine is None:
    ids, split = np.arange(len(refs), dtype=np.int32), None
    name = f"webdataset {where} ({len(shards)} shards)"
  else:
    ids = (process_index + process_count * np.arange(len(refs), dtype=np.int64)).astype(np.int32)
    split = (int(process_index), int(process_count))
    name = (
      f"webdataset {where} ({len(mine)} of {len(shards)} shards: process {process_index} of "
      f"{process_count})"
    )
  return CaptionedImages(
    name, len(refs), load_image, captions.__getitem__, ids, options, process_split=split
  )


def prepared_tfds_builder(spec: dict) -> Any:
  """The prepared TFDS builder a spec names (`builder_dir`, or `name` + `data_dir`); nothing is
  downloaded. PathError when the directory or the prepared dataset is missing."""
  import tensorflow_datasets as tfds  # Heavy: imported only for TFDS specs.

  if spec.get("builder_dir"):
    builder_dir = spec["builder_dir"]
    if not epath.Path(builder_dir).exists():
      raise PathError(f"tfds: builder_dir {builder_dir} does not exist")
    return tfds.builder_from_directory(builder_dir)
  name, data_dir = spec.get("name"), spec.get("data_dir")
  if not name or not data_dir:
    raise ConfigError("tfds: give builder_dir, or name and data_dir (nothing is downloaded)")
  if not epath.Path(data_dir).exists():
    raise PathError(f"tfds: data_dir {data_dir} does not exist")
  prepared = epath.Path(data_dir) / name.split(":")[0].split("/")[0]
  if not prepared.exists():
    raise PathError(f"tfds: no prepared dataset {name!r} in data_dir {data_dir} ({prepared})")
  return tfds.builder(name, data_dir=data_dir)


def tfds_source(
  spec: dict, options: ImageOptions, process_index: int = 0, process_count: int = 1
) -> CaptionedImages:
  """A prepared TFDS builder read with `tfds.data_source` (see the module docstring)."""
  del process_index, process_count  # One index file: the whole split in every process.
  source = prepared_tfds_builder(spec).as_data_source(split=spec.get("split", "train"))
  image_key = spec.get("image_key", "image")
  caption_key = spec.get("caption_key", "captions")
  id_key = spec.get("image_id_key", "image_id")
  size = len(source)
  limit = spec.get("max_examples")
  size = min(size, int(limit)) if limit else size
  first = source[0] if size else {}
  for key in (image_key, caption_key):
    if size and key not in first:
      raise ConfigError(f"tfds {spec.get('name') or spec.get('builder_dir')}: no feature {key!r}; "
                        f"its features: {sorted(first)}")  # fmt: skip

  def load_image(index: int) -> Any:
    value = source[index][image_key]
    return bytes(value) if isinstance(value, bytes | np.bytes_) else np.asarray(value)

  def captions(index: int) -> tuple[str, ...]:
    value = source[index][caption_key]
    return _caption_tuple(value.tolist() if isinstance(value, np.ndarray) else value)

  if size and id_key in first:
    ids = _dense_ids([int(np.asarray(source[i][id_key])) for i in range(size)])
  else:
    ids = np.arange(size, dtype=np.int32)
  name = f"tfds {spec.get('name') or spec.get('builder_dir')}[{spec.get('split', 'train')}]"
  return CaptionedImages(name, size, load_image, captions, ids, options)


# `reader(spec, options, process_index, process_count)`; only `webdataset` divides its files among
# processes, the others hold the whole split in every process (their index is one file).
READERS: dict[str, Callable[[dict, ImageOptions, int, int], CaptionedImages]] = {
  "albef_json": albef_json,
  "karpathy": karpathy,
  "webdataset": webdataset,
  "tfds": tfds_source,
}


def make_source(
  spec: Any, options: ImageOptions, process_index: int = 0, process_count: int = 1
) -> CaptionedImages:
  """The source a spec describes (see the module docstring); for process `process_index` of
  `process_count`, a webdataset of at least that many shards holds only this process's shards
  (its `process_split` says so), every other source the whole split."""
  spec = _spec_dict(spec)
  fmt = spec.get("format")
  if fmt not in READERS:
    raise ConfigError(f"unknown data format {fmt!r}; available: {sorted(READERS)}")
  return READERS[fmt](spec, options, int(process_index), int(process_count))
