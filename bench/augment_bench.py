r"""Throughput of the augmentation recipes of `vlalign.data.augment` on one core.

  .venv/bin/python bench/augment_bench.py --sizes=64,256 --seconds=1.0

For every recipe and size, times `build_augment({name, image_size})` on random uint8 images of
that size, single-threaded, and prints images/s (the best of `--repeats` runs of about
`--seconds` each). The machine is shared, so take the best, not the mean.
"""

import time

import numpy as np
from absl import app, flags

from vlalign.data import augment

_SIZES = flags.DEFINE_list("sizes", ["64", "256"], "Square image sides in pixels.")
_RECIPES = flags.DEFINE_list("recipes", ["none", "resize", "crop_flip", "albef", "tcl"], "Recipes.")
_SECONDS = flags.DEFINE_float("seconds", 1.0, "Approximate length of one timed run.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs; the best is reported.")
_POOL = 16  # distinct source images, cycled


def images_per_second(name: str, size: int, seconds: float, repeats: int) -> float:
  """Best images/s of recipe `name` at `size` x `size` over `repeats` runs."""
  fn = augment.build_augment({"name": name, "image_size": size})
  data_rng = np.random.default_rng(0)
  images = data_rng.integers(0, 256, (_POOL, size, size, 3), dtype=np.uint8)
  rng = np.random.default_rng(1)
  start = time.perf_counter()  # calibrate: how many calls fit in `seconds`
  calls = 0
  while time.perf_counter() - start < 0.1 * seconds or calls < 10:
    fn(images[calls % _POOL], rng)
    calls += 1
  count = max(10, int(calls * 10))
  best = 0.0
  for _ in range(repeats):
    start = time.perf_counter()
    for i in range(count):
      fn(images[i % _POOL], rng)
    best = max(best, count / (time.perf_counter() - start))
  return best


def main(argv):
  del argv
  print(f"{'recipe':<10} {'size':>5} {'images/s':>10}")
  for size in (int(s) for s in _SIZES.value):
    for name in _RECIPES.value:
      rate = images_per_second(name, size, _SECONDS.value, _REPEATS.value)
      print(f"{name:<10} {size:>5} {rate:>10.0f}", flush=True)


if __name__ == "__main__":
  app.run(main)
