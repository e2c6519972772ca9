"""Grain transforms from a raw example (`vlalign.data.shapes`) to the batch contract.

Train chain (see `vlalign.data.pipeline.make_train_dataset`): `PickCaption` (random) ->
[`AugmentImage(output_key="image_aug")` (random, only with `data.augment_views = 2`)] ->
`AugmentImage` (random, only with an augmentation) -> `TokenizeCaption` -> `ToTrainFeatures` ->
batch -> `NormalizeImage`.

Both views are drawn from the same raw source image in `image`, each with its own seeded Grain
random stream; the second view is written first because view 1 then replaces the raw `image`.
Normalising after batching runs one vectorised op per batch instead of one per image;
`normalize_image` accepts any leading shape.
"""

from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

# CLIP's per-channel RGB statistics, the one place the normalisation constants live.
IMAGE_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
IMAGE_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
_SCALE = np.float32(1.0 / 255.0) / IMAGE_STD
_OFFSET = IMAGE_MEAN / IMAGE_STD

# Keys of a one-view train example after `ToTrainFeatures` (and of a batch).
TRAIN_KEYS = ("image", "text_ids", "text_mask", "image_id")
# The second augmented view (TCL's teacher view); with two views it follows `image` in the keys.
SECOND_VIEW_KEY = "image_aug"

AugmentFn = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def normalize_image(image: np.ndarray) -> np.ndarray:
  """uint8 `[..., H, W, 3]` -> float32 `(x / 255 - IMAGE_MEAN) / IMAGE_STD`, same shape."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.shape[-1] != 3:
    raise ValueError(f"expected uint8 [..., H, W, 3] images, got {image.dtype} {image.shape}")
  out = image.astype(np.float32)
  out *= _SCALE
  out -= _OFFSET
  return out


class PickCaption(grain.transforms.RandomMap):
  """Adds `caption`: one of the example's `captions`, uniformly at random."""

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    captions = element["captions"]
    return {**element, "caption": captions[int(rng.integers(len(captions)))]}


class AugmentImage(grain.transforms.RandomMap):
  """Sets `output_key` to `augment_fn(image uint8 [H, W, 3], rng) -> uint8 [H, W, 3]`.

  Reads the example's `image` (the raw source image while no earlier map replaced it) and checks
  that the output keeps its shape and dtype.
  """

  def __init__(self, augment_fn: AugmentFn, output_key: str = "image"):
    self.augment_fn = augment_fn
    self.output_key = output_key

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    source = element["image"]
    image = self.augment_fn(source, rng)
    if image.dtype != np.uint8 or image.shape != source.shape:
      raise ValueError(
        f"augment_fn must return uint8 {source.shape} (the data image size), got "
        f"{image.dtype} {image.shape}"
      )
    return {**element, self.output_key: image}


class TokenizeCaption(grain.transforms.Map):
  """Adds `text_ids` `[L]` int32 and `text_mask` `[L]` int32 from `caption`."""

  def __init__(self, tokenizer: Any, max_len: int):
    self.tokenizer = tokenizer
    self.max_len = int(max_len)

  def map(self, element: dict) -> dict:
    ids, mask = self.tokenizer.encode(element["caption"], self.max_len)
    return {**element, "text_ids": ids, "text_mask": mask}


# Keys a source may add to flag an example it could not read (`vlalign.data.files`); kept by
# `ToTrainFeatures` for the stage that drops such examples before batching.
VALIDITY_KEYS = ("valid", "error")


class ToTrainFeatures(grain.transforms.Map):
  """Keeps `keys` only, in that order (no strings reach the batcher), plus the `VALIDITY_KEYS`
  present; `image_id` as int32."""

  def __init__(self, keys: Sequence[str] = TRAIN_KEYS):
    self.keys = tuple(keys)

  def map(self, element: dict) -> dict:
    features = {key: element[key] for key in self.keys}
    features.update({key: element[key] for key in VALIDITY_KEYS if key in element})
    if "image_id" in features:
      features["image_id"] = np.int32(features["image_id"])
    return features


class NormalizeImage(grain.transforms.Map):
  """Each of `keys` uint8 -> float32 with `normalize_image` (an example or a batch)."""

  def __init__(self, keys: Sequence[str] = ("image",)):
    self.keys = tuple(keys)

  def map(self, element: dict) -> dict:
    return {**element, **{key: normalize_image(element[key]) for key in self.keys}}
