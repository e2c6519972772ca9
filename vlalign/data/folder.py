"""Labelled images for zero-shot classification: an ImageNet-style folder tree or a TFDS builder.

Sources (`make_source(spec)`, `spec` a dict):

- `dict(format="image_folder", root=<dir>)`: `root/<class_dir>/<image>` with images ending in
  `.jpg`, `.jpeg`, `.png` or `.webp` (any letter case, so ImageNet's `.JPEG` too); hidden entries
  (names starting with ".") and files directly under `root` are ignored, sub-directories of a class
  directory are not searched. The classes are the class directories sorted by name (for ImageNet:
  the sorted WordNet ids, which is the standard class-index order), label `c` is the `c`-th of
  them, and the examples are ordered by (class directory, file name). A class directory without
  images still counts as a class, so a partial copy keeps the labels of the full one. Default class
  names: the directory names with underscores as spaces.
- `dict(format="tfds", builder_dir=<dir>)` or `dict(format="tfds", name=<name>, data_dir=<dir>)`:
  a prepared TFDS builder, read with `as_data_source` (ArrayRecord files, without TensorFlow;
  nothing is downloaded). Fields `split` ("validation"), `image_key` ("image": an `Image`
  feature, read undecoded, or bytes) and `label_key` ("label": an int or a `ClassLabel` feature).
  Default class names: the label feature's names (underscores as spaces); a label feature without
  names needs `classnames`.

Both take `classnames` (`"imagenet"`, a file path, or a list of str: one name per class, in label
order; the count must equal the number of classes) and `max_examples` (None = all; else an evenly
spaced subset of that many examples, `index = i * N // max_examples`, so every class stays
represented in a sorted tree). A missing `root` / `builder_dir` / `data_dir` is a `PathError`
naming it; a tree without images, an unknown field or a class-name count that differs is a
`ConfigError`.

Shipped metadata (`load_lines`): `"imagenet"` is `metadata/imagenet_classnames.txt`, the 1000
ImageNet-1k class names in class-index order as curated by OpenAI for CLIP's zero-shot evaluation
(as in open_clip's `zero_shot_metadata.IMAGENET_CLASSNAMES`); two pairs of classes share a name
there ("missile": 657 and 744; "sunglasses": 836 and 837), kept as published so accuracies compare
with the literature (labels are indices, so the duplicates only make the second class of each pair
unpredictable). `"clip"` is `metadata/clip_templates.txt`, CLIP's 80 ImageNet prompt templates
(open_clip's `OPENAI_IMAGENET_TEMPLATES`) with `{}` where the class name goes.
"""

import importlib.resources
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from etils import epath

from vlalign.data import files, images
from vlalign.errors import ConfigError, PathError

FORMATS = ("image_folder", "tfds")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")  # compared in lower case
SHIPPED_LISTS = {"imagenet": "imagenet_classnames.txt", "clip": "clip_templates.txt"}

_COMMON_FIELDS = {"format", "classnames", "max_examples"}
_TFDS_FIELDS = {"builder_dir", "name", "data_dir", "split", "image_key", "label_key"}
_FIELDS = {  # format -> (required fields, optional fields)
  "image_folder": ({"root"}, _COMMON_FIELDS),
  "tfds": (set(), _COMMON_FIELDS | _TFDS_FIELDS),
}


# ----------------------------------------------------------------------------- text lists


def shipped_path(name: str) -> Any:
  """The packaged file of a shipped list (`SHIPPED_LISTS`), as an `importlib.resources` path."""
  return importlib.resources.files("vlalign.data").joinpath("metadata", SHIPPED_LISTS[name])


def load_lines(name_or_path: str | os.PathLike) -> list[str]:
  """The non-blank lines of a shipped list or a text file, stripped of surrounding whitespace.

  Args:
    name_or_path: `"imagenet"` (1000 class names), `"clip"` (80 templates), or a path (local or
      `etils.epath`, e.g. `gs://...`) to a UTF-8 file with one entry per line.

  Returns:
    The entries in file order.

  Raises:
    PathError: `name_or_path` is neither a shipped name nor an existing file.
  """
  if isinstance(name_or_path, str) and name_or_path in SHIPPED_LISTS:
    text = shipped_path(name_or_path).read_text(encoding="utf-8")
  else:
    path = epath.Path(name_or_path)
    if not path.is_file():
      raise PathError(
        f"{os.fspath(name_or_path)} does not exist (give a file with one entry per line, or one "
        f"of the shipped lists {sorted(SHIPPED_LISTS)})"
      )
    text = path.read_text(encoding="utf-8")
  return [line.strip() for line in text.splitlines() if line.strip()]


def text_list(value: str | os.PathLike | Sequence[str], what: str) -> list[str]:
  """`value` as a list of str: a shipped name or a file (`load_lines`), or the list itself."""
  if isinstance(value, str | os.PathLike):
    lines = load_lines(value)
  elif isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
    lines = [v.strip() for v in value]
  else:
    raise ConfigError(
      f"{what} must be a shipped list name, a file path or a list of str; got {value!r}"
    )
  if not lines or not all(lines):
    raise ConfigError(f"{what} {value!r} holds an empty entry or none at all")
  return lines


# ----------------------------------------------------------------------------- the source


class LabelledImages:
  """A random-access source of labelled images, decoded on demand.

  Args:
    name: what the source is, for messages.
    class_names: `C` names in label order.
    num_examples: N.
    raw_image: `index -> bytes, a path, or a uint8 [H, W, 3] array`.
    labels_of: `indices [k] -> int32 [k]` labels in `[0, C)`.
  """

  def __init__(
    self,
    name: str,
    class_names: Sequence[str],
    num_examples: int,
    raw_image: Callable[[int], Any],
    labels_of: Callable[[np.ndarray], np.ndarray],
  ):
    if num_examples <= 0:
      raise ConfigError(f"{name} holds no images")
    self.name = name
    self.class_names = tuple(class_names)
    self.num_examples = int(num_examples)
    self._raw_image = raw_image
    self._labels_of = labels_of

  def __len__(self) -> int:
    return self.num_examples

  def __repr__(self) -> str:
    return (
      f"LabelledImages({self.name}, {self.num_examples} images, {len(self.class_names)} classes)"
    )

  def labels(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """int32 `[k]` labels of examples `indices` (no image is read)."""
    return np.asarray(self._labels_of(np.asarray(indices, dtype=np.int64)), dtype=np.int32)

  def image(
    self, index: int, size: int, resize: str = "center_crop", decoder: str = "pil"
  ) -> np.ndarray:
    """uint8 `[size, size, 3]` of example `index` (`images.decode_image`'s resize modes).

    Raises:
      images.UnreadableImageError: a missing, truncated or undecodable image.
    """
    return images.load_image(self._raw_image(int(index)), size, resize, decoder)


def _subset(num_examples: int, max_examples: Any) -> np.ndarray:
  """Indices of the examples kept: all, or `max_examples` evenly spaced ones."""
  if max_examples is None:
    return np.arange(num_examples)
  if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1:
    raise ConfigError(f"max_examples must be a positive int or None; got {max_examples!r}")
  kept = min(num_examples, max_examples)
  return np.arange(kept, dtype=np.int64) * num_examples // kept


def _class_names(classnames: Any, default: Sequence[str], num_classes: int, where: str) -> list:
  """The configured class names (checked against the class count) or the default ones."""
  if classnames is None:
    return [name.replace("_", " ") for name in default]
  names = text_list(classnames, "classnames")
  if len(names) != num_classes:
    given = os.fspath(classnames) if isinstance(classnames, str | os.PathLike) else "list"
    raise ConfigError(
      f"classnames {given} has {len(names)} names but {where} has {num_classes} classes; give "
      "one name per class, in label order"
    )
  return names


def _check_fields(spec: dict) -> str:
  fmt = spec.get("format")
  if fmt not in _FIELDS:
    raise ConfigError(f"unknown labelled-image format {fmt!r}; available: {list(FORMATS)}")
  required, optional = _FIELDS[fmt]
  missing = sorted(required - spec.keys())
  unknown = sorted(spec.keys() - required - optional)
  if missing:
    raise ConfigError(f"{fmt} dataset misses {missing}")
  if unknown:
    raise ConfigError(
      f"{fmt} dataset has unknown fields {unknown}; allowed: {sorted(required | optional)}"
    )
  return fmt


# ----------------------------------------------------------------------------- image folders


def _scan(path: str) -> tuple[list[str], list[str]]:
  """(sorted sub-directory names, sorted file names) of `path`, hidden entries left out."""
  if "://" in path:
    entries = [(p.name, p.is_dir()) for p in epath.Path(path).iterdir()]
  else:
    with os.scandir(path) as it:
      entries = [(e.name, e.is_dir()) for e in it]
  entries = sorted(e for e in entries if not e[0].startswith("."))
  return [n for n, is_dir in entries if is_dir], [n for n, is_dir in entries if not is_dir]


def _is_image(file_name: str) -> bool:
  return file_name.lower().endswith(IMAGE_EXTENSIONS)


def list_image_folder(root: str) -> tuple[list[str], list[str], np.ndarray]:
  """`(class directory names, image paths, labels int32 [N])` of an ImageNet-style tree, sorted.

  Raises:
    PathError: `root` is not a directory.
    ConfigError: it has no class directory or no image.
  """
  root = os.fspath(root)
  if not epath.Path(root).is_dir():
    raise PathError(f"image_folder: root {root} is not a directory")
  class_dirs, _ = _scan(root)
  if not class_dirs:
    raise ConfigError(f"image_folder: {root} has no class sub-directories (root/<class>/<image>)")
  paths, labels = [], []
  for label, class_dir in enumerate(class_dirs):
    directory = os.path.join(root, class_dir)
    names = [n for n in _scan(directory)[1] if _is_image(n)]
    paths.extend(os.path.join(directory, n) for n in names)
    labels.extend([label] * len(names))
  if not paths:
    raise ConfigError(
      f"image_folder: the {len(class_dirs)} class directories of {root} hold no image "
      f"(extensions {IMAGE_EXTENSIONS}, any case)"
    )
  return class_dirs, paths, np.asarray(labels, dtype=np.int32)


def image_folder(spec: dict) -> LabelledImages:
  """The `format="image_folder"` source (see the module docstring)."""
  root = spec["root"]
  class_dirs, paths, labels = list_image_folder(root)
  names = _class_names(spec.get("classnames"), class_dirs, len(class_dirs), f"image_folder {root}")
  kept = _subset(len(paths), spec.get("max_examples"))
  paths = [paths[i] for i in kept]
  labels = labels[kept]
  return LabelledImages(
    f"image_folder {root}", names, len(paths), paths.__getitem__, labels.__getitem__
  )


# ----------------------------------------------------------------------------- TFDS


def tfds_images(spec: dict) -> LabelledImages:
  """The `format="tfds"` source (see the module docstring)."""
  import tensorflow_datasets as tfds

  builder = files.prepared_tfds_builder(spec)
  split = spec.get("split", "validation")
  image_key, label_key = spec.get("image_key", "image"), spec.get("label_key", "label")
  what = f"tfds {spec.get('name') or spec.get('builder_dir')}[{split}]"
  features = builder.info.features
  for key in (image_key, label_key):
    if key not in features:
      raise ConfigError(f"{what}: no feature {key!r}; its features: {sorted(features.keys())}")
  if split not in builder.info.splits:
    raise ConfigError(f"{what}: no split {split!r}; its splits: {sorted(builder.info.splits)}")
  decoders = {image_key: tfds.decode.SkipDecoding()}
  if not isinstance(features[image_key], tfds.features.Image):
    decoders = None  # bytes or arrays, stored as they are
  source = builder.as_data_source(split=split, decoders=decoders)
  default = list(getattr(features[label_key], "names", None) or [])
  num_classes = len(default)
  if spec.get("classnames") is None and not default:
    raise ConfigError(f"{what}: the label feature {label_key!r} has no class names; set classnames")
  if spec.get("classnames") is not None and not default:
    num_classes = len(text_list(spec["classnames"], "classnames"))
  names = _class_names(spec.get("classnames"), default, num_classes, what)
  kept = _subset(len(source), spec.get("max_examples"))

  def raw_image(index: int) -> Any:
    value = source[int(kept[index])][image_key]
    return bytes(value) if isinstance(value, bytes | np.bytes_) else np.asarray(value)

  def labels_of(indices: np.ndarray) -> np.ndarray:
    labels = [int(np.asarray(source[int(kept[i])][label_key])) for i in indices]
    labels = np.asarray(labels, dtype=np.int32)
    if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
      raise ConfigError(f"{what}: labels {labels.min()}..{labels.max()} outside [0, {len(names)})")
    return labels

  return LabelledImages(what, names, len(kept), raw_image, labels_of)


READERS: dict[str, Callable[[dict], LabelledImages]] = {
  "image_folder": image_folder,
  "tfds": tfds_images,
}


def make_source(spec: Any) -> LabelledImages:
  """The labelled-image source a spec describes (see the module docstring)."""
  spec = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
  return READERS[_check_fields(spec)](spec)
