r"""Input-pipeline throughput on this machine: the shapes source alone and the full train pipeline.

  PYTHONPATH=. .venv/bin/python bench/data_bench.py --image_size=64 --batch_size=64 --images=4000
  PYTHONPATH=. .venv/bin/python bench/data_bench.py --augment=tcl --augment_views=2 --num_threads=1

Single process, no accelerator. Prints images/s of `ShapesSource.__getitem__` (rendering and
captions), then the rate of `pipeline.make_train_dataset` batches (shuffle, caption pick,
augmentation of every view, tokenisation, batching, normalisation) as pairs/s (image-text examples)
and augmented images/s (pairs/s times the number of views; 0 without `--augment`), each the best
of `--repeats` timed runs. `--profile` adds a cProfile of one more run of the pipeline (with
`--num_threads=0` it sees every stage; with threads only the main thread's waiting).
"""

import cProfile
import pstats
import time

import ml_collections
from absl import app, flags

from vlalign.data import pipeline, shapes
from vlalign.data.tokenizer import build_tokenizer

_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "Image side in pixels.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Global batch size of the train pipeline.")
_IMAGES = flags.DEFINE_integer("images", 4000, "Image-text pairs per timed run.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs; the best is reported.")
_THREADS = flags.DEFINE_integer("num_threads", 0, "Grain read threads of the train pipeline.")
_AUGMENT = flags.DEFINE_enum(
  "augment", "", ["", "none", "resize", "crop_flip", "albef", "tcl"], "Augment recipe ('' = off)."
)
_VIEWS = flags.DEFINE_integer("augment_views", 1, "Augmented views per image (1 or 2).")
_SKIP_SOURCE = flags.DEFINE_bool("skip_source", False, "Do not time the source alone.")
_PROFILE = flags.DEFINE_integer("profile", 0, "Print this many top functions of a cProfile run.")


def data_config(
  image_size: int, num_threads: int, augment: str = "", augment_views: int = 1
) -> ml_collections.ConfigDict:
  """The train data config of the benchmark; `augment` '' means no augmentation."""
  config = dict(
    name="shapes",
    image_size=image_size,
    max_len=24,
    tokenizer="shapes_words",
    train_size=200_000,
    val_size=1_000,
    test_size=1_000,
    seed=0,
    num_threads=num_threads,
    augment_views=augment_views,
  )
  if augment:
    config["augment"] = dict(name=augment)
  return ml_collections.ConfigDict(config)


def source_images_per_second(image_size: int, num_images: int, repeats: int) -> float:
  source = shapes.ShapesSource("train", image_size=image_size)
  best = float("inf")
  for r in range(repeats):
    start = time.perf_counter()
    for i in range(r * num_images, (r + 1) * num_images):
      source[i]
    best = min(best, time.perf_counter() - start)
  return num_images / best


def pipeline_pairs_per_second(
  config: ml_collections.ConfigDict,
  batch_size: int,
  num_images: int,
  repeats: int,
  profile_top: int = 0,
) -> float:
  """Best image-text examples/s of the train pipeline over `repeats` runs of `num_images`."""
  dataset = pipeline.make_train_dataset(
    config,
    build_tokenizer(config),
    global_batch_size=batch_size,
    seed=0,
    process_count=1,
    process_index=0,
  )
  iterator = iter(dataset)
  next(iterator)  # Builds the iterator chain (and starts the threads) outside the timing.
  steps = max(1, num_images // batch_size)
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      next(iterator)
    best = min(best, time.perf_counter() - start)
  if profile_top:
    profiler = cProfile.Profile()
    profiler.runcall(lambda: [next(iterator) for _ in range(steps)])
    pstats.Stats(profiler).sort_stats("tottime").print_stats(profile_top)
  return steps * batch_size / best


def main(argv):
  del argv
  size, images, repeats = _IMAGE_SIZE.value, _IMAGES.value, _REPEATS.value
  if not _SKIP_SOURCE.value:
    rate = source_images_per_second(size, images, repeats)
    print(f"source   {size}x{size}: {rate:8.0f} images/s")
  augment, views, threads = _AUGMENT.value, _VIEWS.value, _THREADS.value
  config = data_config(size, threads, augment, views)
  pairs = pipeline_pairs_per_second(config, _BATCH_SIZE.value, images, repeats, _PROFILE.value)
  augmented = pairs * views if augment else 0.0
  print(
    f"pipeline {size}x{size} batch {_BATCH_SIZE.value} augment={augment or 'off'} views={views} "
    f"threads={threads}: {pairs:8.0f} pairs/s {augmented:8.0f} augmented images/s"
  )


if __name__ == "__main__":
  app.run(main)
