"""ALBEF / TCL pre-training image augmentations as deterministic numpy/PIL functions.

Every function takes and returns uint8 `[H, W, 3]` RGB arrays. Random functions take an explicit
`np.random.Generator` and draw from nothing else (no `np.random.*` module functions, no `random`
module), so one seed gives one output. The ops run on PIL (C loops; the library torchvision calls
for PIL inputs); a recipe converts numpy -> PIL once and back once.

`build_augment(aug_config)` returns `augment_fn(image uint8 [H, W, 3], rng) -> uint8 [h, w, 3]`,
`(h, w)` the configured `image_size`. The cropping recipes also take `source_size=(H0, W0)` and
`source_scale=s` when `image` is a stored `H0 x W0` image decoded at the reduced scale s (a JPEG
draft, `vlalign.data.images.Original`): the crop box is then drawn on `(H0, W0)`, with the same
draws as from the full-resolution image, and cut from `image` at the box times s in sub-pixel
coordinates (PIL `resize(box=)`), so it shows the region the full-resolution crop shows.
Measured with `crop_flip` at 256 px on photos (`bench/decode_bench.py --crops`): a mean absolute
difference from the full-resolution crop of ~0.2 grey levels when the draft keeps both sides >=
2x the output, 0.7-1.6 at 1x (small crops are then upsampled); a box drawn on the drafted image
instead snaps to its coarser grid (0.7-4). Recipes (`aug_config.name`):

- `"none"`: the image unchanged.
- `"resize"`: bicubic resize to `image_size`; the evaluation transform of both references (no
  randomness).
- `"crop_flip"`: random resized crop -> horizontal flip (cheap).
- `"albef"`: ALBEF's pre-training transform: random resized crop -> flip (p 0.5) ->
  RandAugment(2, 7).
- `"tcl"`: TCL's pre-training transform (the "full recipe"): random resized crop -> colour jitter
  (p 0.8) -> grayscale (p 0.2) -> Gaussian blur (p 0.5) -> flip (p 0.5) -> RandAugment(2, 7).

Sources (read for behaviour; no code copied):

1. salesforce/ALBEF `dataset/__init__.py` (commit b9727e4), `pretrain_transform`:
   `RandomResizedCrop(image_res, scale=(0.2, 1.0), BICUBIC)`, `RandomHorizontalFlip()`,
   `RandomAugment(2, 7, isPIL=True, augs=[Identity, AutoContrast, Equalize, Brightness,
   Sharpness, ShearX, ShearY, TranslateX, TranslateY, Rotate])`, then ToTensor + CLIP
   normalisation. Fine-tuning (`train_transform`) is the same with crop scale (0.5, 1.0);
   evaluation is `Resize((image_res, image_res), BICUBIC)` only. ALBEF has NO colour jitter,
   grayscale or blur.
2. uta-smile/TCL `dataset/__init__.py` (commit 74a3e4f), `pretrain_transform`: where TCL differs
   from ALBEF. Between the crop and the flip it inserts
   `RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)`, `RandomGrayscale(p=0.2)` and
   `RandomApply([GaussianBlur([.1, 2.])], p=0.5)`; flip and RandAugment follow unchanged.
3. TCL `dataset/utils.py` `GaussianBlur` (the SimCLR blur): sigma ~ U(0.1, 2.0),
   `PIL.ImageFilter.GaussianBlur(radius=sigma)` (PIL's radius is the standard deviation).
4. `dataset/randaugment.py`, byte-identical in ALBEF and TCL (checked with diff). `RandomAugment`
   draws N op names uniformly WITH replacement, then runs each drawn op with probability 0.5 (so
   0..N ops take effect). Level M over MAX_LEVEL 10:
   - Brightness, Sharpness: factor `M / 10 * 1.8 + 0.1` (1.36 at M 7), never negated.
   - ShearX / ShearY: `M / 10 * 0.3` (0.21), sign flipped with p 0.5; cv2 matrix
     `[[1, s, 0], [0, 1, 0]]`, i.e. shear about the top-left pixel; bilinear; fill 128 grey.
   - TranslateX / TranslateY: `M / 10 * 10` pixels (7 px; absolute pixels, `translate_const`
     10), sign flipped with p 0.5, fill 128.
   - Rotate: `M / 10 * 30` degrees (21), sign flipped with p 0.5, about the centre, fill 128.
   - Identity, AutoContrast (per-channel min/max stretch, cutoff 0), Equalize: no argument; the
     reference documents them as equal to `PIL.ImageOps.autocontrast` / `equalize`.
5. torchvision `transforms.py` / `_functional_pil.py`, for the wrapped transforms:
   `RandomResizedCrop.get_params`: 10 tries of area ~ U(scale) * H * W and log aspect
   ~ U(log ratio), `w = round(sqrt(area * aspect))`, `h = round(sqrt(area / aspect))`, uniform
   offsets; else a centre crop clamped to the ratio range; default ratio (3/4, 4/3); crop, then
   resize. `ColorJitter`: brightness/contrast/saturation factors ~ U(max(0, 1 - s), 1 + s), hue
   ~ U(-h, h), the four ops in a uniformly random order (`torch.randperm(4)`), strength 0 skips
   its op; PIL ops `ImageEnhance.Brightness/Contrast/Color`, hue = PIL HSV hue byte shifted by
   `uint8(hue * 255)` with wraparound. `RandomGrayscale`: `convert("L")` (ITU-R 601-2 luma
   `(299 R + 587 G + 114 B) / 1000`) on 3 channels. `RandomApply`, flip and grayscale fire when
   a uniform draw is below p.

Deliberate differences from the reference (each at most one grey level or half a pixel):

- RandAugment ops run on PIL, not cv2. Brightness is `ImageEnhance.Brightness` (rounds; the
  reference's table truncates). Sharpness is `ImageEnhance.Sharpness`, which the reference imitates
  but casts to uint8 WITHOUT clipping (values above 255 wrap there; here they clip). Rotate turns
  about the true image centre (cv2's `getRotationMatrix2D((W / 2, H / 2))` is half a pixel off).
  Shear and translate reproduce the cv2 pixel geometry exactly.
- AutoContrast uses an exact integer table; the reference's and PIL's float tables can put a value
  one level low (a channel's max can map to 254).
- Translation (pixels) and blur sigma are absolute, as in the references, which ran at 256 px
  (`image_res` 256). At 64 px they are relatively 4x stronger; scale `randaug_translate_const` and
  `blur_sigma` in the config if that matters.
"""

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

AugmentFn = Callable[[np.ndarray, np.random.Generator], np.ndarray]
Size = int | tuple[int, int]
Box = tuple[int, int, int, int]  # (top, left, height, width) in pixels

RANDAUG_OPS = (
  "identity",
  "autocontrast",
  "equalize",
  "brightness",
  "sharpness",
  "shear_x",
  "shear_y",
  "translate_x",
  "translate_y",
  "rotate",
)
RANDAUG_MAX_LEVEL = 10.0
RANDAUG_FILL = (128, 128, 128)
RECIPES = ("none", "resize", "crop_flip", "albef", "tcl")

_BICUBIC = Image.Resampling.BICUBIC
_BILINEAR = Image.Resampling.BILINEAR


# ----------------------------------------------------------------------------- conversions


def _check_image(image: np.ndarray) -> None:
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")


def _to_pil(image: np.ndarray) -> Image.Image:
  _check_image(image)
  return Image.fromarray(np.ascontiguousarray(image))


def _to_numpy(image: Image.Image) -> np.ndarray:
  """PIL RGB image -> writable uint8 `[H, W, 3]` (np.asarray of a PIL image is read-only)."""
  return np.array(image, dtype=np.uint8)


def _size_hw(size: Size) -> tuple[int, int]:
  if isinstance(size, int | np.integer):
    return int(size), int(size)
  height, width = size
  return int(height), int(width)


# ----------------------------------------------------------------------------- PIL-level ops
# Private: RGB PIL image in, RGB PIL image out. The recipes chain these with one conversion from
# and one to numpy; the public numpy functions below wrap them one at a time.


def _crop_and_resize_pil(image: Image.Image, box: Box, size: Size) -> Image.Image:
  top, left, box_h, box_w = box
  out_h, out_w = _size_hw(size)
  return image.crop((left, top, left + box_w, top + box_h)).resize((out_w, out_h), _BICUBIC)


def _hflip_pil(image: Image.Image) -> Image.Image:
  return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def _brightness_pil(image: Image.Image, factor: float) -> Image.Image:
  return ImageEnhance.Brightness(image).enhance(float(factor))


def _contrast_pil(image: Image.Image, factor: float) -> Image.Image:
  return ImageEnhance.Contrast(image).enhance(float(factor))


def _saturation_pil(image: Image.Image, factor: float) -> Image.Image:
  return ImageEnhance.Color(image).enhance(float(factor))


def _hue_pil(image: Image.Image, hue: float) -> Image.Image:
  if not -0.5 <= hue <= 0.5:
    raise ValueError(f"hue {hue} is not in [-0.5, 0.5]")
  shift = int(hue * 255) % 256  # torchvision: uint8(hue * 255), truncated, wrapped
  h, s, v = image.convert("HSV").split()
  h = h.point([(i + shift) % 256 for i in range(256)])
  return Image.merge("HSV", (h, s, v)).convert("RGB")


def _grayscale_pil(image: Image.Image) -> Image.Image:
  return image.convert("L").convert("RGB")


def _blur_pil(image: Image.Image, sigma: float) -> Image.Image:
  return image.filter(ImageFilter.GaussianBlur(radius=float(sigma)))


def _channel_histograms(image: Image.Image) -> np.ndarray:
  """`[3, 256]` int64 per-channel histograms of an RGB image."""
  return np.asarray(image.histogram(), dtype=np.int64).reshape(3, 256)


def _last_nonzero_bin(histograms: np.ndarray) -> np.ndarray:
  """`[C]` index of the highest non-empty bin of each `[C, 256]` histogram (0 if all empty)."""
  return 255 - np.argmax(histograms[:, ::-1] > 0, axis=1)


def _autocontrast_pil(image: Image.Image) -> Image.Image:
  # Per-channel lookup table `(v - lo) * 255 // (hi - lo)` in exact integer arithmetic. PIL and the
  # reference compute `int(v * (255 / (hi - lo)) - lo * 255 / (hi - lo))` in floats, which can land
  # one level low where the exact value is an integer (e.g. `hi` -> 254 instead of 255).
  hist = _channel_histograms(image)
  lo = np.argmax(hist > 0, axis=1)[:, None]
  hi = _last_nonzero_bin(hist)[:, None]
  levels = np.arange(256)[None, :]
  stretched = np.clip((levels - lo) * 255 // np.maximum(hi - lo, 1), 0, 255)
  lut = np.where(hi > lo, stretched, levels)
  return image.point(lut.ravel().tolist())


def _equalize_pil(image: Image.Image) -> Image.Image:
  # PIL's ImageOps.equalize with the lookup table built in numpy, not Python.
  hist = _channel_histograms(image)
  last = hist[np.arange(3), _last_nonzero_bin(hist)]
  step = (hist.sum(axis=1) - last) // 255
  below = np.cumsum(hist, axis=1) - hist  # pixels strictly below each level
  safe_step = np.maximum(step, 1)[:, None]
  equalized = np.minimum((safe_step // 2 + below) // safe_step, 255)
  lut = np.where(step[:, None] > 0, equalized, np.arange(256)[None, :])
  return image.point(lut.ravel().tolist())


def _sharpness_pil(image: Image.Image, factor: float) -> Image.Image:
  return ImageEnhance.Sharpness(image).enhance(float(factor))


def _affine_pil(image: Image.Image, inverse: Sequence[float], fill: Sequence[int]) -> Image.Image:
  """Bilinear affine warp; `inverse` maps output to input PIL coordinates (corners at integers)."""
  return image.transform(
    image.size, Image.Transform.AFFINE, tuple(inverse), resample=_BILINEAR, fillcolor=tuple(fill)
  )


def _shear_x_pil(image: Image.Image, factor: float, fill: Sequence[int]) -> Image.Image:
  # Pixel-index map x_in = x - factor * y is, in PIL's corner-based coordinates, offset factor / 2.
  return _affine_pil(image, (1.0, -factor, 0.5 * factor, 0.0, 1.0, 0.0), fill)


def _shear_y_pil(image: Image.Image, factor: float, fill: Sequence[int]) -> Image.Image:
  return _affine_pil(image, (1.0, 0.0, 0.0, -factor, 1.0, 0.5 * factor), fill)


def _translate_x_pil(image: Image.Image, pixels: float, fill: Sequence[int]) -> Image.Image:
  return _affine_pil(image, (1.0, 0.0, pixels, 0.0, 1.0, 0.0), fill)


def _translate_y_pil(image: Image.Image, pixels: float, fill: Sequence[int]) -> Image.Image:
  return _affine_pil(image, (1.0, 0.0, 0.0, 0.0, 1.0, pixels), fill)


def _rotate_pil(image: Image.Image, degrees: float, fill: Sequence[int]) -> Image.Image:
  return image.rotate(float(degrees), resample=_BILINEAR, fillcolor=tuple(fill))


# ----------------------------------------------------------------------------- geometry


def resize(image: np.ndarray, size: Size) -> np.ndarray:
  """Bicubic (antialiased, PIL) resize of uint8 `[H, W, 3]` to `[h, w, 3]`; size: h = w or (h, w).

  The evaluation transform of ALBEF and TCL (`Resize((res, res), BICUBIC)`; no aspect preservation).
  """
  height, width = _size_hw(size)
  return _to_numpy(_to_pil(image).resize((width, height), _BICUBIC))


def sample_crop_box(
  rng: np.random.Generator,
  height: int,
  width: int,
  scale: Sequence[float] = (0.2, 1.0),
  ratio: Sequence[float] = (3 / 4, 4 / 3),
) -> Box:
  """torchvision's `RandomResizedCrop.get_params` on `rng`: a box `(top, left, h, w)` of the image.

  Up to 10 tries of area fraction ~ U(scale) and log aspect (w / h) ~ U(log ratio), with the box
  sides rounded to pixels; the first box that fits wins, at a uniform offset. If none fits, a centre
  crop of the whole image clamped to the ratio range.
  """
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    box_w = int(round(math.sqrt(target_area * aspect)))
    box_h = int(round(math.sqrt(target_area / aspect)))
    if 0 < box_w <= width and 0 < box_h <= height:
      top = int(rng.integers(0, height - box_h + 1))
      left = int(rng.integers(0, width - box_w + 1))
      return top, left, box_h, box_w
  in_ratio = width / height
  if in_ratio < min(ratio):
    box_w, box_h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    box_w, box_h = int(round(height * max(ratio))), height
  else:
    box_w, box_h = width, height
  return (height - box_h) // 2, (width - box_w) // 2, box_h, box_w


def crop_and_resize(image: np.ndarray, box: Box, size: Size) -> np.ndarray:
  """`image[top:top + h, left:left + w]` resized (bicubic) to `size`: uint8 `[h', w', 3]`."""
  return _to_numpy(_crop_and_resize_pil(_to_pil(image), box, size))


def random_resized_crop(
  image: np.ndarray,
  rng: np.random.Generator,
  size: Size,
  scale: Sequence[float] = (0.2, 1.0),
  ratio: Sequence[float] = (3 / 4, 4 / 3),
) -> np.ndarray:
  """Random crop (`sample_crop_box`) of uint8 `[H, W, 3]`, bicubic-resized to `size`."""
  _check_image(image)
  box = sample_crop_box(rng, image.shape[0], image.shape[1], scale, ratio)
  return crop_and_resize(image, box, size)


def hflip(image: np.ndarray) -> np.ndarray:
  """Left-right mirror of uint8 `[H, W, 3]` (a contiguous copy of `image[:, ::-1]`)."""
  _check_image(image)
  return np.ascontiguousarray(image[:, ::-1])


# ----------------------------------------------------------------------------- colour


def adjust_brightness(image: np.ndarray, factor: float) -> np.ndarray:
  """PIL `ImageEnhance.Brightness`: blend with black, `x * factor` rounded and clipped."""
  return _to_numpy(_brightness_pil(_to_pil(image), factor))


def adjust_contrast(image: np.ndarray, factor: float) -> np.ndarray:
  """PIL `ImageEnhance.Contrast`: blend with the image's mean luma (a grey constant)."""
  return _to_numpy(_contrast_pil(_to_pil(image), factor))


def adjust_saturation(image: np.ndarray, factor: float) -> np.ndarray:
  """PIL `ImageEnhance.Color`: blend with the image's grayscale version (0 gives grayscale)."""
  return _to_numpy(_saturation_pil(_to_pil(image), factor))


def adjust_hue(image: np.ndarray, hue: float) -> np.ndarray:
  """torchvision's PIL hue shift: add `trunc(hue * 255)` mod 256 to PIL's HSV hue byte.

  `hue` in [-0.5, 0.5] is a fraction of the colour circle. The HSV round trip is lossy by a few
  levels even for `hue` 0.
  """
  return _to_numpy(_hue_pil(_to_pil(image), hue))


_JITTER_FNS = {
  "brightness": _brightness_pil,
  "contrast": _contrast_pil,
  "saturation": _saturation_pil,
  "hue": _hue_pil,
}


def sample_color_jitter(
  rng: np.random.Generator,
  brightness: float = 0.4,
  contrast: float = 0.4,
  saturation: float = 0.4,
  hue: float = 0.1,
) -> list[tuple[str, float]]:
  """torchvision `ColorJitter.get_params` on `rng`: `[(op name, factor), ...]` in application order.

  The four ops come in a uniformly random order; a strength of 0 drops its op. Factors:
  brightness/contrast/saturation ~ U(max(0, 1 - s), 1 + s), hue ~ U(-h, h).
  """
  strengths = {"brightness": brightness, "contrast": contrast, "saturation": saturation, "hue": hue}
  names = list(_JITTER_FNS)
  ops = []
  for index in rng.permutation(len(names)):
    name = names[int(index)]
    strength = float(strengths[name])
    if strength < 0:
      raise ValueError(f"colour jitter strength {name}={strength} is negative")
    if strength == 0:
      continue
    if name == "hue":
      factor = rng.uniform(-strength, strength)
    else:
      factor = rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength)
    ops.append((name, float(factor)))
  return ops


def _apply_color_jitter_pil(image: Image.Image, ops: Sequence[tuple[str, float]]) -> Image.Image:
  for name, factor in ops:
    image = _JITTER_FNS[name](image, factor)
  return image


def apply_color_jitter(image: np.ndarray, ops: Sequence[tuple[str, float]]) -> np.ndarray:
  """Applies `sample_color_jitter`'s `[(op name, factor), ...]` in order to uint8 `[H, W, 3]`."""
  return _to_numpy(_apply_color_jitter_pil(_to_pil(image), ops))


def color_jitter(
  image: np.ndarray,
  rng: np.random.Generator,
  brightness: float = 0.4,
  contrast: float = 0.4,
  saturation: float = 0.4,
  hue: float = 0.1,
) -> np.ndarray:
  """torchvision `ColorJitter(brightness, contrast, saturation, hue)` on uint8 `[H, W, 3]`."""
  _check_image(image)
  return apply_color_jitter(image, sample_color_jitter(rng, brightness, contrast, saturation, hue))


def grayscale(image: np.ndarray) -> np.ndarray:
  """PIL `convert("L")` (ITU-R 601-2 luma `(299 R + 587 G + 114 B) / 1000`) on all 3 channels."""
  return _to_numpy(_grayscale_pil(_to_pil(image)))


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
  """PIL `ImageFilter.GaussianBlur` with standard deviation `sigma` pixels on uint8 `[H, W, 3]`."""
  return _to_numpy(_blur_pil(_to_pil(image), sigma))


def gaussian_blur(
  image: np.ndarray, rng: np.random.Generator, sigma_range: Sequence[float] = (0.1, 2.0)
) -> np.ndarray:
  """TCL's (SimCLR) blur: `blur(image, sigma)` with sigma ~ U(sigma_range)."""
  return blur(image, rng.uniform(sigma_range[0], sigma_range[1]))


# ----------------------------------------------------------------------------- RandAugment ops


def identity(image: np.ndarray) -> np.ndarray:
  """The image unchanged (RandAugment's Identity)."""
  _check_image(image)
  return image


def autocontrast(image: np.ndarray) -> np.ndarray:
  """Each channel's [min, max] stretched to [0, 255] (`PIL.ImageOps.autocontrast`, cutoff 0).

  Exact integer lookup table `(v - min) * 255 // (max - min)`; PIL's float version can be one level
  lower (its max can map to 254). A constant channel is left unchanged.
  """
  return _to_numpy(_autocontrast_pil(_to_pil(image)))


def equalize(image: np.ndarray) -> np.ndarray:
  """PIL `ImageOps.equalize`: per-channel histogram equalisation."""
  return _to_numpy(_equalize_pil(_to_pil(image)))


def brightness(image: np.ndarray, factor: float) -> np.ndarray:
  """RandAugment Brightness: `adjust_brightness(image, factor)`."""
  return adjust_brightness(image, factor)


def sharpness(image: np.ndarray, factor: float) -> np.ndarray:
  """PIL `ImageEnhance.Sharpness`: blend with the 3x3 smoothed image (1 keeps, > 1 sharpens)."""
  return _to_numpy(_sharpness_pil(_to_pil(image), factor))


def shear_x(image: np.ndarray, factor: float, fill: Sequence[int] = RANDAUG_FILL) -> np.ndarray:
  """Horizontal shear about the top-left pixel: `out[y, x] = image[y, x - factor * y]`, bilinear."""
  return _to_numpy(_shear_x_pil(_to_pil(image), factor, fill))


def shear_y(image: np.ndarray, factor: float, fill: Sequence[int] = RANDAUG_FILL) -> np.ndarray:
  """Vertical shear about the top-left pixel: `out[y, x] = image[y - factor * x, x]`, bilinear."""
  return _to_numpy(_shear_y_pil(_to_pil(image), factor, fill))


def translate_x(image: np.ndarray, pixels: float, fill: Sequence[int] = RANDAUG_FILL) -> np.ndarray:
  """`out[:, x] = image[:, x + pixels]` (content moves left for pixels > 0), `fill` outside."""
  return _to_numpy(_translate_x_pil(_to_pil(image), pixels, fill))


def translate_y(image: np.ndarray, pixels: float, fill: Sequence[int] = RANDAUG_FILL) -> np.ndarray:
  """`out[y] = image[y + pixels]` (content moves up for pixels > 0), `fill` outside."""
  return _to_numpy(_translate_y_pil(_to_pil(image), pixels, fill))


def rotate(image: np.ndarray, degrees: float, fill: Sequence[int] = RANDAUG_FILL) -> np.ndarray:
  """Counter-clockwise rotation by `degrees` about the image centre, bilinear, `fill` outside."""
  return _to_numpy(_rotate_pil(_to_pil(image), degrees, fill))


# PIL-level RandAugment ops, all `(image, argument) -> image`.
_RANDAUG_PIL_FNS: dict[str, Callable[[Image.Image, float], Image.Image]] = {
  "identity": lambda image, _: image,
  "autocontrast": lambda image, _: _autocontrast_pil(image),
  "equalize": lambda image, _: _equalize_pil(image),
  "brightness": _brightness_pil,
  "sharpness": _sharpness_pil,
  "shear_x": lambda image, arg: _shear_x_pil(image, arg, RANDAUG_FILL),
  "shear_y": lambda image, arg: _shear_y_pil(image, arg, RANDAUG_FILL),
  "translate_x": lambda image, arg: _translate_x_pil(image, arg, RANDAUG_FILL),
  "translate_y": lambda image, arg: _translate_y_pil(image, arg, RANDAUG_FILL),
  "rotate": lambda image, arg: _rotate_pil(image, arg, RANDAUG_FILL),
}
_NO_ARGUMENT_OPS = ("identity", "autocontrast", "equalize")
_UNSIGNED_OPS = ("brightness", "sharpness")


@dataclasses.dataclass(frozen=True)
class RandAugmentOp:
  """One drawn RandAugment op.

  Attributes:
    name: one of `RANDAUG_OPS`.
    applied: whether its probability draw let it run.
    argument: the op's signed argument (factor, pixels or degrees); 0 for argument-free ops and for
      ops not applied.
  """

  name: str
  applied: bool
  argument: float = 0.0


def rand_augment_magnitude(name: str, m: float, translate_const: float = 10.0) -> float:
  """The unsigned argument of op `name` at level `m` (of `RANDAUG_MAX_LEVEL`), as in ALBEF/TCL."""
  level = m / RANDAUG_MAX_LEVEL
  if name in _NO_ARGUMENT_OPS:
    return 0.0
  if name in _UNSIGNED_OPS:
    return level * 1.8 + 0.1
  if name in ("shear_x", "shear_y"):
    return level * 0.3
  if name in ("translate_x", "translate_y"):
    return level * float(translate_const)
  if name == "rotate":
    return level * 30.0
  raise ValueError(f"unknown RandAugment op {name!r}; known: {RANDAUG_OPS}")


def sample_rand_augment(
  rng: np.random.Generator,
  n: int = 2,
  m: float = 7,
  op_names: Sequence[str] = RANDAUG_OPS,
  op_prob: float = 0.5,
  translate_const: float = 10.0,
) -> tuple[RandAugmentOp, ...]:
  """ALBEF's `RandomAugment` draws: `n` ops uniformly with replacement, each applied with `op_prob`.

  Signed ops (shear, translate, rotate) flip their sign with probability 0.5.

  Returns:
    `n` `RandAugmentOp`s in application order.
  """
  for name in op_names:
    if name not in _RANDAUG_PIL_FNS:
      raise ValueError(f"unknown RandAugment op {name!r}; known: {RANDAUG_OPS}")
  picks = rng.integers(0, len(op_names), size=int(n))
  ops = []
  for pick in picks:
    name = op_names[int(pick)]
    applied = bool(rng.random() < op_prob)
    argument = rand_augment_magnitude(name, m, translate_const) if applied else 0.0
    if applied and name not in _NO_ARGUMENT_OPS + _UNSIGNED_OPS and rng.random() < 0.5:
      argument = -argument
    ops.append(RandAugmentOp(name, applied, argument))
  return tuple(ops)


def _apply_rand_augment_pil(image: Image.Image, ops: Sequence[RandAugmentOp]) -> Image.Image:
  for op in ops:
    if op.applied:
      image = _RANDAUG_PIL_FNS[op.name](image, op.argument)
  return image


def apply_rand_augment(image: np.ndarray, ops: Sequence[RandAugmentOp]) -> np.ndarray:
  """Runs the applied ops of `sample_rand_augment` in order on uint8 `[H, W, 3]`."""
  return _to_numpy(_apply_rand_augment_pil(_to_pil(image), ops))


def rand_augment(
  image: np.ndarray,
  rng: np.random.Generator,
  n: int = 2,
  m: float = 7,
  op_names: Sequence[str] = RANDAUG_OPS,
  op_prob: float = 0.5,
  translate_const: float = 10.0,
) -> np.ndarray:
  """ALBEF/TCL `RandomAugment(n, m)` on uint8 `[H, W, 3]` (see `sample_rand_augment`)."""
  _check_image(image)
  ops = sample_rand_augment(rng, n, m, op_names, op_prob, translate_const)
  return apply_rand_augment(image, ops)


# ----------------------------------------------------------------------------- recipes


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Recipe parameters; defaults are the ALBEF/TCL pre-training values. See the module docstring."""

  name: str
  image_size: Size
  crop_scale: tuple[float, float] = (0.2, 1.0)
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip_prob: float = 0.5
  jitter_prob: float = 0.8
  jitter_brightness: float = 0.4
  jitter_contrast: float = 0.4
  jitter_saturation: float = 0.4
  jitter_hue: float = 0.1
  grayscale_prob: float = 0.2
  blur_prob: float = 0.5
  blur_sigma: tuple[float, float] = (0.1, 2.0)
  randaug_n: int = 2
  randaug_m: float = 7
  randaug_op_prob: float = 0.5
  randaug_translate_const: float = 10.0
  randaug_ops: tuple[str, ...] = RANDAUG_OPS


def _crop_pil(
  image: np.ndarray,
  rng: np.random.Generator,
  cfg: AugmentConfig,
  source_size: tuple[int, int] | None = None,
  source_scale: float = 1.0,
) -> Image.Image:
  """Random resized crop of `image`, or of the `source_size` image it is decoded from at
  `source_scale` (module docstring)."""
  _check_image(image)
  height, width = image.shape[:2] if source_size is None else source_size
  box = sample_crop_box(rng, int(height), int(width), cfg.crop_scale, cfg.crop_ratio)
  if source_scale == 1.0 and (height, width) == image.shape[:2]:
    return _crop_and_resize_pil(_to_pil(image), box, cfg.image_size)
  top, left, box_h, box_w = (v * float(source_scale) for v in box)
  out_h, out_w = _size_hw(cfg.image_size)
  region = (left, top, left + box_w, top + box_h)
  return _to_pil(image).resize((out_w, out_h), _BICUBIC, box=region)


def _flip_pil(pil: Image.Image, rng: np.random.Generator, cfg: AugmentConfig) -> Image.Image:
  return _hflip_pil(pil) if rng.random() < cfg.flip_prob else pil


def _rand_augment_pil(
  pil: Image.Image, rng: np.random.Generator, cfg: AugmentConfig
) -> Image.Image:
  ops = sample_rand_augment(
    rng,
    cfg.randaug_n,
    cfg.randaug_m,
    cfg.randaug_ops,
    cfg.randaug_op_prob,
    cfg.randaug_translate_const,
  )
  return _apply_rand_augment_pil(pil, ops)


def none_augment(image: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
  """Recipe `"none"`: the image unchanged."""
  del rng, cfg
  _check_image(image)
  return image


def resize_augment(image: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
  """Recipe `"resize"` (evaluation): bicubic resize to `cfg.image_size`; `rng` is unused."""
  del rng
  return resize(image, cfg.image_size)


def crop_flip_augment(
  image: np.ndarray,
  rng: np.random.Generator,
  cfg: AugmentConfig,
  source_size: tuple[int, int] | None = None,
  source_scale: float = 1.0,
) -> np.ndarray:
  """Recipe `"crop_flip"`: random resized crop -> flip (`source_*`: module docstring)."""
  pil = _crop_pil(image, rng, cfg, source_size, source_scale)
  return _to_numpy(_flip_pil(pil, rng, cfg))


def albef_augment(
  image: np.ndarray,
  rng: np.random.Generator,
  cfg: AugmentConfig,
  source_size: tuple[int, int] | None = None,
  source_scale: float = 1.0,
) -> np.ndarray:
  """Recipe `"albef"`: random resized crop -> flip -> RandAugment (`source_*`: module
  docstring)."""
  pil = _flip_pil(_crop_pil(image, rng, cfg, source_size, source_scale), rng, cfg)
  return _to_numpy(_rand_augment_pil(pil, rng, cfg))


def tcl_augment(
  image: np.ndarray,
  rng: np.random.Generator,
  cfg: AugmentConfig,
  source_size: tuple[int, int] | None = None,
  source_scale: float = 1.0,
) -> np.ndarray:
  """Recipe `"tcl"`: crop -> jitter (p) -> grayscale (p) -> blur (p) -> flip (p) -> RandAugment
  (`source_*`: module docstring)."""
  pil = _crop_pil(image, rng, cfg, source_size, source_scale)
  if rng.random() < cfg.jitter_prob:
    jitter = sample_color_jitter(
      rng, cfg.jitter_brightness, cfg.jitter_contrast, cfg.jitter_saturation, cfg.jitter_hue
    )
    pil = _apply_color_jitter_pil(pil, jitter)
  if rng.random() < cfg.grayscale_prob:
    pil = _grayscale_pil(pil)
  if rng.random() < cfg.blur_prob:
    pil = _blur_pil(pil, rng.uniform(cfg.blur_sigma[0], cfg.blur_sigma[1]))
  pil = _flip_pil(pil, rng, cfg)
  return _to_numpy(_rand_augment_pil(pil, rng, cfg))


_RECIPE_FNS = {
  "none": none_augment,
  "resize": resize_augment,
  "crop_flip": crop_flip_augment,
  "albef": albef_augment,
  "tcl": tcl_augment,
}


def augment_config_from(aug_config: Mapping[str, Any] | Any) -> AugmentConfig:
  """`AugmentConfig` from a dict or `ml_collections.ConfigDict`; unknown fields raise ValueError."""
  fields = dict(aug_config.to_dict() if hasattr(aug_config, "to_dict") else aug_config)
  known = {f.name for f in dataclasses.fields(AugmentConfig)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"unknown augmentation config fields {unknown}; known: {sorted(known)}")
  name = fields.get("name")
  if name not in _RECIPE_FNS:
    raise ValueError(f"unknown augmentation recipe {name!r}; choose one of {RECIPES}")
  if "image_size" not in fields:
    raise ValueError("augmentation config needs `image_size` (int or (height, width))")
  size = fields["image_size"]
  fields["image_size"] = int(size) if isinstance(size, int | np.integer) else _size_hw(size)
  for key in ("crop_scale", "crop_ratio", "blur_sigma", "randaug_ops"):
    if key in fields:
      fields[key] = tuple(fields[key])
  unknown_ops = sorted(set(fields.get("randaug_ops", ())) - set(RANDAUG_OPS))
  if unknown_ops:
    raise ValueError(f"unknown RandAugment ops {unknown_ops}; known: {RANDAUG_OPS}")
  return AugmentConfig(**fields)


def build_augment(aug_config: Mapping[str, Any] | Any) -> AugmentFn:
  """`augment_fn(image uint8 [H, W, 3], rng) -> uint8 [h, w, 3]` for `aug_config.name`.

  Args:
    aug_config: dict or ConfigDict with `name` (one of `RECIPES`), `image_size` (int or (h, w)) and
      optionally any other `AugmentConfig` field.

  Returns:
    A picklable function (a `functools.partial` of a module-level recipe), so Grain workers can take
    it. Its output is `image_size` for every recipe but `"none"`.
  """
  cfg = augment_config_from(aug_config)
  return functools.partial(_RECIPE_FNS[cfg.name], cfg=cfg)
