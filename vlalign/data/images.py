"""Image files and bytes -> uint8 `[S, S, 3]` RGB arrays, for real datasets (COCO, Flickr, CC3M).

`decode_image(data, size, resize, decoder)` decodes encoded bytes (JPEG, PNG, GIF, WebP, ... any
format PIL reads); `read_image(path, ...)` reads a local file or an `etils.epath` path (`gs://...`)
first. Two resize modes (`RESIZE_MODES`):

- `"squash"`: the whole image to `size` x `size`, bicubic, aspect ratio not kept: ALBEF/TCL's
  `transforms.Resize((S, S), interpolation=BICUBIC)`.
- `"center_crop"`: shorter side to `size` (bicubic; the longer side `int(size * long / short)`,
  torchvision's rule) then the centre `size` x `size` (offsets `round((side - size) / 2)`): CLIP's
  preprocessing. The crop is resized straight from its region of the source (PIL's `resize(box=)`):
  the same filter taps as resizing the whole image and cropping, ~25% less work; PIL's two 8-bit
  passes round a few values differently (up to 2 grey levels on ~1% of them).

Every PIL mode becomes RGB as PIL's `.convert("RGB")` does (alpha dropped, not composited; palette
expanded; CMYK converted naively), except 16-bit greyscale (`I;16*`), which is scaled to 8 bits
(`round(v / 257)`) where `.convert` would clip everything above 255 to white. EXIF orientation is
not applied (neither do the references' PIL / torchvision loaders). Multi-frame files give their
first frame.

An image that is missing, empty, truncated, not an image, in a mode that does not convert, or a
decompression bomb (PIL's `MAX_IMAGE_PIXELS` check) raises `UnreadableImageError` (a ValueError),
so a data pipeline can catch exactly that and skip the example. A truncated JPEG is an error
because PIL's `ImageFile.LOAD_TRUNCATED_IMAGES` stays False (this module never changes that
global). Errors of the environment (permission denied, network) are not caught.

Decoders (`decoder=`):

- `"pil"`: `PIL.Image.open`; for JPEGs `Image.draft("RGB", (size, size))` first, so libjpeg scales
  by 1/2, 1/4 or 1/8 inside the inverse DCT when both sides stay >= `size` (the input of the final
  bicubic resize is never smaller than its output). Against bicubic from full resolution (squash to
  256 px of scikit-image photos, JPEG quality 90), the mean absolute difference was 0.3-0.7 grey
  levels at 1000x750 and 2000x1500 (single pixels on edges up to 16), 0.4-1.2 where the draft
  lands exactly on `size` (512 -> 256; edges up to 36). The resize box is the draft's exact image
  extent (as in `Image.thumbnail`), so the geometry is that of the full-resolution image.
- `"simplejpeg"`: the `simplejpeg` package (libjpeg-turbo straight into numpy, none of PIL's
  Python-level file parsing) for JPEG bytes, with the same power-of-two scale as the PIL draft, so
  both decoders give the same pixels up to libjpeg-turbo versions (and +-1 on CMYK JPEGs, which
  libjpeg-turbo converts with its own rounding); non-JPEG bytes go to PIL. JPEGs simplejpeg refuses
  (colour conversions libjpeg-turbo lacks, recoverable corruption: it runs `strict`) also go to
  PIL, so which images are readable does not depend on the decoder. simplejpeg's own choice of scale
  (any M/8 keeping both sides >= `size`) is not used: on the bench photos it was 7% faster at
  1000x750 (3/8) but 7% slower at native sizes (libjpeg-turbo's 3/8, 5/8, 7/8 inverse DCTs have no
  SIMD), and it raised the mean difference from full resolution 1.5-2x (0.4-0.5 -> 0.7-0.8
  grey levels; docs/results.md, "Where the time goes"). simplejpeg is optional and NOT in
  requirements.txt: measured end to end (decode + resize to 256 px, `bench/decode_bench.py`,
  docs/results.md) it was within a few percent of `"pil"`: the entropy decoding is libjpeg-turbo's
  in both, and PIL's bicubic resize costs as much as the decode. Without
  it this decoder raises ImportError naming the pip line.

Train crops (`decode_original`, `load_original`): an augmentation that cuts a random resized crop
(ALBEF/TCL's `RandomResizedCrop`) needs the image at its stored resolution, as torchvision crops
the full-resolution PIL image, not one squashed to `size` first. These return an `Original`: the
pixels uint8 `[h, w, 3]` at the image's own size `H x W` (the same pixels as
`Image.open(...).convert("RGB")`, with the RGB rules above), or, with `min_side`, a JPEG decoded
at the smallest power-of-two scale (1/2, 1/4, 1/8, libjpeg's DCT scaling, the same rule as above)
that keeps both sides >= `min_side` (`h = ceil(H * scale)`); other formats are always decoded at
full size. `H`, `W` and `scale` come with the pixels, so that a crop box drawn on the stored size
can be cut from the drafted pixels at the same place (`augment`'s `source_size`/`source_scale`).

`encode_jpeg` and `downscale_jpeg` serve dataset conversion: `downscale_jpeg` bounds the shorter
side (pre-resizing once, at conversion time, makes every later decode cheaper) and keeps JPEGs
that are already small byte for byte.
"""

import io
import os
import struct
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

RESIZE_MODES = ("squash", "center_crop")
DECODERS = ("pil", "simplejpeg")
_SIMPLEJPEG_PIP = "pip install simplejpeg==1.9.0"

_BICUBIC = Image.Resampling.BICUBIC
_JPEG_MAGIC = b"\xff\xd8\xff"  # SOI marker, then the next marker's 0xFF
_JPEG_FORMATS = ("JPEG", "MPO")  # MPO: a camera's multi-picture JPEG; its first frame is a JPEG
_DRAFT_SCALES = (8, 4, 2, 1)  # the power-of-two scales libjpeg decodes to, as PIL's draft picks
_FULL_RESOLUTION = 1 << 30  # a draft bound no image reaches: scale 1, full resolution
# What PIL raises for bytes it cannot open, decode or convert (plugins raise all of these).
_PIL_ERRORS = (
  OSError,
  SyntaxError,
  ValueError,
  EOFError,
  IndexError,
  struct.error,
  Image.DecompressionBombError,
)

_Box = tuple[float, float, float, float]  # (left, upper, right, lower), PIL's pixel-corner coords


class UnreadableImageError(ValueError):
  """An image that is missing, truncated, empty or not decodable; the message names its path."""


def _unreadable(reason: str, path: str | None) -> UnreadableImageError:
  where = f" {path}" if path is not None else ""
  return UnreadableImageError(f"unreadable image{where}: {reason}")


def _describe(err: BaseException, data: bytes) -> str:
  if isinstance(err, Image.UnidentifiedImageError):
    return f"not an image format PIL knows ({len(data)} bytes starting {bytes(data[:8])!r})"
  return f"{type(err).__name__}: {err}"


# ----------------------------------------------------------------------------- checks


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
  if value not in choices:
    raise ValueError(f"unknown {what} {value!r}; choose one of {choices}")


def _check_positive(value: int, what: str) -> None:
  if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
    raise ValueError(f"{what} must be a positive int, got {value!r}")


def _check_decode_args(size: int, resize: str, decoder: str) -> None:
  _check_positive(size, "size")
  _check_choice(resize, RESIZE_MODES, "resize mode")
  _check_choice(decoder, DECODERS, "decoder")


def _is_jpeg(data: bytes) -> bool:
  return bytes(data[:3]) == _JPEG_MAGIC


# ----------------------------------------------------------------------------- geometry


def _draft_scale(width: int, height: int, size: int) -> int:
  """The largest of 8, 4, 2, 1 keeping both sides >= `size` (PIL's `JpegImageFile.draft` rule)."""
  fits = min(width // size, height // size)
  return next((s for s in _DRAFT_SCALES if fits >= s), 1)


def _center_crop_box(width: int, height: int, size: int) -> _Box:
  """Region of a `width` x `height` image that CLIP's resize + centre crop to `size` keeps.

  torchvision `Resize(size)` (shorter side to `size`, longer `int(size * long / short)`) then
  `CenterCrop(size)` (offsets `int(round((side - size) / 2))`), mapped back to source coordinates.
  """
  if width <= height:
    new_w, new_h = size, int(size * height / width)
  else:
    new_w, new_h = int(size * width / height), size
  left = int(round((new_w - size) / 2.0))
  top = int(round((new_h - size) / 2.0))
  scale_x, scale_y = width / new_w, height / new_h
  return (left * scale_x, top * scale_y, (left + size) * scale_x, (top + size) * scale_y)


def _source_box(width: int, height: int, size: int, resize: str) -> _Box:
  if resize == "squash":
    return (0.0, 0.0, float(width), float(height))
  return _center_crop_box(width, height, size)


# ----------------------------------------------------------------------------- PIL decoding


def _to_rgb(image: Image.Image) -> Image.Image:
  """Any PIL mode -> RGB (`.convert("RGB")`, except 16-bit greyscale, scaled to 8 bits)."""
  if image.mode == "RGB":
    return image
  if image.mode.startswith("I;16"):
    wide = np.asarray(image).astype(np.uint32)
    image = Image.fromarray(((wide + 128) // 257).astype(np.uint8))  # round(v / 257), mode L
  return image.convert("RGB")


def _open(data: bytes, path: str | None) -> Image.Image:
  """Lazily opened PIL image (header parsed, pixels not decoded)."""
  if len(data) == 0:
    raise _unreadable("empty (0 bytes)", path)
  try:
    return Image.open(io.BytesIO(data))
  except _PIL_ERRORS as err:
    raise _unreadable(_describe(err, data), path) from err


def _load_rgb(image: Image.Image, data: bytes, path: str | None) -> Image.Image:
  """Decodes the pixels of an opened image (truncation shows here) and converts them to RGB."""
  try:
    image.load()
    return _to_rgb(image)
  except _PIL_ERRORS as err:
    raise _unreadable(_describe(err, data), path) from err


class _Decoded(NamedTuple):
  """An RGB image, its source's size, the source -> image coordinate scale (1, 1/2, 1/4, 1/8)."""

  image: Image.Image
  width: int
  height: int
  scale: float


def _decode_pil(data: bytes, size: int, path: str | None) -> _Decoded:
  """Decodes with PIL, drafting JPEGs to the smallest power-of-two scale with both sides >= size."""
  image = _open(data, path)
  width, height = image.size
  drafted = image.draft("RGB", (size, size))  # None for non-JPEGs (full size)
  image = _load_rgb(image, data, path)
  scale = 1.0 if drafted is None else drafted[1][2] / width  # box: (0, 0, width / s, height / s)
  return _Decoded(image, width, height, scale)


def _decode_simplejpeg(data: bytes, size: int) -> _Decoded | None:
  """Like `_decode_pil`, with simplejpeg; None for bytes that PIL has to decode (or reject)."""
  try:
    import simplejpeg
  except ImportError as err:
    raise ImportError(
      f'decoder="simplejpeg" needs the simplejpeg package: {_SIMPLEJPEG_PIP}'
    ) from err
  if not _is_jpeg(data):
    return None
  try:
    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    scale = _draft_scale(width, height, size)
    # libjpeg's sides at 1/scale are ceil(side / scale); asking for them pins that scale.
    min_height, min_width = (-(-height // scale), -(-width // scale)) if scale > 1 else (0, 0)
    array = simplejpeg.decode_jpeg(
      data, colorspace="RGB", min_height=min_height, min_width=min_width
    )
  except ValueError:
    return None  # unsupported colour conversion, corrupt or truncated data: PIL decodes or raises
  return _Decoded(Image.fromarray(array), width, height, 1.0 / scale)


def _decode(data: bytes, size: int, resize: str, decoder: str, path: str | None) -> np.ndarray:
  _check_decode_args(size, resize, decoder)
  decoded = _decode_simplejpeg(data, size) if decoder == "simplejpeg" else None
  if decoded is None:
    decoded = _decode_pil(data, size, path)
  box = _source_box(decoded.width, decoded.height, size, resize)
  box = tuple(v * decoded.scale for v in box)
  out = decoded.image.resize((size, size), _BICUBIC, box=box)
  return np.array(out, dtype=np.uint8)


# ----------------------------------------------------------------------------- public API


def decode_image(
  data: bytes, size: int, resize: str = "squash", decoder: str = "pil"
) -> np.ndarray:
  """Encoded image bytes -> uint8 `[size, size, 3]` RGB (see the module docstring).

  Args:
    data: the encoded file (JPEG, PNG, GIF, WebP, BMP, TIFF, ...).
    size: output side in pixels.
    resize: one of `RESIZE_MODES`: `"squash"` (ALBEF/TCL) or `"center_crop"` (CLIP).
    decoder: `"pil"` or `"simplejpeg"` (JPEGs only; other formats use PIL).

  Returns:
    A writable uint8 `[size, size, 3]` array.

  Raises:
    UnreadableImageError: empty, truncated or undecodable bytes.
    ValueError: an unknown `resize` or `decoder`, or a `size` below 1.
    ImportError: `decoder="simplejpeg"` without the simplejpeg package.
  """
  return _decode(data, size, resize, decoder, None)


def _read_bytes(path: str) -> bytes:
  """The file's bytes: built-in `open` for local paths, `etils.epath` for `scheme://` ones."""
  try:
    if "://" in path:
      from etils import epath

      return epath.Path(path).read_bytes()
    with open(path, "rb") as f:
      return f.read()
  except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as err:
    raise _unreadable(f"{type(err).__name__}: no such file", path) from err


def read_image(
  path: str | os.PathLike, size: int, resize: str = "squash", decoder: str = "pil"
) -> np.ndarray:
  """Reads and decodes the image at `path` (local, or `gs://...` via `etils.epath`).

  Args:
    path: a local path or any path `etils.epath.Path` opens.
    size, resize, decoder: as in `decode_image`.

  Returns:
    A writable uint8 `[size, size, 3]` array.

  Raises:
    UnreadableImageError: a missing file, or bytes `decode_image` rejects; the message names
      `path`. Other OSErrors (permissions, network) propagate unchanged.
    ValueError, ImportError: as in `decode_image` (checked before reading).
  """
  _check_decode_args(size, resize, decoder)
  path = os.fspath(path)
  return _decode(_read_bytes(path), size, resize, decoder, path)


def resize_array(image: np.ndarray, size: int, resize: str = "squash") -> np.ndarray:
  """A decoded image (uint8 `[H, W, 3]`, `[H, W]` or `[H, W, 4]`) -> uint8 `[size, size, 3]` RGB,
  resized as `decode_image` resizes (e.g. a TFDS `Image` feature read decoded)."""
  _check_decode_args(size, resize, "pil")
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim not in (2, 3):
    raise ValueError(f"expected a uint8 [H, W(, C)] image, got {image.dtype} {image.shape}")
  rgb = _to_rgb(Image.fromarray(np.ascontiguousarray(image)))
  box = _source_box(rgb.width, rgb.height, size, resize)
  return np.array(rgb.resize((size, size), _BICUBIC, box=box), dtype=np.uint8)


def load_image(raw: Any, size: int, resize: str = "squash", decoder: str = "pil") -> np.ndarray:
  """A stored image, whatever a source holds (encoded bytes, a decoded uint8 array `[H, W]`,
  `[H, W, 1]` or `[H, W, 3]`, or a path), as uint8 `[size, size, 3]`."""
  if isinstance(raw, np.ndarray):
    array = raw[..., 0] if raw.ndim == 3 and raw.shape[-1] == 1 else raw
    return resize_array(array, size, resize)
  if isinstance(raw, bytes | np.bytes_):
    return decode_image(bytes(raw), size, resize, decoder)
  return read_image(os.fspath(raw), size, resize, decoder)


def _check_min_side(min_side: int | None) -> None:
  if min_side is not None:
    _check_positive(min_side, "min_side")


class Original(NamedTuple):
  """An image decoded for cropping (see the module docstring, "Train crops").

  Attributes:
    image: writable uint8 `[h, w, 3]` RGB pixels, `h = ceil(height * scale)` (likewise `w`).
    height, width: the stored image's size in pixels.
    scale: 1, 1/2, 1/4 or 1/8: pixel `(y, x)` of `image` covers the stored image's pixels
      `[y / scale, (y + 1) / scale)` (likewise x).
  """

  image: np.ndarray
  height: int
  width: int
  scale: float


def _decode_original(data: bytes, min_side: int | None, decoder: str, path: str | None) -> Original:
  bound = _FULL_RESOLUTION if min_side is None else int(min_side)
  decoded = _decode_simplejpeg(data, bound) if decoder == "simplejpeg" else None
  if decoded is None:
    decoded = _decode_pil(data, bound, path)
  pixels = np.array(decoded.image, dtype=np.uint8)
  return Original(pixels, decoded.height, decoded.width, decoded.scale)


def decode_original(data: bytes, min_side: int | None = None, decoder: str = "pil") -> Original:
  """Encoded image bytes -> the image at its own resolution (see the module docstring, "Train
  crops").

  Args:
    data: the encoded file (JPEG, PNG, GIF, WebP, BMP, TIFF, ...).
    min_side: None (full resolution), or a JPEG is decoded at the smallest of the scales 1, 1/2,
      1/4, 1/8 that keeps both sides >= `min_side`.
    decoder: `"pil"` or `"simplejpeg"` (JPEGs only; other formats use PIL).

  Returns:
    An `Original`: uint8 `[h, w, 3]` pixels, the stored size and the decoding scale.

  Raises:
    UnreadableImageError: empty, truncated or undecodable bytes.
    ValueError: an unknown `decoder`, or a `min_side` below 1.
    ImportError: `decoder="simplejpeg"` without the simplejpeg package.
  """
  _check_min_side(min_side)
  _check_choice(decoder, DECODERS, "decoder")
  return _decode_original(data, min_side, decoder, None)


def _array_to_rgb(image: np.ndarray) -> np.ndarray:
  """A decoded uint8 `[H, W]`, `[H, W, 1]`, `[H, W, 3]` or `[H, W, 4]` image as uint8
  `[H, W, 3]` RGB (`_to_rgb`'s rules)."""
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.dtype != np.uint8 or image.ndim not in (2, 3):
    raise ValueError(f"expected a uint8 [H, W(, C)] image, got {image.dtype} {image.shape}")
  if image.ndim == 3 and image.shape[-1] == 3:
    return np.array(image, dtype=np.uint8)
  return np.array(_to_rgb(Image.fromarray(np.ascontiguousarray(image))), dtype=np.uint8)


def load_original(raw: Any, min_side: int | None = None, decoder: str = "pil") -> Original:
  """A stored image, whatever a source holds (encoded bytes, a decoded uint8 array `[H, W]`,
  `[H, W, 1]` or `[H, W, 3]`, or a path), at its own resolution (`decode_original`; a decoded
  array comes back as it is, as RGB, at scale 1). Errors name the path."""
  _check_min_side(min_side)
  _check_choice(decoder, DECODERS, "decoder")
  if isinstance(raw, np.ndarray):
    pixels = _array_to_rgb(raw)
    return Original(pixels, pixels.shape[0], pixels.shape[1], 1.0)
  if isinstance(raw, bytes | np.bytes_):
    return _decode_original(bytes(raw), min_side, decoder, None)
  path = os.fspath(raw)
  return _decode_original(_read_bytes(path), min_side, decoder, path)


def encode_png(image: np.ndarray) -> bytes:
  """uint8 `[H, W, 3]` RGB -> PNG bytes (lossless)."""
  buffer = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(np.asarray(image, dtype=np.uint8))).save(buffer, "PNG")
  return buffer.getvalue()


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
  """uint8 `[H, W, 3]` RGB -> JPEG bytes (PIL, 4:2:0 chroma subsampling, `quality` 1..100)."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
  _check_quality(quality)
  return _encode_pil_jpeg(Image.fromarray(np.ascontiguousarray(image)), quality)


def _check_quality(quality: int) -> None:
  if (
    isinstance(quality, bool)
    or not isinstance(quality, int | np.integer)
    or not 1 <= quality <= 100
  ):
    raise ValueError(f"JPEG quality must be an int in 1..100, got {quality!r}")


def _encode_pil_jpeg(image: Image.Image, quality: int) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG", quality=int(quality))
  return buffer.getvalue()


def _shorter_side_to(width: int, height: int, shorter: int) -> tuple[int, int]:
  """(width, height) scaled so the shorter side is `shorter`, the longer one rounded."""
  if width <= height:
    return shorter, max(1, int(round(height * shorter / width)))
  return max(1, int(round(width * shorter / height))), shorter


def downscale_jpeg(data: bytes, max_shorter_side: int, quality: int = 95) -> bytes:
  """Bounds an image's shorter side at conversion time; the result is always a JPEG.

  An image whose shorter side exceeds `max_shorter_side` is resized (bicubic, aspect ratio kept,
  longer side rounded) so that its shorter side equals it, and re-encoded. JPEGs are drafted to
  the smallest power-of-two scale that keeps twice the target size, so the bicubic step always
  shrinks by 2x or more (before re-encoding, 0.1-0.3 grey levels from resizing at full resolution
  on average, single pixels up to 5, on photos of 2000x1500 and 4000x3000 bounded at 256 or 384).
  A JPEG that is small enough comes back unchanged (the same bytes, after a full decode at 1/8
  scale to check it is complete); other small images are converted to RGB and encoded.

  Args:
    data: the encoded file.
    max_shorter_side: the largest shorter side kept, in pixels.
    quality: JPEG quality of re-encoded images.

  Returns:
    JPEG bytes.

  Raises:
    UnreadableImageError: empty, truncated or undecodable bytes.
  """
  _check_positive(max_shorter_side, "max_shorter_side")
  _check_quality(quality)
  image = _open(data, None)
  width, height = image.size
  if min(width, height) <= max_shorter_side:
    if image.format in _JPEG_FORMATS:
      image.draft(image.mode, (1, 1))  # cheapest full pass over the entropy-coded data
      _load_rgb(image, data, None)
      return data
    return _encode_pil_jpeg(_load_rgb(image, data, None), quality)
  out_w, out_h = _shorter_side_to(width, height, max_shorter_side)
  drafted = image.draft("RGB", (2 * out_w, 2 * out_h))
  scale = 1.0 if drafted is None else drafted[1][2] / width
  image = _load_rgb(image, data, None)
  box = (0.0, 0.0, width * scale, height * scale)
  return _encode_pil_jpeg(image.resize((out_w, out_h), _BICUBIC, box=box), quality)
