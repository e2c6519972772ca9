"""Tests of the shapes dataset against plain-loop references on its masks and attributes."""

import functools
import itertools
import subprocess
import sys

import numpy as np
import pytest

from vlalign.data import shapes

SIZE = 32


@functools.cache
def _sample(split: str, count: int = 150, image_size: int = SIZE) -> tuple[dict, ...]:
  source = shapes.ShapesSource(split, image_size=image_size, seed=3)
  return tuple(source[i] for i in range(count))


def _objects(example: dict) -> list[tuple[str, str, str]]:
  """(colour, shape, size) words of each object, in mask order."""
  n = example["num_objects"]
  return [
    (
      shapes.COLORS[example["object_color"][k]],
      shapes.SHAPES[example["object_shape"][k]],
      shapes.SIZES[example["object_size"][k]],
    )
    for k in range(n)
  ]


def _centroid(mask: np.ndarray, k: int) -> tuple[float, float]:
  ys, xs = np.nonzero(mask == k)
  return float(xs.mean()), float(ys.mean())


def _assert_same(a: dict, b: dict) -> None:
  assert a.keys() == b.keys()
  for key in a:
    if isinstance(a[key], np.ndarray):
      np.testing.assert_array_equal(a[key], b[key])
    else:
      assert a[key] == b[key], key


def test_same_seed_same_examples_and_different_indices_differ():
  first = shapes.ShapesSource("train", image_size=SIZE, seed=5)
  again = shapes.ShapesSource("train", image_size=SIZE, seed=5)
  other_seed = shapes.ShapesSource("train", image_size=SIZE, seed=6)
  for i in (0, 7, 123_456):
    _assert_same(first[i], again[i])
    assert not np.array_equal(first[i]["image"], other_seed[i]["image"])
  images = [first[i]["image"] for i in range(20)]
  for a, b in itertools.combinations(images, 2):
    assert not np.array_equal(a, b)
  assert first[3]["image_id"] == 3


def test_identical_in_another_process():
  code = (
    "from vlalign.data import shapes; e = shapes.ShapesSource('val', image_size=32, seed=5)[11];"
    "print(e['image'].sum(), e['mask'].sum(), '|'.join(e['captions']))"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  e = shapes.ShapesSource("val", image_size=32, seed=5)[11]
  assert out.stdout.strip() == f"{e['image'].sum()} {e['mask'].sum()} {'|'.join(e['captions'])}"


def test_example_layout_and_types():
  example = shapes.ShapesSource("test", image_size=40)[0]
  assert example["image"].shape == (40, 40, 3) and example["image"].dtype == np.uint8
  assert example["mask"].shape == (40, 40) and example["mask"].dtype == np.uint8
  assert len(example["captions"]) == 5 and all(isinstance(c, str) for c in example["captions"])
  counts = set()
  for ex in _sample("train"):
    n = ex["num_objects"]
    counts.add(n)
    for key in ("object_shape", "object_color", "object_size"):
      assert ex[key].shape == (3,) and ex[key].dtype == np.int32
      assert (ex[key][:n] >= 0).all() and (ex[key][n:] == -1).all()
  assert counts == {1, 2, 3}


def test_split_sizes_and_errors():
  assert len(shapes.ShapesSource("train")) == 200_000
  assert len(shapes.ShapesSource("val")) == len(shapes.ShapesSource("test")) == 1_000
  assert len(shapes.ShapesSource("val", num_examples=7)) == 7
  with pytest.raises(ValueError, match="'train'.*no examples"):
    shapes.ShapesSource("train", num_examples=0)
  with pytest.raises(ValueError, match="'dev'"):
    shapes.ShapesSource("dev")
  with pytest.raises(IndexError):
    shapes.ShapesSource("val", num_examples=3)[3]


def test_held_out_pairs_never_in_train_and_in_every_val_test_image():
  num_pairs = len(shapes.COLORS) * len(shapes.SHAPES)
  assert 0.15 <= len(shapes.HELD_OUT_PAIRS) / num_pairs <= 0.2
  held_out = set(shapes.HELD_OUT_PAIRS)
  for ex in _sample("train"):
    assert not {(c, s) for c, s, _ in _objects(ex)} & held_out
  for split in ("val", "test"):
    for ex in _sample(split):
      assert {(c, s) for c, s, _ in _objects(ex)} & held_out


def test_masks_match_objects_colours_and_sizes():
  areas = {}
  for ex in _sample("train") + _sample("val"):
    mask, n = ex["mask"], ex["num_objects"]
    assert set(np.unique(mask).tolist()) == set(range(n + 1))
    for k, (color, shape, size) in enumerate(_objects(ex), start=1):
      pixels = ex["image"][mask == k].astype(np.float64)
      assert len(pixels) > 0
      mean = pixels.mean(axis=0)
      nearest = np.argmin(np.abs(shapes.COLOR_RGB[None] - mean[None]).sum(axis=-1))
      assert shapes.COLORS[nearest] == color
      assert np.abs(mean - shapes.COLOR_RGB[shapes.COLORS.index(color)]).max() <= 24
      areas.setdefault((shape, size), []).append(len(pixels))
  for shape in shapes.SHAPES:
    assert max(areas[(shape, "small")]) < min(areas[(shape, "large")])


def _mentions(words: list[str]) -> list[tuple[int, str, str]]:
  """(position, colour, shape) of each 'colour shape' or 'shape that is colour' in `words`."""
  plural = dict(zip(shapes.SHAPE_PLURALS, shapes.SHAPES))
  out = []
  for i in range(len(words) - 1):
    shape = plural.get(words[i + 1], words[i + 1])
    if words[i] in shapes.COLORS and shape in shapes.SHAPES:
      out.append((i, words[i], shape))
    if words[i] in shapes.SHAPES and words[i + 1 : i + 3] == ["that", "is"] and i + 3 < len(words):
      out.append((i, words[i + 3], words[i]))
  return out


def test_captions_name_exactly_the_objects():
  plural = dict(zip(shapes.SHAPE_PLURALS, shapes.SHAPES))
  for ex in _sample("train") + _sample("test"):
    objects = _objects(ex)
    assert len(set(ex["captions"])) == 5
    for caption in ex["captions"]:
      words = caption.split()
      assert {w for w in words if w in shapes.COLORS} == {c for c, _, _ in objects}
      named_shapes = {plural.get(w, w) for w in words if plural.get(w, w) in shapes.SHAPES}
      assert named_shapes == {s for _, s, _ in objects}
      assert {w for w in words if w in shapes.SIZES} <= {z for _, _, z in objects}
      mentioned = {(c, s) for _, c, s in _mentions(words)}
      assert mentioned == {(c, s) for c, s, _ in objects}


def test_counts_are_captioned_when_objects_share_colour_and_shape():
  seen = 0
  for ex in _sample("train"):
    pairs = [(c, s) for c, s, _ in _objects(ex)]
    for (color, shape), num in {p: pairs.count(p) for p in pairs}.items():
      if num >= 2:
        seen += 1
        count_word = ("two", "three")[num - 2]
        noun = shapes.SHAPE_PLURALS[shapes.SHAPES.index(shape)]
        assert any(count_word in c.split() and f"{color} {noun}" in c for c in ex["captions"]), ex[
          "captions"
        ]
  assert seen > 0


def test_relations_and_positions_agree_with_mask_centroids():
  checked = 0
  for ex in _sample("train", 200, 64):
    objects = _objects(ex)
    if len({(c, s) for c, s, _ in objects}) != len(objects):
      continue  # Which of two identical objects a phrase refers to is ambiguous.
    where = {(c, s): _centroid(ex["mask"], k) for k, (c, s, _) in enumerate(objects, start=1)}
    for caption in ex["captions"]:
      words = caption.split()
      mentions = _mentions(words)
      for i, word in enumerate(words):
        if word not in ("left", "right", "above", "below") or len(objects) == 1:
          continue
        subject = [m for m in mentions if m[0] < i][-1]
        other = [m for m in mentions if m[0] > i][0]
        (sx, sy), (ox, oy) = where[subject[1:]], where[other[1:]]
        expected = {"left": sx < ox, "right": sx > ox, "above": sy < oy, "below": sy > oy}
        assert expected[word], (caption, where)
        checked += 1
      if len(objects) == 1 and ("top" in words or "bottom" in words):
        _, cy = where[mentions[0][1:]]
        assert (cy < 64 / 3 + 1) if "top" in words else (cy > 128 / 3 - 1), caption
  assert checked > 50


def test_vocabulary_covers_captions_and_templates():
  vocab = shapes.vocabulary()
  assert vocab == sorted(set(vocab))
  words = set(vocab)
  for ex in _sample("train") + _sample("val"):
    for caption in ex["captions"]:
      assert set(caption.split()) <= words, caption
  for task in shapes.ZEROSHOT_TASKS.values():
    for name, template in itertools.product(task.class_names, task.templates):
      assert set(template.format(name).split()) <= words


def test_zeroshot_tasks_label_single_object_images():
  assert {"shape", "color"} <= set(shapes.ZEROSHOT_TASKS)
  shape_task, color_task = shapes.ZEROSHOT_TASKS["shape"], shapes.ZEROSHOT_TASKS["color"]
  assert shape_task.class_names == shapes.SHAPES and color_task.class_names == shapes.COLORS
  for task in shapes.ZEROSHOT_TASKS.values():
    assert len(task.templates) >= 3 and all(t.count("{}") == 1 for t in task.templates)
  singles = 0
  for ex in _sample("test"):
    if ex["num_objects"] == 1:
      singles += 1
      color, shape, _ = _objects(ex)[0]
      assert shape_task.class_names[shape_task.label(ex)] == shape
      assert color_task.class_names[color_task.label(ex)] == color
    else:
      assert shape_task.label(ex) == color_task.label(ex) == -1
  assert singles > 10
