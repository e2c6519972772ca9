"""Tests of the Grain train pipeline, eval arrays and global batches on small splits."""

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vlalign import testing
from vlalign.data import augment, pipeline, shapes, transforms
from vlalign.data.tokenizer import build_tokenizer

SIZE, MAX_LEN = 32, 24


def _config(**overrides) -> ml_collections.ConfigDict:
  fields = dict(
    name="shapes",
    image_size=SIZE,
    max_len=MAX_LEN,
    tokenizer="shapes_words",
    train_size=64,
    val_size=12,
    test_size=40,
    seed=1,
    num_threads=0,
  )
  return ml_collections.ConfigDict({**fields, **overrides})


TOKENIZER = build_tokenizer(_config())


def _train(config=None, batch=8, seed=0, **kwargs):
  return pipeline.make_train_dataset(
    config or _config(), TOKENIZER, global_batch_size=batch, seed=seed, **kwargs
  )


def _take(iterator, n: int) -> list[dict]:
  return [next(iterator) for _ in range(n)]


def _reference_normalize(image: np.ndarray) -> np.ndarray:
  out = np.zeros(image.shape, np.float32)
  for c in range(3):
    out[..., c] = (image[..., c] / 255.0 - transforms.IMAGE_MEAN[c]) / transforms.IMAGE_STD[c]
  return out


def test_batches_have_the_contract_shapes_and_match_the_source():
  batch = next(iter(_train(batch=8)))
  assert batch.keys() == {"image", "text_ids", "text_mask", "image_id", pipeline.SKIPPED_KEY}
  assert batch[pipeline.SKIPPED_KEY].tolist() == [0] * 8  # the embedded data has no bad example
  assert batch["image"].shape == (8, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
  assert batch["text_ids"].shape == batch["text_mask"].shape == (8, MAX_LEN)
  assert batch["text_ids"].dtype == batch["text_mask"].dtype == np.int32
  assert batch["image_id"].shape == (8,) and batch["image_id"].dtype == np.int32
  source = shapes.ShapesSource("train", num_examples=64, image_size=SIZE, seed=1)
  for row, image_id in enumerate(batch["image_id"].tolist()):
    example = source[image_id]
    np.testing.assert_allclose(
      batch["image"][row], _reference_normalize(example["image"]), rtol=1e-5, atol=1e-5
    )
    assert TOKENIZER.decode(batch["text_ids"][row]) in example["captions"]
    ids, mask = TOKENIZER.encode(TOKENIZER.decode(batch["text_ids"][row]), MAX_LEN)
    np.testing.assert_array_equal(batch["text_mask"][row], mask)


def test_same_seed_same_batches_other_seed_other_order():
  first = _take(iter(_train(seed=3)), 3)
  again = _take(iter(_train(seed=3)), 3)
  other = _take(iter(_train(seed=4)), 3)
  for a, b in zip(first, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  ids = np.concatenate([b["image_id"] for b in first])
  assert not np.array_equal(ids, np.concatenate([b["image_id"] for b in other]))


def test_epochs_cover_the_split_in_new_orders():
  batches = _take(iter(_train(batch=8)), 16)  # 2 epochs of 64 examples.
  ids = np.concatenate([b["image_id"] for b in batches])
  first, second = ids[:64], ids[64:]
  assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(64))
  assert not np.array_equal(first, second)


def test_process_shards_are_disjoint_and_cover_the_split():
  config = _config(train_size=40)
  seen = []
  for index in range(4):
    batches = _take(iter(_train(config, batch=8, process_index=index, process_count=4)), 5)
    assert all(b["image"].shape[0] == 2 for b in batches)
    ids = np.concatenate([b["image_id"] for b in batches]).tolist()  # One epoch of 10.
    assert sorted(ids) == list(range(index, 40, 4))
    seen.extend(ids)
  assert sorted(seen) == list(range(40))


def test_iterator_state_restores_the_following_batches():
  iterator = iter(_train(seed=5))
  _take(iterator, 2)
  state = iterator.get_state()
  expected = _take(iterator, 3)
  fresh = iter(_train(seed=5))
  fresh.set_state(state)
  iterator.set_state(state)
  for got_fresh, got_same, want in zip(_take(fresh, 3), _take(iterator, 3), expected):
    for key in want:
      np.testing.assert_array_equal(got_fresh[key], want[key])
      np.testing.assert_array_equal(got_same[key], want[key])


def test_augment_hook_sees_uint8_images_and_a_generator():
  calls = []

  def flip(image, rng):
    calls.append((image.dtype, type(rng)))
    return image[:, ::-1]

  batch = next(iter(_train(augment_fn=flip)))
  assert calls and all(c == (np.dtype(np.uint8), np.random.Generator) for c in calls)
  source = shapes.ShapesSource("train", num_examples=64, image_size=SIZE, seed=1)
  for row, image_id in enumerate(batch["image_id"].tolist()):
    want = _reference_normalize(source[image_id]["image"][:, ::-1])
    np.testing.assert_allclose(batch["image"][row], want, rtol=1e-5, atol=1e-5)


def test_clear_errors():
  with pytest.raises(ValueError, match="'train'.*no examples"):
    _train(_config(train_size=0))
  with pytest.raises(ValueError, match="not divisible by the process count 4"):
    _train(batch=10, process_index=0, process_count=4)
  with pytest.raises(ValueError, match="larger than the 16 train examples"):
    _train(batch=80, process_index=1, process_count=4)
  with pytest.raises(ValueError, match="unknown dataset 'coco'"):
    _train(_config(name="coco"))
  with pytest.raises(ValueError, match="'nope'"):
    pipeline.make_zeroshot_data(_config(), "test", "nope")


def test_to_global_batch_on_eight_devices():
  mesh = testing.data_mesh()
  sharding = NamedSharding(mesh, P(("data", "fsdp")))
  local = next(iter(_train(batch=16)))
  global_batch = pipeline.to_global_batch(local, sharding)
  for key, value in local.items():
    assert isinstance(global_batch[key], jax.Array)
    assert global_batch[key].shape == value.shape and global_batch[key].sharding == sharding
    assert len(global_batch[key].addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(global_batch[key]), value)


def test_eval_data_index_maps_are_consistent():
  data = pipeline.make_eval_data(_config(), TOKENIZER, "val")
  n = 12
  assert data["images"].shape == (n, SIZE, SIZE, 3) and data["images"].dtype == np.float32
  assert data["text_ids"].shape == data["text_mask"].shape == (5 * n, MAX_LEN)
  assert data["txt2img"].dtype == data["img2txt"].dtype == np.int32
  assert data["img2txt"].shape == (n, 5)
  source = shapes.ShapesSource("val", num_examples=n, image_size=SIZE, seed=1)
  for i in range(n):
    example = source[i]
    np.testing.assert_allclose(data["images"][i], _reference_normalize(example["image"]), atol=1e-5)
    for k, j in enumerate(data["img2txt"][i].tolist()):
      assert data["txt2img"][j] == i
      assert TOKENIZER.decode(data["text_ids"][j]) == example["captions"][k]
  assert sorted(data["img2txt"].ravel().tolist()) == list(range(5 * n))


def _eval_texts(config) -> dict[str, int]:
  """The token length of every evaluation text of `config`: retrieval captions, zero-shot
  prompts (built as the trainer builds evaluators)."""
  from vlalign import evaluation  # noqa: PLC0415

  encode = lambda params, *arrays: np.zeros((len(arrays[0]), 4), np.float32)
  evaluators = evaluation.build_evaluators(
    dict(
      retrieval=dict(type="retrieval", split="test"),
      zeroshot=dict(type="zeroshot", split="test", task="color"),
    ),
    predict={"encode_image": encode, "encode_text": encode},
    tokenizer=TOKENIZER,
    data_config=config,
    default_batch_size=8,
  )
  return {
    "retrieval": evaluators["retrieval"].text_ids.shape[1],
    "zeroshot": evaluators["zeroshot"].max_len,
    "eval_data": pipeline.make_eval_data(config, TOKENIZER, "val")["text_ids"].shape[1],
  }


def test_eval_max_len_sets_every_evaluation_text_and_leaves_train_batches_alone():
  """ALBEF/TCL: pre-training captions of 25 tokens, retrieval evaluated on 30."""
  config = _config(max_len=25, eval_max_len=30)
  batch = next(iter(_train(config, batch=8)))
  assert batch["text_ids"].shape == batch["text_mask"].shape == (8, 25)
  assert pipeline.train_batch_spec(config, 8)["text_ids"].shape == (8, 25)
  assert pipeline.eval_text_len(config) == 30
  assert _eval_texts(config) == {"retrieval": 30, "zeroshot": 30, "eval_data": 30}


@pytest.mark.parametrize("eval_max_len", ["absent", None])
def test_without_eval_max_len_evaluation_uses_max_len(eval_max_len):
  config = _config() if eval_max_len == "absent" else _config(eval_max_len=None)
  assert pipeline.eval_text_len(config) == MAX_LEN
  assert _eval_texts(config) == {"retrieval": MAX_LEN, "zeroshot": MAX_LEN, "eval_data": MAX_LEN}


def test_text_lengths_are_checked_against_the_text_position_table():
  tower = dict(kind="text_transformer", max_len=24)
  pipeline.check_text_lengths(_config(max_len=16, eval_max_len=24), tower)
  pipeline.check_text_lengths(_config(max_len=16, eval_max_len=30), dict(kind="x"))  # no table
  with pytest.raises(ValueError, match=r"data.eval_max_len=30 exceeds model.text.max_len=24"):
    pipeline.check_text_lengths(_config(max_len=16, eval_max_len=30), tower)
  with pytest.raises(ValueError, match=r"data.max_len=25 exceeds model.text.max_len=24"):
    pipeline.check_text_lengths(_config(max_len=25), tower)
  for bad in (1, 30.0, True, "30"):
    with pytest.raises(ValueError, match=r"data.eval_max_len=.* must be an integer >= 2"):
      pipeline.eval_text_len(_config(eval_max_len=bad))


def test_zeroshot_data_keeps_single_object_images_with_their_labels():
  data = pipeline.make_zeroshot_data(_config(), "test", "color")
  source = shapes.ShapesSource("test", num_examples=40, image_size=SIZE, seed=1)
  want = [source[i] for i in range(40) if source[i]["num_objects"] == 1]
  assert len(want) > 0 and data["images"].shape == (len(want), SIZE, SIZE, 3)
  assert data["labels"].dtype == np.int32
  assert data["labels"].tolist() == [int(ex["object_color"][0]) for ex in want]
  for image, example in zip(data["images"], want):
    np.testing.assert_allclose(image, _reference_normalize(example["image"]), atol=1e-5)
  assert data["class_names"] == list(shapes.COLORS)
  assert data["templates"] == list(shapes.ZEROSHOT_TASKS["color"].templates)


def test_read_threads_give_the_same_batches():
  serial = _take(iter(_train(_config(num_threads=0), seed=2)), 3)
  threaded = _take(iter(_train(_config(num_threads=2), seed=2)), 3)
  for a, b in zip(serial, threaded):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


# ------------------------------------------------------------------ augmentation and two views


def _two_views(**overrides) -> ml_collections.ConfigDict:
  return _config(augment=dict(name="tcl"), augment_views=2, **overrides)


def _source_images(train_size: int = 64) -> np.ndarray:
  source = shapes.ShapesSource("train", num_examples=train_size, image_size=SIZE, seed=1)
  return np.stack([source[i]["image"] for i in range(train_size)])


def _assert_same_batches(first: list[dict], second: list[dict]) -> None:
  for a, b in zip(first, second, strict=True):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_train_batch_keys():
  assert pipeline.train_batch_keys(_config()) == transforms.TRAIN_KEYS
  assert pipeline.train_batch_keys(_config(augment=dict(name="tcl"))) == transforms.TRAIN_KEYS
  two = ("image", "image_aug", "text_ids", "text_mask", "image_id")
  assert pipeline.train_batch_keys(_two_views()) == two
  plain = {"image_size": SIZE, "augment": {"name": "albef"}, "augment_views": 2}
  assert pipeline.train_batch_keys(plain) == two
  assert transforms.TRAIN_KEYS == ("image", "text_ids", "text_mask", "image_id")


def test_two_views_have_the_contract_shapes_and_differ():
  batch = next(iter(_train(_two_views(), batch=8)))
  assert batch.keys() == {*pipeline.train_batch_keys(_two_views()), pipeline.SKIPPED_KEY}
  for key in ("image", "image_aug"):
    assert batch[key].shape == (8, SIZE, SIZE, 3) and batch[key].dtype == np.float32
    assert np.all(np.isfinite(batch[key]))
  for row in range(8):
    assert not np.array_equal(batch["image"][row], batch["image_aug"][row])
  # View 1 is the draw the one-view pipeline makes; the second view does not disturb it.
  one_view = next(iter(_train(_config(augment=dict(name="tcl")), batch=8)))
  for key in one_view:
    np.testing.assert_array_equal(batch[key], one_view[key])
  # Sharded over 2 processes, each process gets both views of half the batch.
  half = next(iter(_train(_two_views(), batch=8, process_index=1, process_count=2)))
  assert half["image"].shape == half["image_aug"].shape == (4, SIZE, SIZE, 3)
  assert all(i % 2 == 1 for i in half["image_id"].tolist())


def test_both_views_are_independent_draws_on_the_raw_source_image():
  raw = _source_images()
  raw_bytes = {image.tobytes() for image in raw}
  inputs_were_raw = []

  def roll(image, rng):  # A random horizontal roll by 1..SIZE-1 pixels.
    inputs_were_raw.append(image.tobytes() in raw_bytes)
    return np.roll(image, int(rng.integers(1, SIZE)), axis=1)

  config = _config(augment_views=2)
  batch = next(iter(_train(config, batch=8, augment_fn=roll)))
  assert len(inputs_were_raw) == 16 and all(inputs_were_raw)
  shifts = {}
  for key in ("image", "image_aug"):
    for row, image_id in enumerate(batch["image_id"].tolist()):
      matches = [
        s
        for s in range(1, SIZE)
        if np.allclose(
          batch[key][row], _reference_normalize(np.roll(raw[image_id], s, axis=1)), atol=1e-5
        )
      ]
      assert matches, (key, row)
      shifts.setdefault(key, []).append(matches[0])
  assert shifts["image"] != shifts["image_aug"]


def test_config_augment_is_applied_and_matches_the_built_function():
  plain = next(iter(_train(_config(), seed=1)))
  config = _config(augment=dict(name="crop_flip"))  # image_size inherited from data.image_size.
  augmented = next(iter(_train(config, seed=1)))
  np.testing.assert_array_equal(plain["image_id"], augmented["image_id"])
  np.testing.assert_array_equal(plain["text_ids"], augmented["text_ids"])
  assert augmented["image"].shape == plain["image"].shape
  assert any(not np.allclose(a, b) for a, b in zip(plain["image"], augmented["image"]))
  built = augment.build_augment({"name": "crop_flip", "image_size": SIZE})
  explicit = next(iter(_train(_config(), seed=1, augment_fn=built)))
  _assert_same_batches([augmented], [explicit])
  # An explicit function overrides data.augment.
  flipped = next(iter(_train(config, seed=1, augment_fn=lambda image, rng: image[:, ::-1])))
  raw = _source_images()
  for row, image_id in enumerate(flipped["image_id"].tolist()):
    want = _reference_normalize(raw[image_id][:, ::-1])
    np.testing.assert_allclose(flipped["image"][row], want, rtol=1e-5, atol=1e-5)


def test_two_views_are_deterministic_per_seed_and_new_each_epoch():
  first = _take(iter(_train(_two_views(), seed=3)), 2)
  _assert_same_batches(first, _take(iter(_train(_two_views(), seed=3)), 2))
  _assert_same_batches(first, _take(iter(_train(_two_views(num_threads=2), seed=3)), 2))
  other = _take(iter(_train(_two_views(), seed=4)), 2)
  assert not np.array_equal(first[0]["image_aug"], other[0]["image_aug"])
  # 16 examples, batch 8: batches 0-1 are epoch 1, 2-3 epoch 2; each view is redrawn.
  epochs = _take(iter(_train(_two_views(train_size=16), seed=3)), 4)
  views = [{}, {}]
  for index, batch in enumerate(epochs):
    for row, image_id in enumerate(batch["image_id"].tolist()):
      views[index // 2][image_id] = (batch["image"][row], batch["image_aug"][row])
  assert sorted(views[0]) == sorted(views[1]) == list(range(16))
  for image_id in range(16):
    for view in range(2):
      assert not np.array_equal(views[0][image_id][view], views[1][image_id][view])


def test_iterator_state_restores_the_following_two_view_batches():
  iterator = iter(_train(_two_views(), seed=5))
  _take(iterator, 2)
  state = iterator.get_state()
  expected = _take(iterator, 2)
  fresh = iter(_train(_two_views(), seed=5))
  fresh.set_state(state)
  _assert_same_batches(_take(fresh, 2), expected)
  assert all("image_aug" in batch for batch in expected)


def test_augment_config_errors():
  for views in (0, 3, True, "2"):
    with pytest.raises(ValueError, match="augment_views=.* must be 1 or 2"):
      pipeline.train_batch_keys(_config(augment=dict(name="tcl"), augment_views=views))
  with pytest.raises(ValueError, match="augment_views=2 needs an augmentation"):
    _train(_config(augment_views=2))
  with pytest.raises(ValueError, match="augment_views=2 needs an augmentation"):
    pipeline.train_batch_keys(_config(augment_views=2))
  for name in ("none", "resize"):
    with pytest.raises(ValueError, match=f"deterministic augmentation recipe '{name}'"):
      _train(_config(augment=dict(name=name), augment_views=2))
  with pytest.raises(ValueError, match="image_size=48 differs from data.image_size=32"):
    _train(_config(augment=dict(name="tcl", image_size=48)))
  with pytest.raises(ValueError, match="image_size=48 differs"):
    pipeline.train_batch_keys(_config(augment=dict(name="tcl", image_size=48)))
  with pytest.raises(ValueError, match="unknown augmentation recipe 'nope'"):
    _train(_config(augment=dict(name="nope")))
  with pytest.raises(ValueError, match=r"augment_fn must return uint8 \(32, 32, 3\)"):
    next(iter(_train(augment_fn=lambda image, rng: image[: SIZE // 2])))


# ------------------------------------------------------------------ crops of the original image


def test_embedded_data_ignores_train_decode():
  """The embedded images are rendered at image_size: train_decode changes nothing there."""
  want = _take(iter(_train(_config(augment=dict(name="albef")), seed=2)), 2)
  for mode in ("original", "resized"):
    config = _config(augment=dict(name="albef"), train_decode=mode, train_decode_min_side=8)
    _assert_same_batches(_take(iter(_train(config, seed=2)), 2), want)


def test_crop_original_checks_the_output_and_keeps_placeholders():
  rng = np.random.default_rng(0)
  stored = np.full((50, 70, 3), 7, np.uint8)
  calls = []

  def crop(image, rng, **source):
    calls.append(source)
    return np.ascontiguousarray(image[:SIZE, :SIZE])

  stage = pipeline.CropOriginal(crop, SIZE)
  assert stage.random_map({"image": stored}, rng)["image"].shape == (SIZE, SIZE, 3)
  drafted = {"image": stored, "source_size": (100, 140), "source_scale": 0.5}
  pipeline.CropOriginal(crop, SIZE, "image_aug").random_map(drafted, rng)
  assert calls == [{}, dict(source_size=(100, 140), source_scale=0.5)]
  placeholder = np.zeros((SIZE, SIZE, 3), np.uint8)
  out = stage.random_map({"image": placeholder, "valid": np.int32(0)}, rng)
  assert out["image"] is placeholder and len(calls) == 2  # a flagged example is not augmented
  with pytest.raises(ValueError, match=r"augment_fn must return uint8 \(32, 32, 3\)"):
    pipeline.CropOriginal(lambda image, rng: image, SIZE).random_map({"image": stored}, rng)
