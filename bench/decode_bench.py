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

`--crops` measures train crops of the original image instead (`data.train_decode`, the
`"original"` path of `vlalign.data.pipeline`), on the `native` and `1000x750` sets:

  PYTHONPATH=. .venv/bin/python bench/decode_bench.py --crops --size=256 --rounds=5

1. per core (one thread, CPU time, median of rounds), the ALBEF recipe per image: "resized" (the
   path before: decode + squash to S, then the recipe crops the S x S image), "original" (decode at
   full resolution, the recipe crops it), and "original, min_side B" (JPEG draft to the smallest
   scale keeping both sides >= B, the box drawn on the stored size) for B = 2S and S;
2. fidelity: mean absolute difference (grey levels) of `crop_flip` crops from the drafted image
   against the same draws on the full-resolution image, over `--fidelity_draws` draws per photo,
   with the box drawn on the stored size (what the pipeline does) and, for comparison, on the
   drafted image (rounded to its coarser grid);
3. the Grain train pipeline (`pipeline.make_train_dataset`, ALBEF recipe, `--pipeline_threads`
   read threads, batch 32) over an `albef_json` dataset of the 1000x750 JPEGs written to a
   temporary directory: pairs per CPU-second of the process (all threads; what 2 unshared cores
   give is about twice that, as the read threads keep both busy) and pairs/s of wall time, each
   the best of `--rounds` runs of `--pipeline_images`.

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
_CROPS = flags.DEFINE_bool("crops", False, "Measure train crops of the original image instead.")
_PROFILE = flags.DEFINE_bool(
  "profile", False, "Time the steps of decode_image (pil decoder) one by one instead."
)
_FIDELITY_DRAWS = flags.DEFINE_integer("fidelity_draws", 20, "Crops per photo for the fidelity.")
_PIPELINE_THREADS = flags.DEFINE_integer("pipeline_threads", 2, "Grain read threads (--crops).")
_PIPELINE_IMAGES = flags.DEFINE_integer("pipeline_images", 640, "Pairs per timed pipeline run.")

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


# ----------------------------------------------------------------------------- --crops


def crop_pipelines(size: int) -> dict[str, Callable[[bytes], object]]:
  """Row name -> one train image's work with the ALBEF recipe (see the module docstring)."""
  albef = augment.build_augment(dict(name="albef", image_size=size))
  rng = np.random.default_rng(0)

  def original(min_side):
    def run(data):
      decoded = images.decode_original(data, min_side)
      if decoded.scale == 1.0:
        return albef(decoded.image, rng)
      source = dict(source_size=(decoded.height, decoded.width), source_scale=decoded.scale)
      return albef(decoded.image, rng, **source)

    return run

  return {
    "resized (before)": lambda data: albef(images.decode_image(data, size), rng),
    "original, full resolution": original(None),
    f"original, min_side {2 * size}": original(2 * size),
    f"original, min_side {size}": original(size),
  }


def crop_fidelity(encoded: list[bytes], size: int, min_side: int, draws: int) -> tuple:
  """(drafted photos, mean |diff| with the box on the stored size, 95th percentile of the
  per-crop means, the same mean with the box on the drafted image) of `crop_flip` crops."""
  crop = augment.build_augment(dict(name="crop_flip", image_size=size))
  exact, naive, drafted = [], [], 0
  for data in encoded:
    full = images.decode_original(data).image
    small = images.decode_original(data, min_side)
    if small.scale == 1.0:
      continue
    drafted += 1
    source = dict(source_size=(small.height, small.width), source_scale=small.scale)
    for seed in range(draws):
      want = crop(full, np.random.default_rng(seed)).astype(np.int32)
      got = crop(small.image, np.random.default_rng(seed), **source)
      rounded = crop(small.image, np.random.default_rng(seed))
      exact.append(np.abs(got - want).mean())
      naive.append(np.abs(rounded - want).mean())
  if not drafted:
    return 0, float("nan"), float("nan"), float("nan")
  return drafted, np.mean(exact), np.percentile(exact, 95), np.mean(naive)


def pipeline_rate(
  encoded: list[bytes], size: int, threads: int, pairs: int, rounds: int, **fields
) -> tuple[float, float]:
  """(pairs per CPU-second of the process, pairs/s of wall time), each the best of `rounds` runs,
  of the Grain train pipeline over a file dataset of `encoded`."""
  import json
  import tempfile

  from vlalign.data import pipeline
  from vlalign.data.tokenizer import build_tokenizer

  with tempfile.TemporaryDirectory() as root:
    entries = []
    for i, data in enumerate(encoded):
      with open(os.path.join(root, f"{i}.jpg"), "wb") as f:
        f.write(data)
      entries.append({"image": f"{i}.jpg", "caption": "a photo"})
    ann = os.path.join(root, "train.json")
    with open(ann, "w") as f:
      json.dump(entries * 64, f)  # 64 epochs of the photos per pass of the index
    config = dict(
      name="files", image_size=size, max_len=24, tokenizer="shapes_words", num_threads=threads,
      train=dict(format="albef_json", ann=ann, image_root=root), augment=dict(name="albef"),
      **fields,
    )  # fmt: skip
    batch = 32
    dataset = pipeline.make_train_dataset(
      config, build_tokenizer(config), global_batch_size=batch, seed=0, process_index=0,
      process_count=1,
    )  # fmt: skip
    iterator = iter(dataset)
    next(iterator)
    steps, best_cpu, best_wall = max(1, pairs // batch), float("inf"), float("inf")
    for _ in range(rounds):
      cpu, wall = time.process_time(), time.perf_counter()
      for _ in range(steps):
        next(iterator)
      best_cpu = min(best_cpu, time.process_time() - cpu)
      best_wall = min(best_wall, time.perf_counter() - wall)
    return steps * batch / best_cpu, steps * batch / best_wall


def crops_main(sets: dict[str, list[bytes]], size: int, rounds: int, seconds: float) -> None:
  sets = {name: sets[name] for name in ("native", "1000x750")}
  rows = crop_pipelines(size)
  samples: dict[tuple[str, str], list[float]] = {}
  for r in range(rounds):
    for set_name, encoded in sets.items():
      for row, fn in rows.items():
        samples.setdefault((set_name, row), []).append(rate(fn, encoded, seconds)[0])
    print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
  print(f"load average after the per-core rounds: {os.getloadavg()[0]:.2f}\n")
  print("| photos | train image (ALBEF recipe) | images/s per core |")
  print("|---|---|---|")
  for (set_name, row), values in samples.items():
    print(f"| {set_name} | {row} | {statistics.median(values):.0f} |")
  print(f"\nfidelity: crop_flip at {size} px from the drafted image vs the full resolution")
  print("| photos | min_side | photos drafted | mean abs diff | p95 | box on the drafted image |")
  print("|---|---|---|---|---|---|")
  for set_name, encoded in sets.items():
    for min_side in (2 * size, size):
      drafted, mean, p95, naive = crop_fidelity(encoded, size, min_side, _FIDELITY_DRAWS.value)
      print(
        f"| {set_name} | {min_side} | {drafted}/{len(encoded)} | {mean:.2f} | {p95:.2f} | "
        f"{naive:.2f} |"
      )
  threads = _PIPELINE_THREADS.value
  print(f"\nGrain train pipeline, 1000x750 JPEGs, ALBEF recipe, {threads} read threads, batch 32")
  header = ("data config", "pairs per CPU-second", "x 2 (2 free cores, ideal scaling)",
            "pairs/s (wall, under this load)")  # fmt: skip
  print("| " + " | ".join(header) + " |")
  print("|---|---|---|---|")
  variants = {
    'train_decode="resized" (before)': dict(train_decode="resized"),
    'train_decode="original"': dict(train_decode="original"),
    f"original, train_decode_min_side={2 * size}": dict(train_decode_min_side=2 * size),
    f"original, train_decode_min_side={size}": dict(train_decode_min_side=size),
  }
  for name, fields in variants.items():
    cpu, wall = pipeline_rate(
      sets["1000x750"], size, threads, _PIPELINE_IMAGES.value, rounds, **fields
    )
    print(f"| {name} | {cpu:.0f} | {2 * cpu:.0f} | {wall:.0f} |", flush=True)
  print(f"load average after: {os.getloadavg()[0]:.2f}")


# ----------------------------------------------------------------------------- --profile


def profile_steps(size: int) -> dict[str, Callable[[list[bytes]], Callable[[bytes], object]]]:
  """Step name -> (encoded set -> one image's work): the steps of `decode_image(data, size)` with
  the PIL decoder, each timed alone, plus the 1/8-scale decode (entropy-decoding floor)."""

  def drafted(data):
    return images._decode_pil(data, size, None)

  def resize_alone(encoded):
    decoded = {id(d): drafted(d) for d in encoded}  # decoded once, outside the timed loop

    def run(data):
      dec = decoded[id(data)]
      box = tuple(v * dec.scale for v in images._source_box(dec.width, dec.height, size, "squash"))
      return dec.image.resize((size, size), Image.Resampling.BICUBIC, box=box)

    return run

  def to_numpy(encoded):
    outs = {id(d): images.decode_image(d, size) for d in encoded}
    pil = {k: Image.fromarray(v) for k, v in outs.items()}
    return lambda data: np.array(pil[id(data)], dtype=np.uint8)

  def floor(data):
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (1, 1))  # scale 1/8: the inverse DCT is the DC term only
    image.load()
    return image

  return {
    "open (header only)": lambda encoded: lambda data: Image.open(io.BytesIO(data)),
    "decode at 1/8 scale (entropy-decoding floor)": lambda encoded: floor,
    "decode at the draft scale (to RGB)": lambda encoded: drafted,
    "bicubic resize alone (from the drafted image)": resize_alone,
    "PIL image -> numpy copy": to_numpy,
    "decode_image (all of it)": lambda encoded: lambda data: images.decode_image(data, size),
  }


def profile_main(sets: dict[str, list[bytes]], size: int, rounds: int, seconds: float) -> None:
  sets = {name: sets[name] for name in ("native", "1000x750", "1000x750 pre-resized")}
  steps = profile_steps(size)
  samples: dict[tuple[str, str], list[float]] = {}
  for r in range(rounds):
    for set_name, encoded in sets.items():
      for step, make in steps.items():
        cpu_rate, _ = rate(make(encoded), encoded, seconds)
        samples.setdefault((step, set_name), []).append(1000.0 / cpu_rate)
    print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
  print(f"load average after: {os.getloadavg()[0]:.2f}\n")
  print("| step (pil decoder, squash to " + f"{size} px) | " + " | ".join(sets) + " |")
  print("|---|" + "---:|" * len(sets))
  for step in steps:
    cells = [f"{statistics.median(samples[(step, s)]):.2f}" for s in sets]
    print(f"| {step} | " + " | ".join(cells) + " |")
  print(f"\nms of CPU time per image, one thread, median of {rounds} rounds.")


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
  if _PROFILE.value:
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    profile_main(sets, size, rounds, seconds)
    return
  if _CROPS.value:
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    crops_main(sets, size, rounds, seconds)
    return
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
