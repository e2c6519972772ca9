"""Tests for vlalign.data.images against plain PIL (no draft), torchvision's resize/crop rules."""

import io
import sys

import numpy as np
import pytest
from PIL import Image, ImageFile

from vlalign.data import images

BICUBIC = Image.Resampling.BICUBIC


def smooth_image(width: int, height: int) -> np.ndarray:
  """uint8 `[height, width, 3]` of slow sinusoids: no detail finer than ~1/10 of the image."""
  y, x = np.mgrid[0:height, 0:width].astype(np.float64)
  u, v = x / width, y / height
  channels = [
    128 + 100 * np.sin(2 * np.pi * (1.5 * u + 0.5 * v)),
    128 + 100 * np.cos(2 * np.pi * (0.7 * u - 1.2 * v)),
    128 + 90 * np.sin(2 * np.pi * (2.0 * u * v + 0.3)),
  ]
  return np.stack(channels, axis=-1).round().astype(np.uint8)


def encode(image: Image.Image | np.ndarray, fmt: str = "JPEG", **kwargs) -> bytes:
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def reference_squash(data: bytes, size: int) -> np.ndarray:
  """ALBEF/TCL: full-resolution decode, RGB, `Resize((size, size), BICUBIC)`."""
  image = Image.open(io.BytesIO(data)).convert("RGB")
  return np.asarray(image.resize((size, size), BICUBIC))


def reference_center_crop(data: bytes, size: int) -> np.ndarray:
  """CLIP: torchvision `Resize(size, BICUBIC)` then `CenterCrop(size)`, on the full resolution."""
  image = Image.open(io.BytesIO(data)).convert("RGB")
  width, height = image.size
  short, long = min(width, height), max(width, height)
  new_short, new_long = size, int(size * long / short)
  new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
  resized = image.resize((new_w, new_h), BICUBIC)
  top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
  return np.asarray(resized.crop((left, top, left + size, top + size)))


def diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  return np.abs(a.astype(np.int32) - b.astype(np.int32))


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
  """1200 x 900 smooth JPEG: drafted at 1/4 for size 224 (300 x 225), at 1/2 for size 400."""
  return encode(smooth_image(1200, 900), quality=95)


# ----------------------------------------------------------------------------- shapes, references


@pytest.mark.parametrize("resize", images.RESIZE_MODES)
@pytest.mark.parametrize("shape", [(900, 1200), (1200, 900), (37, 50), (8, 8), (256, 256)])
def test_shape_and_dtype(resize, shape):
  data = encode(smooth_image(shape[1], shape[0]))
  for size in (1, 31, 64):
    out = images.decode_image(data, size, resize)
    assert out.shape == (size, size, 3)
    assert out.dtype == np.uint8
    assert out.flags.writeable


@pytest.mark.parametrize("size", [224, 400])
def test_squash_jpeg_close_to_full_resolution_resize(big_jpeg, size):
  out = images.decode_image(big_jpeg, size, "squash")
  err = diff(out, reference_squash(big_jpeg, size))
  assert err.mean() < 0.75 and err.max() <= 5, (err.mean(), err.max())


@pytest.mark.parametrize("size", [224, 400])
def test_center_crop_jpeg_close_to_full_resolution_reference(big_jpeg, size):
  out = images.decode_image(big_jpeg, size, "center_crop")
  err = diff(out, reference_center_crop(big_jpeg, size))
  assert err.mean() < 0.75 and err.max() <= 5, (err.mean(), err.max())


@pytest.mark.parametrize("decoder", ["pil", "simplejpeg"])
def test_jpegs_are_drafted_by_the_largest_power_of_two_that_fits(big_jpeg, decoder):
  if decoder == "simplejpeg":
    pytest.importorskip("simplejpeg")
  decode = (
    images._decode_pil
    if decoder == "pil"
    else lambda data, size, _: images._decode_simplejpeg(data, size)
  )
  for size, scale in [(100, 8), (112, 8), (113, 4), (224, 4), (300, 2), (450, 2), (451, 1)]:
    decoded = decode(big_jpeg, size, None)
    assert decoded.scale == 1 / scale, size
    assert decoded.image.size == (-(-1200 // scale), -(-900 // scale))
    assert (decoded.width, decoded.height) == (1200, 900)


@pytest.mark.parametrize("shape", [(300, 451), (451, 300), (333, 333), (40, 97), (20, 10)])
def test_png_matches_references(shape):
  # No draft for PNGs. The crop is resized from its box of the source, not cut from the resized
  # image: the same filter taps, but PIL's two passes round their 8-bit intermediate differently.
  data = encode(smooth_image(shape[1], shape[0]), "PNG")
  for size in (32, 224):
    np.testing.assert_array_equal(
      images.decode_image(data, size, "squash"), reference_squash(data, size)
    )
    err = diff(images.decode_image(data, size, "center_crop"), reference_center_crop(data, size))
    assert err.max() <= 2 and err.mean() < 0.05, (err.max(), err.mean())


def _centre_and_borders(width: int, height: int) -> np.ndarray:
  """Blue image with a red centre square of side min(width, height)."""
  image = np.zeros((height, width, 3), np.uint8)
  image[..., 2] = 255
  side = min(width, height)
  top, left = (height - side) // 2, (width - side) // 2
  image[top : top + side, left : left + side] = (255, 0, 0)
  return image


@pytest.mark.parametrize("shape", [(200, 400), (400, 200)])
def test_center_crop_keeps_the_centre(shape):
  data = encode(_centre_and_borders(shape[1], shape[0]), "PNG")
  crop = images.decode_image(data, 64, "center_crop")
  inner = crop[2:-2, 2:-2].astype(np.int32)  # the outer pixels' bicubic support reaches the blue
  assert (inner[..., 0] >= 250).all() and (inner[..., 2] <= 5).all()
  squash = images.decode_image(data, 64, "squash")
  edges = (squash[:, 0], squash[0]) if shape[0] < shape[1] else (squash[0], squash[:, 0])
  assert (edges[0][..., 2] >= 250).all()  # the squash keeps the blue borders ...
  assert squash[32, 32, 0] >= 250  # ... and the red centre


def test_upscales_small_images():
  data = encode(smooth_image(10, 6), "PNG")
  np.testing.assert_array_equal(images.decode_image(data, 48), reference_squash(data, 48))


# ----------------------------------------------------------------------------- modes


def _mode_image(mode: str) -> Image.Image:
  rgb = Image.fromarray(smooth_image(60, 40))
  if mode == "I;16":
    return Image.fromarray((np.asarray(rgb.convert("L")).astype(np.uint16) * 257)[:, ::-1].copy())
  if mode in ("LA", "RGBA"):
    base = rgb.convert(mode[:-1])
    alpha = Image.fromarray(np.linspace(0, 255, 60 * 40).reshape(40, 60).astype(np.uint8))
    base.putalpha(alpha)
    return base
  return rgb.convert(mode)


@pytest.mark.parametrize(
  ("mode", "fmt"),
  [
    ("L", "PNG"),
    ("LA", "PNG"),
    ("P", "PNG"),
    ("RGBA", "PNG"),
    ("1", "PNG"),
    ("CMYK", "TIFF"),
    ("CMYK", "JPEG"),
    ("L", "JPEG"),
    ("RGB", "GIF"),
    ("RGB", "WEBP"),
    ("RGB", "BMP"),
  ],
)
@pytest.mark.parametrize("decoder", ["pil", "simplejpeg"])
def test_modes_become_rgb_like_pil_convert(mode, fmt, decoder):
  if decoder == "simplejpeg":
    pytest.importorskip("simplejpeg")  # non-JPEGs and CMYK JPEGs: PIL decodes them
  data = encode(_mode_image(mode), fmt)
  assert Image.open(io.BytesIO(data)).mode == (mode if fmt != "GIF" else "P")
  out = images.decode_image(data, 32, decoder=decoder)
  assert out.shape == (32, 32, 3) and out.dtype == np.uint8
  # libjpeg-turbo's CMYK -> RGB (simplejpeg) rounds differently from PIL's.
  tolerance = 1 if (decoder, fmt) == ("simplejpeg", "JPEG") else 0
  assert diff(out, reference_squash(data, 32)).max() <= tolerance


def test_palette_transparency_is_dropped():
  palette = Image.fromarray(smooth_image(60, 40)).convert("P")
  data = encode(palette, "PNG", transparency=0)
  opened = Image.open(io.BytesIO(data))
  assert opened.mode == "P" and "transparency" in opened.info
  np.testing.assert_array_equal(images.decode_image(data, 32), reference_squash(data, 32))


def test_alpha_is_dropped_not_composited():
  rgba = np.zeros((16, 16, 4), np.uint8)
  rgba[..., 0] = 200  # red, fully transparent
  out = images.decode_image(encode(rgba, "PNG"), 8)
  np.testing.assert_array_equal(out, np.broadcast_to(np.array([200, 0, 0], np.uint8), out.shape))


def test_16_bit_greyscale_is_scaled_to_8_bits():
  values = np.array([[0, 257, 32896, 65535]], np.uint16).repeat(4, axis=0)
  data = encode(Image.fromarray(values), "PNG")
  assert Image.open(io.BytesIO(data)).mode == "I;16"
  out = images.decode_image(data, 4)  # same size: the resize keeps every pixel
  np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])
  np.testing.assert_array_equal(out[..., 0], out[..., 2])


# ----------------------------------------------------------------------------- errors


def _bad_inputs(jpeg: bytes) -> dict[str, bytes]:
  png = encode(smooth_image(64, 48), "PNG")
  return {
    "truncated jpeg": jpeg[: len(jpeg) // 2],
    "truncated png": png[: len(png) // 2],
    "jpeg header only": jpeg[:200],
    "empty": b"",
    "random": np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
    "text": b"<html>404 not found</html>",
  }


@pytest.mark.parametrize("decoder", ["pil", "simplejpeg"])
@pytest.mark.parametrize("resize", images.RESIZE_MODES)
def test_bad_bytes_raise_unreadable(big_jpeg, decoder, resize):
  if decoder == "simplejpeg":
    pytest.importorskip("simplejpeg")
  for name, data in _bad_inputs(big_jpeg).items():
    with pytest.raises(images.UnreadableImageError):
      images.decode_image(data, 64, resize, decoder)
      pytest.fail(f"{name} decoded")
  assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_small_jpeg_raises():
  # Not drafted (already small): the full-size decode has to notice the missing data too.
  data = encode(smooth_image(200, 150))
  with pytest.raises(images.UnreadableImageError):
    images.decode_image(data[: len(data) // 2], 256)


def test_decompression_bombs_raise_unreadable(monkeypatch):
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses above twice this
  data = encode(smooth_image(100, 100))
  with pytest.raises(images.UnreadableImageError, match="DecompressionBomb"):
    images.decode_image(data, 32)


def test_unreadable_is_a_value_error():
  assert issubclass(images.UnreadableImageError, ValueError)


def test_unknown_choices_raise_value_error_naming_them(big_jpeg):
  with pytest.raises(ValueError, match="squash.*center_crop") as info:
    images.decode_image(big_jpeg, 32, resize="stretch")
  assert not isinstance(info.value, images.UnreadableImageError)
  with pytest.raises(ValueError, match="pil.*simplejpeg"):
    images.decode_image(big_jpeg, 32, decoder="cv2")
  with pytest.raises(ValueError, match="size"):
    images.decode_image(big_jpeg, 0)


# ----------------------------------------------------------------------------- read_image


def test_read_image_local_paths(tmp_path, big_jpeg):
  path = tmp_path / "photo.jpg"
  path.write_bytes(big_jpeg)
  expected = images.decode_image(big_jpeg, 48, "center_crop")
  np.testing.assert_array_equal(images.read_image(str(path), 48, "center_crop"), expected)
  np.testing.assert_array_equal(images.read_image(path, 48, "center_crop"), expected)


def test_read_image_errors_name_the_path(tmp_path, big_jpeg):
  missing = tmp_path / "missing.jpg"
  with pytest.raises(images.UnreadableImageError, match="missing.jpg"):
    images.read_image(str(missing), 32)
  (tmp_path / "a_directory").mkdir()
  with pytest.raises(images.UnreadableImageError, match="a_directory"):
    images.read_image(str(tmp_path / "a_directory"), 32)
  cut = tmp_path / "cut.jpg"
  cut.write_bytes(big_jpeg[: len(big_jpeg) // 2])
  with pytest.raises(images.UnreadableImageError, match="cut.jpg"):
    images.read_image(str(cut), 32)


def test_read_image_remote_paths_go_through_epath(monkeypatch, big_jpeg):
  from etils import epath

  read = []

  class FakePath:
    def __init__(self, path):
      self.path = path

    def read_bytes(self):
      read.append(self.path)
      if self.path.endswith("missing.jpg"):
        raise FileNotFoundError(self.path)
      return big_jpeg

  monkeypatch.setattr(epath, "Path", FakePath)
  out = images.read_image("gs://bucket/coco/1.jpg", 32)
  np.testing.assert_array_equal(out, images.decode_image(big_jpeg, 32))
  assert read == ["gs://bucket/coco/1.jpg"]
  with pytest.raises(images.UnreadableImageError, match="gs://bucket/missing.jpg"):
    images.read_image("gs://bucket/missing.jpg", 32)


# ----------------------------------------------------------------------------- simplejpeg


@pytest.mark.parametrize("shape", [(900, 1200), (256, 256), (150, 200), (1000, 333)])
@pytest.mark.parametrize("resize", images.RESIZE_MODES)
def test_simplejpeg_matches_pil(shape, resize):
  pytest.importorskip("simplejpeg")
  data = encode(smooth_image(shape[1], shape[0]), quality=90)
  for size in (64, 224):
    err = diff(
      images.decode_image(data, size, resize, "simplejpeg"),
      images.decode_image(data, size, resize, "pil"),
    )
    assert err.max() <= 1, err.max()


def test_simplejpeg_missing_raises_import_error_with_pip_line(monkeypatch, big_jpeg):
  monkeypatch.setitem(sys.modules, "simplejpeg", None)  # makes `import simplejpeg` fail
  png = encode(smooth_image(8, 8), "PNG")
  for data in (big_jpeg, png):
    with pytest.raises(ImportError, match="pip install simplejpeg"):
      images.decode_image(data, 32, decoder="simplejpeg")


# ----------------------------------------------------------------------------- encode, downscale


def test_encode_jpeg_round_trip():
  image = smooth_image(64, 48)
  data = images.encode_jpeg(image, quality=95)
  assert data[:3] == b"\xff\xd8\xff"
  decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
  assert diff(decoded, image).mean() < 2.0
  assert len(images.encode_jpeg(image, quality=30)) < len(data)
  with pytest.raises(ValueError, match="uint8"):
    images.encode_jpeg(image.astype(np.float32))
  with pytest.raises(ValueError, match="uint8"):
    images.encode_jpeg(image[..., 0])
  with pytest.raises(ValueError, match="quality"):
    images.encode_jpeg(image, quality=0)


@pytest.mark.parametrize(("width", "height"), [(1200, 900), (600, 1000)])
def test_downscale_jpeg_bounds_the_shorter_side(width, height):
  data = encode(smooth_image(width, height), quality=95)
  out = images.downscale_jpeg(data, 300)
  small = Image.open(io.BytesIO(out))
  assert small.format == "JPEG"
  expected = (400, 300) if width > height else (300, 500)
  assert small.size == expected
  reference = Image.open(io.BytesIO(data)).convert("RGB").resize(expected, BICUBIC)
  assert diff(np.asarray(small.convert("RGB")), np.asarray(reference)).mean() < 1.5


def test_downscale_jpeg_keeps_small_jpegs_and_converts_other_formats():
  jpeg = encode(smooth_image(300, 200))
  assert images.downscale_jpeg(jpeg, 200) == jpeg
  assert images.downscale_jpeg(jpeg, 1000) == jpeg
  png = encode(_mode_image("RGBA"), "PNG")
  out = images.downscale_jpeg(png, 512)
  converted = Image.open(io.BytesIO(out))
  assert (converted.format, converted.mode, converted.size) == ("JPEG", "RGB", (60, 40))


def test_downscale_jpeg_rejects_bad_bytes(big_jpeg):
  small = encode(smooth_image(300, 200))
  for data in (big_jpeg[: len(big_jpeg) // 2], small[: len(small) // 2], b"", b"not an image"):
    with pytest.raises(images.UnreadableImageError):
      images.downscale_jpeg(data, 256)


def test_resize_array_resizes_like_decoding_a_lossless_file():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
  for resize in images.RESIZE_MODES:
    want = images.decode_image(images.encode_png(image), 16, resize)
    np.testing.assert_array_equal(images.resize_array(image, 16, resize), want)
  grey = images.resize_array(image[..., 0], 16)
  assert grey.shape == (16, 16, 3) and (grey[..., 0] == grey[..., 2]).all()


# ----------------------------------------------------------------------------- originals (crops)


@pytest.mark.parametrize("decoder", ["pil", "simplejpeg"])
@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_decode_original_is_plain_pil_at_full_resolution(decoder, mode):
  if decoder == "simplejpeg":
    pytest.importorskip("simplejpeg")
  data = encode(Image.fromarray(smooth_image(300, 200)).convert(mode), quality=90)
  original = images.decode_original(data, decoder=decoder)
  want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
  assert original.image.shape == (200, 300, 3) and original.image.flags.writeable
  assert (original.height, original.width, original.scale) == (200, 300, 1.0)
  assert diff(original.image, want).max() <= (1 if mode == "CMYK" else 0)  # libjpeg-turbo: +-1


@pytest.mark.parametrize("decoder", ["pil", "simplejpeg"])
def test_decode_original_drafts_jpegs_to_min_side(big_jpeg, decoder):
  if decoder == "simplejpeg":
    pytest.importorskip("simplejpeg")
  for min_side, scale in [(100, 8), (113, 4), (300, 2), (451, 1), (5000, 1)]:
    original = images.decode_original(big_jpeg, min_side, decoder)
    assert original.image.shape == (-(-900 // scale), -(-1200 // scale), 3), min_side
    assert (original.height, original.width, original.scale) == (900, 1200, 1 / scale)
  png = encode(smooth_image(1200, 900), "PNG")
  assert images.decode_original(png, 100).image.shape == (900, 1200, 3)  # no draft for PNGs


def test_load_original_takes_bytes_arrays_and_paths(tmp_path, big_jpeg):
  path = tmp_path / "a.jpg"
  path.write_bytes(big_jpeg)
  from_path = images.load_original(str(path), 300)
  np.testing.assert_array_equal(from_path.image, images.decode_original(big_jpeg, 300).image)
  assert images.load_original(big_jpeg).image.shape == (900, 1200, 3)
  grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
  for array in (grey, grey[..., None]):
    original = images.load_original(array, 2)  # arrays are never drafted
    assert original.image.shape == (3, 4, 3) and original.scale == 1.0
    np.testing.assert_array_equal(original.image[..., 1], grey)
  with pytest.raises(images.UnreadableImageError, match="missing.jpg"):
    images.load_original(str(tmp_path / "missing.jpg"))
  with pytest.raises(images.UnreadableImageError):
    images.decode_original(big_jpeg[: len(big_jpeg) // 2])
  with pytest.raises(ValueError, match="min_side"):
    images.decode_original(big_jpeg, 0)
