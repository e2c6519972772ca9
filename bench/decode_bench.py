r"""Image decoding throughput on one core: decode + resize (+ ALBEF augmentation) of real photos.

  .venv/bin/pip install scikit-image simplejpeg   # the photos (bench only) and the third decoder
  PYTHONPATH=. .venv/bin/python bench/decode_bench.py --size=256 --rounds=9

Photos: the colour photographs that ship inside scikit-image (`skimage.data`; public domain / CC0),
encoded as JPEG (PIL, quality `--quality`, 4:2:0) in four sets:

- `native`: at their own sizes (300x451 to 1411x1411);
- `1000x750`: each resized (bicubic) to 1000x750, the size of a typical web photo (COCO images are
  ~640x480, CC3M and LAION vary). Upscaled photos hold less fine detail than real ones of that
  size, which makes their entropy decoding a little cheaper;
- `1000x750 pre-resized`: the `1000x750` set through `images.downscale_jpeg(max_shorter_side=
  --size)`, i.e. what the decoders meet when a dataset was pre-resized at conversion time;
- `1000x750 pre-squashed to SxS`: the `1000x750` set already squashed to the output size (an
  evaluation set converted for one resolution: the decoders' resize is a copy).

Decoders (columns): `PIL, no draft` (`Image.open(...).convert("RGB").resize((S, S), BICUBIC)`, the
references' loader), `PIL + draft` (`images.decode_image(..., decoder="pil")`) and `simplejpeg`
(`images.decode_image(..., decoder="simplejpeg")`; skipped if not installed). Pipelines (rows):
the decode alone (to an RGB image at the draft scale, the module's private step), decode + squash
resize to `--size`, and the same followed by `augment.build_augment(dict(name="albef",
image_size=size))` (random resized crop, flip, RandAugment) on the resized image.

Single process, single thread; a cell's figure is images per CPU-second of this thread
(`time.thread_time`), i.e. images/s per core, which waits for other processes do not count in.
Each round times every (set, pipeline, decoder) cell once for about `--seconds` of CPU time, the
decoders of a cell back to back, so slow phases of a shared machine hit all of them alike; the
table holds the median over `--rounds` rounds. The load average before and after and the ratio of
wall to CPU time are printed: other processes still slow a thread down through shared caches.
"""

import io
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import PIL
from absl import app, flags
from PIL import Image, features

from vlalign.data import augment, images

_SIZE = flags.DEFINE_integer("size", 256, "Output side in pixels.")
_ROUNDS = flags.DEFINE_integer("rounds", 9, "Rounds over all cells; the median is reported.")
_SECONDS = flags.DEFINE_float("seconds", 0.4, "CPU seconds of one timed cell (about).")
_QUALITY = flags.DEFINE_integer("quality", 90, "JPEG quality of the encoded photos.")

TARGET = 1000.0  # images/s per core, decode + resize at 256 px (the project's stated target)
PHOTOS = (
  "astronaut",
  "chelsea",
  "coffee",
  "rocket",
  "stereo_motorcycle",
  "hubble_deep_field",
  "immunohistochemistry",
  "retina",
)
WEB_SIZE = (1000, 750)  # (width, height)
INSTALL = ".venv/bin/pip install scikit-image"

Decoder = Callable[[bytes, int], np.ndarray]


def load_photos() -> list[np.ndarray]:
  """The scikit-image colour photos as uint8 `[H, W, 3]`; exits with the install line without it."""
  try:
    from skimage import data
  except ImportError:
    sys.exit(f"decode_bench needs scikit-image for its photos (bench only): {INSTALL}")
  photos = []
  for name in PHOTOS:
    photo = getattr(data, name)()
    photos.append(photo[0] if isinstance(photo, tuple) else photo)  # stereo: the left view
  return photos


def photo_sets(photos: list[np.ndarray], size: int, quality: int) -> dict[str, list[bytes]]:
  """Set name -> JPEG bytes of every photo (see the module docstring)."""
  native = [images.encode_jpeg(p, quality) for p in photos]
  web = [
    images.encode_jpeg(np.asarray(Image.fromarray(p).resize(WEB_SIZE, Image.BICUBIC)), quality)
    for p in photos
  ]
  pre = [images.downscale_jpeg(b, size, quality) for b in web]
  squashed = [images.encode_jpeg(images.decode_image(b, size), quality) for b in web]
  return {
    "native": native,
    "1000x750": web,
    "1000x750 pre-resized": pre,
    f"1000x750 pre-squashed to {size}x{size}": squashed,
  }


def pil_no_draft(data: bytes, size: int) -> np.ndarray:
  """The references' loader: full-resolution decode, RGB, bicubic squash."""
  image = Image.open(io.BytesIO(data)).convert("RGB")
  return np.array(image.resize((size, size), Image.BICUBIC), dtype=np.uint8)


class Column(NamedTuple):
  """A decoder: its decode alone (to RGB, before the resize) and its decode + squash resize."""

  decode_only: Callable[[bytes, int], object]
  decode: Decoder


def columns() -> dict[str, Column | None]:
  """Column name -> decoder; None where simplejpeg is not installed.

  The decode-only functions are the module's private steps (the RGB PIL image before the resize).
  """
  try:
    import simplejpeg  # noqa: F401
  except ImportError:
    has_simplejpeg = False
  else:
    has_simplejpeg = True
  sj = Column(
    lambda data, size: images._decode_simplejpeg(data, size),
    lambda data, size: images.decode_image(data, size, "squash", "simplejpeg"),
  )
  return {
    "PIL, no draft": Column(
      lambda data, size: Image.open(io.BytesIO(data)).convert("RGB"), pil_no_draft
    ),
    "PIL + draft": Column(
      lambda data, size: images._decode_pil(data, size, None),
      lambda data, size: images.decode_image(data, size, "squash", "pil"),
    ),
    "simplejpeg": sj if has_simplejpeg else None,
  }


def rate(
  fn: Callable[[bytes], object], encoded: list[bytes], seconds: float
) -> tuple[float, float]:
  """(images per CPU-second, images per wall-second) of `fn` cycling over `encoded`.

  Runs whole passes until the thread has used `seconds` of CPU time. CPU time (`time.thread_time`)
  is what "images/s per core" means; wall time also counts the waits for other processes.
  """
  fn(encoded[0])  # warm-up
  count = 0
  cpu_start, wall_start = time.thread_time(), time.perf_counter()
  while True:
    for data in encoded:
      fn(data)
    count += len(encoded)
    cpu = time.thread_time() - cpu_start
    if cpu >= seconds:
      return count / cpu, count / (time.perf_counter() - wall_start)


ROWS = ("decode only", "decode + resize", "decode + resize + albef")


def pipelines(column: Column, size: int) -> dict[str, Callable[[bytes], object]]:
  """Row name (`ROWS`) -> one image's work for a decoder."""
  albef = augment.build_augment(dict(name="albef", image_size=size))
  rng = np.random.default_rng(0)
  return {
    "decode only": lambda data: column.decode_only(data, size),
    "decode + resize": lambda data: column.decode(data, size),
    "decode + resize + albef": lambda data: albef(column.decode(data, size), rng),
  }


def cpu_model() -> str:
  """`/proc/cpuinfo`'s model name, family, model and clock of the first CPU."""
  fields = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if not key.strip():
          break  # the end of the first CPU's block
        fields.setdefault(key.strip(), value.strip())
  except OSError:
    return platform.processor() or "unknown"
  return (
    f"{fields.get('model name', 'unknown')} (family {fields.get('cpu family', '?')}, model "
    f"{fields.get('model', '?')}, {float(fields.get('cpu MHz', 0)):.0f} MHz)"
  )


def versions() -> str:
  try:
    import simplejpeg

    sj = simplejpeg.__version__
  except ImportError:
    sj = "not installed"
  import skimage

  return (
    f"Python {platform.python_version()}, Pillow {PIL.__version__} (libjpeg-turbo "
    f"{features.version('libjpeg_turbo')}), simplejpeg {sj}, numpy {np.__version__}, "
    f"scikit-image {skimage.__version__}"
  )


def describe_set(encoded: list[bytes]) -> str:
  sizes = [Image.open(io.BytesIO(b)).size for b in encoded]
  pixels = statistics.mean(w * h for w, h in sizes) / 1e6
  kib = statistics.mean(len(b) for b in encoded) / 1024
  sides = sorted({f"{w}x{h}" for w, h in sizes})
  return f"{len(encoded)} JPEGs, mean {pixels:.2f} Mpx, {kib:.0f} KiB; {', '.join(sides)}"


def main(argv):
  del argv
  size, rounds, seconds = _SIZE.value, _ROUNDS.value, _SECONDS.value
  photos = load_photos()
  sets = photo_sets(photos, size, _QUALITY.value)
  decoders = columns()
  print(f"CPU: {cpu_model()}; {os.cpu_count()} logical CPUs; single process, single thread")
  print(versions())
  for name, encoded in sets.items():
    print(f"set {name}: {describe_set(encoded)}")
  for encoded in sets.values():  # every decoder gives the [size, size, 3] uint8 contract
    for column in filter(None, decoders.values()):
      out = column.decode(encoded[0], size)
      assert out.shape == (size, size, 3) and out.dtype == np.uint8, out.shape
  print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
  samples: dict[tuple[str, str, str], list[float]] = {}
  wall_over_cpu = []  # > 1 where other processes took the core away
  for r in range(rounds):
    for set_name, encoded in sets.items():
      for name, column in decoders.items():
        if column is None:
          continue
        for row, fn in pipelines(column, size).items():
          cpu_rate, wall_rate = rate(fn, encoded, seconds)
          samples.setdefault((set_name, row, name), []).append(cpu_rate)
          wall_over_cpu.append(cpu_rate / wall_rate)
    print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
  print(f"load average after: {os.getloadavg()[0]:.2f}")
  print(f"wall time / CPU time of the timed cells: median {statistics.median(wall_over_cpu):.2f}\n")
  header = ["photos", "pipeline", *decoders, f"target {TARGET:.0f}/s met (best decoder)"]
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  rows = [(s, p) for s in sets for p in ROWS]
  for set_name, row in rows:
    medians = {
      c: statistics.median(samples[(set_name, row, c)])
      for c in decoders
      if (set_name, row, c) in samples
    }
    cells = [f"{medians[c]:.0f}" if c in medians else "n/a" for c in decoders]
    best = max(medians.values())
    verdict = ("yes" if best >= TARGET else "no") if row == "decode + resize" else ""
    print(f"| {set_name} | {row} | " + " | ".join(cells) + f" | {verdict} |")
  print(
    f"\nimages per CPU-second of the one thread (images/s per core), median of {rounds} rounds; "
    f"output {size}x{size}, squash (bicubic)."
  )


if __name__ == "__main__":
  app.run(main)
