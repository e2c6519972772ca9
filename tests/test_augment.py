"""Tests for vlalign.data.augment against numpy slicing, plain formulas and PIL.ImageOps."""

import math
import pathlib
import pickle
import re

import ml_collections
import numpy as np
import pytest
from PIL import Image, ImageOps

from vlalign.data import augment as A

SIZES = [(8, 8), (13, 21), (64, 64)]


def _image(shape=(16, 16), seed=0, low=0, high=256) -> np.ndarray:
  return np.random.default_rng(seed).integers(low, high, (*shape, 3), dtype=np.uint8)


def _rng(seed=0) -> np.random.Generator:
  return np.random.default_rng(seed)


# Every public op, as image -> image.
OPS = {
  "resize": lambda x: A.resize(x, (x.shape[0], x.shape[1])),
  "random_resized_crop": lambda x: A.random_resized_crop(x, _rng(), (x.shape[0], x.shape[1])),
  "hflip": A.hflip,
  "color_jitter": lambda x: A.color_jitter(x, _rng()),
  "adjust_brightness": lambda x: A.adjust_brightness(x, 1.3),
  "adjust_contrast": lambda x: A.adjust_contrast(x, 0.7),
  "adjust_saturation": lambda x: A.adjust_saturation(x, 1.3),
  "adjust_hue": lambda x: A.adjust_hue(x, -0.1),
  "grayscale": A.grayscale,
  "gaussian_blur": lambda x: A.gaussian_blur(x, _rng()),
  "rand_augment": lambda x: A.rand_augment(x, _rng(), op_prob=1.0),
  "identity": A.identity,
  "autocontrast": A.autocontrast,
  "equalize": A.equalize,
  "brightness": lambda x: A.brightness(x, 1.36),
  "sharpness": lambda x: A.sharpness(x, 1.36),
  "shear_x": lambda x: A.shear_x(x, 0.21),
  "shear_y": lambda x: A.shear_y(x, -0.21),
  "translate_x": lambda x: A.translate_x(x, 7),
  "translate_y": lambda x: A.translate_y(x, -7),
  "rotate": lambda x: A.rotate(x, 21),
}


@pytest.mark.parametrize("shape", SIZES)
@pytest.mark.parametrize("op", sorted(OPS))
def test_op_keeps_shape_and_dtype_and_input(op, shape):
  image = _image(shape)
  before = image.copy()
  out = OPS[op](image)
  assert out.shape == image.shape and out.dtype == np.uint8
  np.testing.assert_array_equal(image, before)


@pytest.mark.parametrize("name", A.RECIPES)
@pytest.mark.parametrize("shape", SIZES)
@pytest.mark.parametrize("image_size", [12, (10, 14)])
def test_recipe_shapes_and_dtype(name, shape, image_size):
  fn = A.build_augment({"name": name, "image_size": image_size})
  out = fn(_image(shape), _rng(1))
  expected = shape if name == "none" else A._size_hw(image_size)
  assert out.shape == (*expected, 3) and out.dtype == np.uint8
  assert out.flags.writeable


@pytest.mark.parametrize("name", ["crop_flip", "albef", "tcl"])
def test_recipe_is_deterministic_in_the_seed(name):
  fn = A.build_augment({"name": name, "image_size": 16})
  image = _image((24, 20))
  outs = [fn(image, _rng(seed)) for seed in range(6)]
  for seed in range(6):
    np.testing.assert_array_equal(fn(image, _rng(seed)), outs[seed])
  assert any(not np.array_equal(outs[0], out) for out in outs[1:])


@pytest.mark.parametrize(
  "op", ["random_resized_crop", "color_jitter", "gaussian_blur", "rand_augment"]
)
def test_random_op_is_deterministic_in_the_seed(op):
  image = _image((16, 16))
  fns = {
    "random_resized_crop": lambda x, r: A.random_resized_crop(x, r, 16),
    "color_jitter": A.color_jitter,
    "gaussian_blur": A.gaussian_blur,
    "rand_augment": lambda x, r: A.rand_augment(x, r, op_prob=1.0),
  }
  outs = [fns[op](image, _rng(seed)) for seed in range(6)]
  np.testing.assert_array_equal(fns[op](image, _rng(3)), outs[3])
  assert any(not np.array_equal(outs[0], out) for out in outs[1:])


def test_no_global_random_state_in_module():
  source = pathlib.Path(A.__file__).read_text()
  code = source.split('"""', 2)[2]  # skip the module docstring
  assert not re.search(r"^\s*(import random|from random)", code, re.MULTILINE)
  uses = set(re.findall(r"np\.random\.(\w+)", code))
  assert uses <= {"Generator"}, uses


def test_hflip_is_reversed_columns():
  image = _image((5, 7))
  np.testing.assert_array_equal(A.hflip(image), image[:, ::-1])
  np.testing.assert_array_equal(A.hflip(A.hflip(image)), image)


def test_grayscale_is_itu_601_luma_on_all_channels():
  image = _image((9, 11))
  out = A.grayscale(image).astype(np.int64)
  r, g, b = (image[..., c].astype(np.float64) for c in range(3))
  luma = (299 * r + 587 * g + 114 * b) / 1000
  for c in range(3):
    np.testing.assert_array_equal(out[..., c], out[..., 0])
    assert np.abs(out[..., c] - luma).max() <= 1


@pytest.mark.parametrize(
  "op",
  [
    lambda x: A.brightness(x, 1.0),
    lambda x: A.adjust_brightness(x, 1.0),
    lambda x: A.adjust_contrast(x, 1.0),
    lambda x: A.adjust_saturation(x, 1.0),
    lambda x: A.sharpness(x, 1.0),
    lambda x: A.translate_x(x, 0),
    lambda x: A.translate_y(x, 0),
    lambda x: A.shear_x(x, 0.0),
    lambda x: A.shear_y(x, 0.0),
    lambda x: A.rotate(x, 0),
    lambda x: A.identity(x),
  ],
)
def test_neutral_arguments_leave_the_image_unchanged(op):
  image = _image((10, 12))
  np.testing.assert_array_equal(op(image), image)


def test_color_jitter_with_zero_strengths_is_identity():
  image = _image((10, 12))
  assert A.sample_color_jitter(_rng(), 0, 0, 0, 0) == []
  np.testing.assert_array_equal(A.color_jitter(image, _rng(), 0, 0, 0, 0), image)


def test_color_jitter_samples_all_ops_in_random_order_within_ranges():
  orders = set()
  for seed in range(30):
    ops = A.sample_color_jitter(_rng(seed), 0.4, 0.3, 0.2, 0.1)
    names = [name for name, _ in ops]
    assert sorted(names) == ["brightness", "contrast", "hue", "saturation"]
    orders.add(tuple(names))
    factors = dict(ops)
    assert 0.6 <= factors["brightness"] <= 1.4
    assert 0.7 <= factors["contrast"] <= 1.3
    assert 0.8 <= factors["saturation"] <= 1.2
    assert -0.1 <= factors["hue"] <= 0.1
  assert len(orders) > 5
  image = _image((8, 8))
  ops = A.sample_color_jitter(_rng(4))
  expected = image
  for name, factor in ops:
    expected = getattr(A, f"adjust_{name}")(expected, factor)
  np.testing.assert_array_equal(A.color_jitter(image, _rng(4)), expected)


def test_adjust_ops_match_their_formulas():
  image = _image((12, 12))
  x = image.astype(np.float64)
  bright = np.clip(np.round(x * 1.3), 0, 255)
  assert np.abs(A.adjust_brightness(image, 1.3) - bright).max() <= 1
  gray = A.grayscale(image).astype(np.int64)
  assert np.abs(A.adjust_saturation(image, 0.0) - gray).max() <= 1
  luma_mean = gray[..., 0].mean()
  assert np.abs(A.adjust_contrast(image, 0.0) - luma_mean).max() <= 1
  contrast = np.clip(luma_mean + 1.5 * (x - luma_mean), 0, 255)
  assert np.abs(A.adjust_contrast(image, 1.5) - contrast).max() <= 1.5


def test_adjust_hue_rotates_primaries():
  red = np.zeros((4, 4, 3), np.uint8)
  red[..., 0] = 255
  green = A.adjust_hue(red, 1 / 3).astype(np.int64)
  assert np.abs(green[0, 0] - [0, 255, 0]).max() <= 8
  cyan = A.adjust_hue(red, 0.5).astype(np.int64)
  assert np.abs(cyan[0, 0] - [0, 255, 255]).max() <= 8
  blue = A.adjust_hue(red, -1 / 3).astype(np.int64)
  assert np.abs(blue[0, 0] - [0, 0, 255]).max() <= 8
  image = _image((8, 8), low=40, high=220)
  assert np.abs(A.adjust_hue(image, 0.0).astype(np.int64) - image).max() <= 8


def test_crop_of_whole_square_image_equals_resize():
  image = _image((24, 24))
  out = A.random_resized_crop(image, _rng(), 16, scale=(1.0, 1.0), ratio=(1.0, 1.0))
  np.testing.assert_array_equal(out, A.resize(image, 16))


@pytest.mark.parametrize("shape", [(32, 32), (20, 50)])
def test_crop_box_in_image_with_area_and_aspect_in_range(shape):
  height, width = shape
  scale, ratio = (0.2, 1.0), (3 / 4, 4 / 3)
  for seed in range(200):
    top, left, box_h, box_w = A.sample_crop_box(_rng(seed), height, width, scale, ratio)
    assert top >= 0 and top + box_h <= height and left >= 0 and left + box_w <= width
    # Rounding each side by <= 1/2 pixel moves the area by <= (w + h + 1) / 2 + 1/4.
    slack = (box_w + box_h + 1) / 2 + 0.25
    assert scale[0] * height * width - slack <= box_h * box_w <= scale[1] * height * width + slack
    if (box_h, box_w) != (height, width):  # the fallback may keep the whole image
      aspect = box_w / box_h
      assert ratio[0] - 1 / box_h - 1 / box_w <= aspect <= ratio[1] + 1 / box_h + 1 / box_w


def test_crop_box_fallback_is_a_centred_crop_in_the_ratio_range():
  # No box with aspect in [2, 3] and area >= 90% fits a square: a centred 2:1 crop.
  assert A.sample_crop_box(_rng(), 20, 20, (0.9, 1.0), (2.0, 3.0)) == (5, 0, 10, 20)


def test_random_resized_crop_is_crop_then_resize_of_the_sampled_box():
  image = _image((30, 40))
  box = A.sample_crop_box(_rng(7), 30, 40)
  out = A.random_resized_crop(image, _rng(7), (16, 12))
  top, left, box_h, box_w = box
  np.testing.assert_array_equal(out, A.crop_and_resize(image, box, (16, 12)))
  np.testing.assert_array_equal(
    out, A.resize(image[top : top + box_h, left : left + box_w], (16, 12))
  )


def test_autocontrast_stretches_each_channel_to_full_range():
  image = _image((16, 16), low=90, high=140)
  out = A.autocontrast(image)
  assert (out.min(axis=(0, 1)) == 0).all() and (out.max(axis=(0, 1)) == 255).all()
  for c in range(3):  # plain loop over pixels with exact integer arithmetic
    lo, hi = int(image[..., c].min()), int(image[..., c].max())
    for v, o in zip(image[..., c].ravel().tolist(), out[..., c].ravel().tolist()):
      assert o == (v - lo) * 255 // (hi - lo)
  pil = np.asarray(ImageOps.autocontrast(Image.fromarray(image))).astype(np.int64)
  assert np.abs(out - pil).max() <= 1
  flat = np.full((4, 4, 3), 77, np.uint8)
  np.testing.assert_array_equal(A.autocontrast(flat), flat)


def _distance_to_uniform(channel: np.ndarray) -> float:
  """Kolmogorov distance between a channel's value distribution and U{0..255}."""
  cdf = np.cumsum(np.bincount(channel.ravel(), minlength=256)) / channel.size
  return float(np.abs(cdf - np.arange(1, 257) / 256).max())


def test_equalize_flattens_the_histogram_and_matches_pil():
  rng = _rng(2)
  image = np.clip(rng.normal(70, 15, (32, 32, 3)), 0, 255).astype(np.uint8)
  out = A.equalize(image)
  for c in range(3):
    assert _distance_to_uniform(out[..., c]) < 0.5 * _distance_to_uniform(image[..., c])
  for img in (image, _image((9, 7)), _image((5, 5), low=10, high=13)):
    np.testing.assert_array_equal(
      A.equalize(img), np.asarray(ImageOps.equalize(Image.fromarray(img)))
    )


def test_translate_is_a_shift_with_grey_fill():
  image = _image((10, 12))
  out = A.translate_x(image, 3)
  np.testing.assert_array_equal(out[:, :-3], image[:, 3:])
  assert (out[:, -3:] == 128).all()
  out = A.translate_y(image, -2)
  np.testing.assert_array_equal(out[2:], image[:-2])
  assert (out[:2] == 128).all()


def test_rotate_quarter_turns_match_numpy():
  image = _image((9, 9))
  assert np.abs(A.rotate(image, 90).astype(int) - np.rot90(image)).max() <= 1
  assert np.abs(A.rotate(image, -90).astype(int) - np.rot90(image, -1)).max() <= 1
  assert np.abs(A.rotate(image, 180).astype(int) - image[::-1, ::-1]).max() <= 1


def test_shear_moves_row_y_by_factor_times_y():
  image = _image((12, 12))
  out = A.shear_x(image, 0.25)
  np.testing.assert_array_equal(out[0], image[0])
  np.testing.assert_array_equal(out[4, 1:], image[4, :-1])  # 0.25 * 4 = 1 pixel right
  np.testing.assert_array_equal(out[8, 2:], image[8, :-2])
  out = A.shear_y(image, -0.25)
  np.testing.assert_array_equal(out[:, 0], image[:, 0])
  np.testing.assert_array_equal(out[:-1, 4], image[1:, 4])  # -0.25 * 4 = 1 pixel up


def test_sharpness_factor_zero_is_the_3x3_smoothing_inside():
  image = _image((8, 8))
  x = image.astype(np.float64)
  kernel = np.ones((3, 3)) / 13
  kernel[1, 1] = 5 / 13
  smooth = np.zeros_like(x)
  for i in range(1, 7):
    for j in range(1, 7):
      smooth[i, j] = np.einsum("ij,ijc->c", kernel, x[i - 1 : i + 2, j - 1 : j + 2])
  out = A.sharpness(image, 0.0)
  assert np.abs(out[1:-1, 1:-1] - smooth[1:-1, 1:-1]).max() <= 1
  np.testing.assert_array_equal(out[0], image[0])


def test_blur_keeps_constants_and_reduces_variance():
  flat = np.full((12, 12, 3), 93, np.uint8)
  np.testing.assert_array_equal(A.blur(flat, 1.5), flat)
  image = _image((32, 32))
  out = A.blur(image, 2.0).astype(np.float64)
  assert out.std() < 0.5 * image.std()
  assert abs(out.mean() - image.mean()) < 3


def test_rand_augment_draws_exactly_n_ops_with_reference_magnitudes():
  for n in (1, 2, 3):
    ops = A.sample_rand_augment(_rng(n), n=n, m=7)
    assert len(ops) == n and all(op.name in A.RANDAUG_OPS for op in ops)
  magnitudes = {}
  for seed in range(200):
    for op in A.sample_rand_augment(_rng(seed), n=2, m=7, op_prob=1.0):
      assert op.applied
      magnitudes.setdefault(op.name, set()).add(round(op.argument, 9))
  assert set(magnitudes) == set(A.RANDAUG_OPS)
  assert magnitudes["brightness"] == magnitudes["sharpness"] == {1.36}
  assert magnitudes["shear_x"] == magnitudes["shear_y"] == {-0.21, 0.21}
  assert magnitudes["translate_x"] == magnitudes["translate_y"] == {-7.0, 7.0}
  assert magnitudes["rotate"] == {-21.0, 21.0}
  assert magnitudes["identity"] == magnitudes["equalize"] == {0.0}


@pytest.mark.parametrize("n", [1, 2, 3])
def test_rand_augment_applies_exactly_n_ops(n):
  image = _image((10, 10), high=100)
  out = A.rand_augment(image, _rng(), n=n, m=7, op_names=("brightness",), op_prob=1.0)
  expected = image
  for _ in range(n):
    expected = A.brightness(expected, 1.36)
  np.testing.assert_array_equal(out, expected)
  assert not np.array_equal(out, A.brightness(expected, 1.36))


def test_rand_augment_runs_the_sampled_ops():
  image = _image((12, 12))
  for seed in range(5):
    ops = A.sample_rand_augment(_rng(seed), op_prob=0.5)
    out = A.rand_augment(image, _rng(seed), op_prob=0.5)
    np.testing.assert_array_equal(out, A.apply_rand_augment(image, ops))
  never = A.rand_augment(image, _rng(), n=4, op_prob=0.0)
  np.testing.assert_array_equal(never, image)


def test_albef_without_randaugment_equals_crop_flip():
  image = _image((20, 20))
  albef = A.build_augment({"name": "albef", "image_size": 12, "randaug_op_prob": 0.0})
  crop_flip = A.build_augment({"name": "crop_flip", "image_size": 12})
  for seed in range(4):
    np.testing.assert_array_equal(albef(image, _rng(seed)), crop_flip(image, _rng(seed)))


def test_tcl_grayscale_survives_the_later_ops():
  fn = A.build_augment(
    {"name": "tcl", "image_size": 12, "grayscale_prob": 1.0, "randaug_op_prob": 0.0}
  )
  for seed in range(4):
    out = fn(_image((20, 20)), _rng(seed))
    np.testing.assert_array_equal(out[..., 0], out[..., 1])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_resize_recipe_ignores_the_rng():
  image = _image((20, 30))
  fn = A.build_augment({"name": "resize", "image_size": 16})
  np.testing.assert_array_equal(fn(image, _rng(0)), fn(image, _rng(1)))
  np.testing.assert_array_equal(fn(image, _rng(0)), A.resize(image, 16))


def test_build_augment_reads_config_dict_and_pickles():
  cfg = ml_collections.ConfigDict(
    {"name": "tcl", "image_size": 16, "crop_scale": (0.5, 1.0), "randaug_m": 5}
  )
  fn = A.build_augment(cfg)
  assert fn.keywords["cfg"].crop_scale == (0.5, 1.0)
  assert math.isclose(fn.keywords["cfg"].randaug_m, 5)
  image = _image((20, 20))
  clone = pickle.loads(pickle.dumps(fn))
  np.testing.assert_array_equal(clone(image, _rng(3)), fn(image, _rng(3)))


def test_build_augment_rejects_unknown_names_and_fields():
  with pytest.raises(ValueError, match="unknown augmentation recipe 'simclr'"):
    A.build_augment({"name": "simclr", "image_size": 16})
  with pytest.raises(ValueError, match="crop_scales"):
    A.build_augment({"name": "tcl", "image_size": 16, "crop_scales": (0.5, 1.0)})
  with pytest.raises(ValueError, match="image_size"):
    A.build_augment({"name": "tcl"})
  with pytest.raises(ValueError, match="unknown RandAugment op"):
    A.build_augment({"name": "albef", "image_size": 8, "randaug_ops": ["cutout"]})
