"""Writes the embedded shapes dataset to disk in the formats real datasets come in.

    python -m vlalign.data.shapes_to_files --out_dir=/tmp/shapes_files --format=albef_json \\
        --train_size=20000 --val_size=1000 --test_size=1000 --image_size=64

Formats (`vlalign.data.files` reads each of them):

- `albef_json`: `images/<split>/<index>.jpg`, `<split>.json`. The train file has one entry per
  caption `{image, caption, image_id}` (as ALBEF's `coco_train.json`), val and test one entry per
  image `{image, caption: [...]}` (as `coco_test.json`).
- `karpathy`: the same images and one `dataset_shapes.json` in Karpathy's layout
  (`images[].filepath, filename, split, imgid, sentences[].raw`).
- `webdataset`: `<split>-<shard>.tar` with `<key>.jpg` + `<key>.txt` members (img2dataset's
  layout), `--shard_size` examples per shard.

It is the embedded data's way into the file readers: the demo that trains from files, and tests
that need real JPEG files on disk. `--quality` sets the JPEG quality (95 keeps the pixels within a
few levels of the rendered ones).
"""

import io
import json
import os
import tarfile
from collections.abc import Iterator
from typing import Any

from absl import flags, logging

from vlalign import cli
from vlalign.data import images, shapes

FORMATS = ("albef_json", "karpathy", "webdataset")


def _examples(split: str, size: int, image_size: int, seed: int) -> Iterator[dict]:
  source = shapes.ShapesSource(split, num_examples=size, image_size=image_size, seed=seed)
  for i in range(len(source)):
    yield source[i]


def _write_jpegs(out_dir: str, split: str, examples: list[dict], quality: int) -> list[str]:
  """Writes `images/<split>/<index>.jpg`; returns the paths relative to `out_dir`."""
  os.makedirs(os.path.join(out_dir, "images", split), exist_ok=True)
  paths = []
  for example in examples:
    relative = os.path.join("images", split, f"{example['image_id']:06d}.jpg")
    with open(os.path.join(out_dir, relative), "wb") as f:
      f.write(images.encode_jpeg(example["image"], quality))
    paths.append(relative)
  return paths


def albef_json(out_dir: str, split: str, examples: list[dict], quality: int = 95) -> str:
  """Writes the split as ALBEF annotation JSON + JPEGs; returns the JSON's path."""
  paths = _write_jpegs(out_dir, split, examples, quality)
  if split == "train":
    entries = [
      {"image": path, "caption": caption, "image_id": f"shapes_{ex['image_id']}"}
      for path, ex in zip(paths, examples)
      for caption in ex["captions"]
    ]
  else:
    entries = [{"image": p, "caption": list(ex["captions"])} for p, ex in zip(paths, examples)]
  path = os.path.join(out_dir, f"{split}.json")
  with open(path, "w") as f:
    json.dump(entries, f)
  return path


def karpathy_entries(split: str, examples: list[dict], paths: list[str]) -> list[dict]:
  return [
    {
      "filepath": os.path.dirname(path),
      "filename": os.path.basename(path),
      "split": split,
      "imgid": ex["image_id"],
      "sentences": [{"raw": caption} for caption in ex["captions"]],
    }
    for path, ex in zip(paths, examples)
  ]


def webdataset(
  out_dir: str, split: str, examples: list[dict], shard_size: int = 1000, quality: int = 95
) -> list[str]:
  """Writes the split as img2dataset-style tar shards; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for shard, start in enumerate(range(0, len(examples), shard_size)):
    path = os.path.join(out_dir, f"{split}-{shard:05d}.tar")
    with tarfile.open(path, "w") as tar:
      for example in examples[start : start + shard_size]:
        key = f"{example['image_id']:09d}"
        _add(tar, f"{key}.jpg", images.encode_jpeg(example["image"], quality))
        _add(tar, f"{key}.txt", example["captions"][0].encode("utf-8"))
    paths.append(path)
  return paths


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write(
  out_dir: str,
  fmt: str,
  sizes: dict[str, int],
  image_size: int = 64,
  seed: int = 0,
  quality: int = 95,
  shard_size: int = 1000,
) -> dict[str, Any]:
  """Writes the splits `sizes` (`{split: number of images}`) in format `fmt`; returns the source
  spec of each split for `vlalign.data.files`."""
  if fmt not in FORMATS:
    raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")
  specs, karpathy = {}, []
  for split, size in sizes.items():
    examples = list(_examples(split, size, image_size, seed))
    logging.info("writing %d %s images as %s", len(examples), split, fmt)
    if fmt == "albef_json":
      ann = albef_json(out_dir, split, examples, quality)
      specs[split] = dict(format="albef_json", ann=ann, image_root=out_dir)
    elif fmt == "karpathy":
      paths = _write_jpegs(out_dir, split, examples, quality)
      karpathy += karpathy_entries(split, examples, paths)
      specs[split] = dict(format="karpathy", ann="", image_root=out_dir, split=split)
    else:
      shards = webdataset(out_dir, split, examples, shard_size, quality)
      specs[split] = dict(format="webdataset", shards=shards)
  if fmt == "karpathy":
    ann = os.path.join(out_dir, "dataset_shapes.json")
    with open(ann, "w") as f:
      json.dump({"dataset": "shapes", "images": karpathy}, f)
    for spec in specs.values():
      spec["ann"] = ann
  return specs


def main(argv: list[str]) -> None:
  del argv
  FLAGS = flags.FLAGS
  sizes = {"train": FLAGS.train_size, "val": FLAGS.val_size, "test": FLAGS.test_size}
  specs = write(
    FLAGS.out_dir,
    FLAGS.format,
    {split: size for split, size in sizes.items() if size > 0},
    image_size=FLAGS.image_size,
    seed=FLAGS.seed,
    quality=FLAGS.quality,
    shard_size=FLAGS.shard_size,
  )
  print(json.dumps(specs, indent=2))


def define_flags() -> None:
  flags.DEFINE_string("out_dir", None, "Directory to write into.", required=True)
  flags.DEFINE_enum("format", "albef_json", FORMATS, "Layout to write.")
  flags.DEFINE_integer("train_size", 20_000, "Train images (0 = no train split).")
  flags.DEFINE_integer("val_size", 1_000, "Val images (0 = no val split).")
  flags.DEFINE_integer("test_size", 1_000, "Test images (0 = no test split).")
  flags.DEFINE_integer("image_size", 64, "Side of the rendered images.")
  flags.DEFINE_integer("seed", 0, "Dataset seed (data.seed of the configs).")
  flags.DEFINE_integer("quality", 95, "JPEG quality.")
  flags.DEFINE_integer("shard_size", 1000, "Examples per tar shard (webdataset).")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
