r"""Input-pipeline throughput on this machine: the shapes source alone and the full train pipeline.

  python bench/data_bench.py --image_size=64 --batch_size=64 --images=4000

Single process, no accelerator. Prints images/s of `ShapesSource.__getitem__` (rendering and
captions) and of `pipeline.make_train_dataset` batches (shuffle, caption pick, tokenisation,
batching, normalisation), each the best of `--repeats` timed runs.
"""

import time

import ml_collections
from absl import app, flags

from vlalign.data import pipeline, shapes
from vlalign.data.tokenizer import build_tokenizer

_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "Image side in pixels.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Global batch size of the train pipeline.")
_IMAGES = flags.DEFINE_integer("images", 4000, "Images per timed run.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs; the best is reported.")
_THREADS = flags.DEFINE_integer("num_threads", 0, "Grain read threads of the train pipeline.")


def data_config(image_size: int, num_threads: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    dict(
      name="shapes",
      image_size=image_size,
      max_len=24,
      tokenizer="shapes_words",
      train_size=200_000,
      val_size=1_000,
      test_size=1_000,
      seed=0,
      num_threads=num_threads,
    )
  )


def source_images_per_second(image_size: int, num_images: int, repeats: int) -> float:
  source = shapes.ShapesSource("train", image_size=image_size)
  best = float("inf")
  for r in range(repeats):
    start = time.perf_counter()
    for i in range(r * num_images, (r + 1) * num_images):
      source[i]
    best = min(best, time.perf_counter() - start)
  return num_images / best


def pipeline_images_per_second(
  config: ml_collections.ConfigDict, batch_size: int, num_images: int, repeats: int
) -> float:
  dataset = pipeline.make_train_dataset(
    config,
    build_tokenizer(config),
    global_batch_size=batch_size,
    seed=0,
    process_count=1,
    process_index=0,
  )
  iterator = iter(dataset)
  next(iterator)  # Builds the iterator chain outside the timing.
  steps = max(1, num_images // batch_size)
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      next(iterator)
    best = min(best, time.perf_counter() - start)
  return steps * batch_size / best


def main(argv):
  del argv
  size, images, repeats = _IMAGE_SIZE.value, _IMAGES.value, _REPEATS.value
  print(f"source   {size}x{size}: {source_images_per_second(size, images, repeats):8.0f} images/s")
  config = data_config(size, _THREADS.value)
  rate = pipeline_images_per_second(config, _BATCH_SIZE.value, images, repeats)
  print(f"pipeline {size}x{size} batch {_BATCH_SIZE.value}: {rate:8.0f} images/s")


if __name__ == "__main__":
  app.run(main)
