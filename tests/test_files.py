"""Datasets on disk (vlalign/data/files.py) through the Grain pipeline: every reader, bad data,
mixtures, exact resumption and streamed evaluation data."""

import copy
import io
import json
import logging
import os
import pathlib
import subprocess
import sys
import tarfile

import grain
import numpy as np
import pytest
from PIL import Image

from vlalign import testing
from vlalign.data import augment, files, images, pipeline, shapes, shapes_to_files, transforms
from vlalign.data.tokenizer import build_tokenizer
from vlalign.errors import ConfigError, PathError

SIZE = 32
SIZES = {"train": 24, "val": 12}
OPTIONS = files.ImageOptions(size=SIZE)
TOKENIZER = build_tokenizer(dict(tokenizer="shapes_words"))
BICUBIC = Image.Resampling.BICUBIC


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  """The embedded data written in each format: `{format: (out_dir, {split: spec})}`."""
  out = {}
  for fmt in shapes_to_files.FORMATS:
    root = str(tmp_path_factory.mktemp(fmt))
    out[fmt] = (root, shapes_to_files.write(root, fmt, SIZES, image_size=SIZE, shard_size=5))
  return out


def _rendered(split):
  return shapes.ShapesSource(split, num_examples=SIZES[split], image_size=SIZE, seed=0)


@pytest.mark.parametrize("fmt", shapes_to_files.FORMATS)
def test_each_format_reads_back_the_embedded_examples(written, fmt):
  """Same images (the written JPEGs), captions and image order as the in-memory source."""
  source = files.make_source(written[fmt][1]["val"], OPTIONS)
  rendered = _rendered("val")
  assert len(source) == len(rendered)
  for i in range(len(source)):
    example = source[i]
    assert example["valid"] == 1 and example["image"].shape == (SIZE, SIZE, 3)
    jpeg = images.encode_jpeg(rendered[i]["image"], 95)  # what shapes_to_files wrote
    np.testing.assert_array_equal(example["image"], images.decode_image(jpeg, SIZE))
    want = rendered[i]["captions"][:1] if fmt == "webdataset" else rendered[i]["captions"]
    assert example["captions"] == tuple(want) == source.captions_of(i)


def test_albef_train_entries_are_one_caption_each_and_share_the_image_id(written):
  source = files.make_source(written["albef_json"][1]["train"], OPTIONS)
  assert len(source) == 5 * SIZES["train"]  # the embedded data has 5 captions per image
  assert all(len(source.captions_of(i)) == 1 for i in range(len(source)))
  assert source.image_ids.tolist() == np.repeat(np.arange(SIZES["train"]), 5).tolist()


def _damaged_albef(root, tmp_path):
  """A copy of the ALBEF train annotations naming one missing image, one truncated JPEG, one
  undecodable file and one empty caption (entries 0, 5, 10 and 15)."""
  entries = json.loads(pathlib.Path(root, "train.json").read_text())
  entries[0]["image"] = "images/train/missing.jpg"
  for k, name in ((5, "truncated.jpg"), (10, "garbage.jpg")):
    original = pathlib.Path(root, entries[k]["image"]).read_bytes()
    data = original[: len(original) // 2] if k == 5 else b"not an image at all"
    bad = tmp_path / name
    bad.write_bytes(data)
    entries[k]["image"] = str(bad)  # os.path.join keeps an absolute path as it is
  entries[15]["caption"] = "   "
  ann = tmp_path / "train_damaged.json"
  ann.write_text(json.dumps(entries))
  return dict(format="albef_json", ann=str(ann), image_root=root), {0, 5, 10, 15}


def test_unreadable_images_and_empty_captions_are_flagged_with_the_reason(written, tmp_path):
  spec, bad = _damaged_albef(written["albef_json"][0], tmp_path)
  source = files.make_source(spec, OPTIONS)
  flagged = {i for i in range(len(source)) if source[i]["valid"] == 0}
  assert flagged == bad
  assert "missing.jpg" in source[0]["error"] and "caption" in source[15]["error"]
  assert source[0]["image"].shape == (SIZE, SIZE, 3)  # a placeholder the maps can carry


def _data_config(train_spec, **fields):
  return dict(
    name="files", image_size=SIZE, max_len=24, tokenizer="shapes_words", train=train_spec, **fields
  )


def _batches(data_config, count, state=None, batch=8):
  dataset = pipeline.make_train_dataset(
    data_config, TOKENIZER, global_batch_size=batch, seed=3, process_index=0, process_count=1
  )
  iterator = iter(dataset)
  if state is not None:
    iterator.set_state(state)
  return [next(iterator) for _ in range(count)], iterator.get_state()


def test_bad_examples_are_skipped_counted_and_resumption_stays_exact(written, tmp_path):
  spec, bad = _damaged_albef(written["albef_json"][0], tmp_path)
  config = _data_config(spec)
  # 120 entries, 4 bad: 3 epochs of 116 good examples = 43.5 batches of 8.
  batches, _ = _batches(config, 44)
  for b in batches:
    assert b["image"].shape == (8, SIZE, SIZE, 3) and b["text_ids"].shape == (8, 24)
  counts = [int(b[pipeline.SKIPPED_KEY].max()) for b in batches]
  assert counts == sorted(counts) and 3 * len(bad) <= counts[-1] <= 4 * len(bad)
  assert counts[14] >= len(bad)  # 15 batches span one full epoch
  first, state = _batches(config, 20)
  resumed, _ = _batches(config, 24, state=state)
  for want, got in zip(batches[20:], resumed):
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])


def test_a_mixture_draws_in_proportion_to_its_weights():
  a = [{"image": np.zeros((SIZE, SIZE, 3), np.uint8), "captions": ("a",), "image_id": 0}] * 50
  b = [{"image": np.zeros((SIZE, SIZE, 3), np.uint8), "captions": ("b",), "image_id": 1}] * 400
  stream = pipeline._train_examples(pipeline.Mixture([a, b], [3, 1]), 0, 0, 1, 8)
  drawn = [stream[i]["captions"][0] for i in range(4000)]
  assert abs(drawn.count("a") / len(drawn) - 0.75) < 0.02
  # Default weights are the sizes: plain concatenation.
  stream = pipeline._train_examples(pipeline.Mixture([a, b]), 0, 0, 1, 8)
  drawn = [stream[i]["captions"][0] for i in range(4500)]
  assert abs(drawn.count("a") / len(drawn) - 50 / 450) < 0.02
  # The stream is deterministic and random access (what makes it checkpointable).
  again = pipeline._train_examples(pipeline.Mixture([a, b]), 0, 0, 1, 8)
  assert [again[i]["captions"][0] for i in range(4500)] == drawn


def test_a_mixture_of_two_formats_trains_from_a_config(written):
  mixture = dict(
    mixture=[written["albef_json"][1]["train"], written["webdataset"][1]["train"]],
    weights=[1.0, 1.0],
  )
  batches, _ = _batches(_data_config(mixture), 3)
  assert all(b["image"].shape == (8, SIZE, SIZE, 3) for b in batches)
  with pytest.raises(ConfigError, match="only the train split"):
    pipeline.make_source(_data_config(None, val=mixture), "val")


def test_streamed_eval_data_decodes_batch_by_batch_and_allows_any_caption_count(written):
  root, specs = written["karpathy"]
  ann = json.loads(pathlib.Path(specs["val"]["ann"]).read_text())
  for k, image in enumerate(im for im in ann["images"] if im["split"] == "val"):
    image["sentences"] = image["sentences"][: 1 + k % 5]  # 1 to 5 captions per image
  path = os.path.join(root, "varying.json")
  pathlib.Path(path).write_text(json.dumps(ann))
  config = _data_config(None, val=dict(specs["val"], ann=path))
  data = pipeline.make_eval_data(config, TOKENIZER, "val")
  counts = [1 + k % 5 for k in range(SIZES["val"])]
  assert isinstance(data["images"], pipeline.ImageRows) and len(data["images"]) == SIZES["val"]
  assert data["txt2img"].tolist() == np.repeat(np.arange(SIZES["val"]), counts).tolist()
  assert data["img2txt"].shape == (SIZES["val"], 5)
  assert [int((row >= 0).sum()) for row in data["img2txt"]] == counts
  rows = data["images"][np.array([3, 7])]
  assert rows.shape == (2, SIZE, SIZE, 3) and rows.dtype == np.float32
  shapes_rows = pipeline.make_eval_data(
    dict(name="shapes", image_size=SIZE, max_len=24, tokenizer="shapes_words", val_size=12),
    TOKENIZER,
    "val",
  )["images"][[3, 7]]
  assert np.abs(rows - shapes_rows).mean() < 0.15  # the same images, through JPEG


def test_missing_paths_are_named(written, tmp_path):
  spec = dict(written["albef_json"][1]["val"])
  with pytest.raises(PathError, match="nowhere.json"):
    files.make_source(dict(spec, ann=str(tmp_path / "nowhere.json")), OPTIONS)
  with pytest.raises(PathError, match="is not a directory"):
    files.make_source(dict(spec, image_root=str(tmp_path / "nope")), OPTIONS)
  with pytest.raises(PathError, match="is image_root right"):
    files.make_source(dict(spec, image_root=str(tmp_path)), OPTIONS)
  with pytest.raises(PathError, match="shard"):
    files.make_source(dict(format="webdataset", shards=[str(tmp_path / "a.tar")]), OPTIONS)
  with pytest.raises(ConfigError, match="data.val is not set"):
    pipeline.make_source(_data_config(None), "val")
  with pytest.raises(ConfigError, match="unknown data format"):
    files.make_source(dict(format="csv"), OPTIONS)


def test_webdataset_brace_patterns_expand_like_img2dataset_names():
  assert files.expand_shards("d/{00008..00010}.tar") == [
    "d/00008.tar",
    "d/00009.tar",
    "d/00010.tar",
  ]
  assert files.expand_shards(["a.tar", "b/{1..2}.tar"]) == ["a.tar", "b/1.tar", "b/2.tar"]


def test_grain_reads_a_file_source_directly(written):
  source = files.make_source(written["webdataset"][1]["val"], OPTIONS)
  ds = grain.MapDataset.source(source).map(lambda ex: ex["image_id"])
  assert list(ds) == list(range(SIZES["val"]))


def _binary(*args):
  env = testing.subprocess_env()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.run(
    [sys.executable, "-m", *args], cwd=root, env=env, capture_output=True, text=True, timeout=600
  )


def test_train_and_evaluate_from_files_through_the_binaries(tmp_path):
  """The README's "Train on your data" path: files on disk -> a run -> its evaluation, with two
  train images missing (skipped, counted in the metrics) and the unset path named."""
  data, workdir = tmp_path / "data", tmp_path / "run"
  result = _binary(
    "vlalign.data.shapes_to_files", f"--out_dir={data}", "--train_size=64", "--val_size=16",
    "--test_size=16", "--image_size=32",
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(result.stdout)["train"]["format"] == "albef_json"
  for name in ("000003.jpg", "000007.jpg"):
    os.remove(data / "images" / "train" / name)
  config = ("--config=configs/clip.py:tiny_files", f"--config.data.paths.root={data}")
  flags = ("--config.total_steps=40", "--config.log_every=20", "--config.checkpoint_every=40")
  result = _binary("vlalign.train", *config, f"--workdir={workdir}", *flags)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  skipped = [row["data/skipped"] for row in rows if "data/skipped" in row]
  # 40 steps x 16 = 640 examples of the 320 train entries (5 captions per image): 2 epochs, and
  # each epoch meets the 2 x 5 entries of the missing images.
  assert skipped[-1] >= 10 and skipped == sorted(skipped), skipped
  assert any(k.startswith("eval/retrieval_test/") for row in rows for k in row)
  result = _binary("vlalign.evaluate", *config, f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  result = _binary("vlalign.train", "--config=configs/clip.py:tiny_files", f"--workdir={workdir}2")
  assert result.returncode == 2 and "data.paths.root is not set" in result.stderr
  assert "Traceback" not in result.stderr


def test_the_skip_count_and_position_survive_an_orbax_checkpoint(written, tmp_path):
  """What the trainer saves: the iterator (with its dropped-example count) through Orbax."""
  import jax  # noqa: PLC0415

  from vlalign import checkpoint  # noqa: PLC0415

  spec, _ = _damaged_albef(written["albef_json"][0], tmp_path)
  config = _data_config(spec)
  want, _ = _batches(config, 30)
  make = lambda: iter(  # noqa: E731
    pipeline.make_train_dataset(
      config, TOKENIZER, global_batch_size=8, seed=3, process_index=0, process_count=1
    )
  )
  iterator = make()
  for _ in range(20):
    next(iterator)
  state = {"x": jax.numpy.zeros(())}
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), async_save=False)
  ckpt.save(20, state, iterator)
  ckpt.wait()
  resumed = make()
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
  )
  ckpt.restore(20, abstract, resumed)
  ckpt.close()
  for batch in want[20:]:
    got = next(resumed)
    for key in batch:
      np.testing.assert_array_equal(batch[key], got[key])
  assert int(want[29][pipeline.SKIPPED_KEY].max()) >= 4  # a full epoch of drops is in the stream


# ------------------------------------------------------------------ train crops of the original


def _photo(tmp_path, width=300, height=200):
  """An ALBEF spec of one `width` x `height` JPEG with detail at several scales, and its bytes."""
  rng = np.random.default_rng(0)
  coarse = rng.integers(0, 256, size=(height // 8, width // 8, 3), dtype=np.uint8)
  pixels = np.asarray(Image.fromarray(coarse).resize((width, height), BICUBIC))
  jpeg = images.encode_jpeg(pixels, 90)
  (tmp_path / "photo.jpg").write_bytes(jpeg)
  ann = tmp_path / "photo.json"
  ann.write_text(json.dumps([{"image": "photo.jpg", "caption": "a red circle"}]))
  return dict(format="albef_json", ann=str(ann), image_root=str(tmp_path)), jpeg


def _record_augment(monkeypatch):
  """Makes the pipeline's recipes record each call: `[(input image, rng before the call,
  source kwargs)]`."""
  calls, build = [], augment.build_augment

  def recording(aug_config):
    fn = build(aug_config)

    def wrapped(image, rng, **source):
      calls.append((image.copy(), copy.deepcopy(rng), source))
      return fn(image, rng, **source)

    return wrapped

  monkeypatch.setattr(pipeline.augment, "build_augment", recording)
  return calls


def _first_batch(config):
  dataset = pipeline.make_train_dataset(
    config, TOKENIZER, global_batch_size=1, seed=3, process_index=0, process_count=1
  )
  return next(iter(dataset))


def test_train_crops_are_cut_from_the_full_resolution_image(tmp_path, monkeypatch):
  """ALBEF/TCL crop the photo as stored, not one squashed to image_size first."""
  spec, jpeg = _photo(tmp_path)
  calls = _record_augment(monkeypatch)
  config = _data_config(spec, augment=dict(name="tcl"), augment_views=2)
  batch = _first_batch(config)
  full = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))  # the references' loader
  assert full.shape == (200, 300, 3) and len(calls) == 2  # view 2 is drawn first, then view 1
  recipe = augment.build_augment(dict(name="tcl", image_size=SIZE))
  for (image, rng, source), key in zip(calls, ("image_aug", "image")):
    np.testing.assert_array_equal(image, full)
    assert source == {}
    want = recipe(full, copy.deepcopy(rng))
    np.testing.assert_allclose(batch[key][0], transforms.normalize_image(want), atol=1e-5)
    squashed = recipe(images.decode_image(jpeg, SIZE), copy.deepcopy(rng))
    assert np.abs(squashed.astype(int) - want.astype(int)).mean() > 5  # not the squashed image
  # "resized": the earlier path, the crop cut from the image squashed to image_size.
  calls.clear()
  _first_batch(_data_config(spec, augment=dict(name="tcl"), train_decode="resized"))
  np.testing.assert_array_equal(calls[0][0], images.decode_image(jpeg, SIZE))


def test_drafted_train_crops_match_full_resolution_crops(tmp_path, monkeypatch):
  """With train_decode_min_side the JPEG is decoded at 1/2 here; the box is drawn on 300x200."""
  spec, jpeg = _photo(tmp_path)
  calls = _record_augment(monkeypatch)
  batch = _first_batch(
    _data_config(spec, augment=dict(name="crop_flip"), train_decode_min_side=100)
  )
  ((image, rng, source),) = calls
  np.testing.assert_array_equal(image, images.decode_original(jpeg, 100).image)
  assert image.shape == (100, 150, 3)
  assert source == dict(source_size=(200, 300), source_scale=0.5)
  recipe = augment.build_augment(dict(name="crop_flip", image_size=SIZE))
  drafted = recipe(image, copy.deepcopy(rng), **source)
  np.testing.assert_allclose(batch["image"][0], transforms.normalize_image(drafted), atol=1e-5)
  full = recipe(images.decode_original(jpeg).image, copy.deepcopy(rng))
  assert np.abs(drafted.astype(int) - full.astype(int)).mean() < 3.0  # box drawn on 150x100: ~10
  with pytest.raises(ConfigError, match="train_decode_min_side=0"):
    _first_batch(_data_config(spec, augment=dict(name="crop_flip"), train_decode_min_side=0))
  with pytest.raises(ConfigError, match="train_decode='full'"):
    pipeline.check_train_split(_data_config(spec, train_decode="full"), 1, 1, 0)


def test_evaluation_images_are_unchanged_by_train_crops(tmp_path):
  spec, jpeg = _photo(tmp_path)
  config = _data_config(spec, val=spec, augment=dict(name="albef"))
  rows = pipeline.make_eval_data(config, TOKENIZER, "val")["images"][np.array([0])]
  want = images.decode_image(jpeg, SIZE, "squash")  # JPEG draft, then bicubic squash
  np.testing.assert_allclose(rows[0], transforms.normalize_image(want), atol=1e-5)
  full_squash = np.asarray(
    Image.open(io.BytesIO(jpeg)).convert("RGB").resize((SIZE, SIZE), BICUBIC)
  )
  assert np.abs(want.astype(int) - full_squash.astype(int)).mean() < 1.5  # ALBEF's Resize
  original = files.make_source(spec, files.ImageOptions(SIZE, original=True))
  assert original[0]["image"].shape == (200, 300, 3)
  np.testing.assert_array_equal(original.image(0), want)  # what evaluation reads


def test_unreadable_originals_are_black_placeholders_and_dropped(written, tmp_path):
  spec, bad = _damaged_albef(written["albef_json"][0], tmp_path)
  source = files.make_source(spec, files.ImageOptions(SIZE, original=True))
  for index in bad:
    example = source[index]
    assert example["valid"] == 0 and "source_size" not in example
    np.testing.assert_array_equal(example["image"], np.zeros((SIZE, SIZE, 3), np.uint8))
  config = _data_config(spec, augment=dict(name="albef"), augment_views=2)
  batches, _ = _batches(config, 15)  # one epoch of the 116 good examples
  assert all(b["image"].shape == b["image_aug"].shape == (8, SIZE, SIZE, 3) for b in batches)
  assert int(batches[-1][pipeline.SKIPPED_KEY].max()) >= len(bad)
  threaded, _ = _batches({**config, "num_threads": 2}, 3)  # same crops from read threads
  for want, got in zip(batches, threaded):
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])


# ------------------------------------------------------------------ webdataset shards per process


def _write_shards(root, counts):
  """Tar shards of `counts[i]` samples each; sample k of shard i has the caption "shard{i}
  sample{k}"."""
  jpeg = images.encode_jpeg(np.full((8, 8, 3), 100, np.uint8))
  paths = []
  for shard, count in enumerate(counts):
    path = root / f"{shard:05d}.tar"
    with tarfile.open(path, "w") as tar:
      for k in range(count):
        for ext, data in ((".jpg", jpeg), (".txt", f"shard{shard} sample{k}".encode())):
          info = tarfile.TarInfo(f"{shard:05d}{k:04d}{ext}")
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
    paths.append(str(path))
  return paths


def _shard_of(caption):
  return int(caption.split()[0][len("shard") :])


def test_webdataset_shards_are_divided_by_file_among_processes(tmp_path, monkeypatch):
  counts = [3, 4, 2, 5, 3, 1]
  spec = dict(format="webdataset", shards=str(tmp_path / "{00000..00005}.tar"))
  paths = _write_shards(tmp_path, counts)
  indexed, index_shard = [], files._index_shard
  monkeypatch.setattr(files, "_index_shard", lambda path: indexed.append(path) or index_shard(path))
  whole = files.make_source(spec, OPTIONS)  # one process: every shard, as before
  assert whole.process_split is None and indexed == paths and len(whole) == sum(counts)
  assert whole.image_ids.tolist() == list(range(sum(counts)))
  captions, ids = [], []
  for p in range(3):
    indexed.clear()
    part = files.make_source(spec, OPTIONS, process_index=p, process_count=3)
    assert indexed == paths[p::3] and part.process_split == (p, 3)
    assert len(part) == sum(counts[p::3])
    assert part.image_ids.tolist() == [p + 3 * k for k in range(len(part))]
    for k in range(len(part)):
      assert _shard_of(part.captions_of(k)[0]) % 3 == p
      assert part[k]["valid"] == 1
    captions += [part.captions_of(k) for k in range(len(part))]
    ids += part.image_ids.tolist()
  assert sorted(captions) == sorted(whole.captions_of(i) for i in range(len(whole)))
  assert len(set(ids)) == len(ids)  # unique over the processes
  # Fewer shards than processes, or max_examples: every process indexes everything, as before.
  for process_count, extra in ((8, {}), (2, dict(max_examples=5))):
    indexed.clear()
    part = files.make_source({**spec, **extra}, OPTIONS, 1, process_count)
    assert part.process_split is None and indexed[0] == paths[0]
  # A process never opens another's shard: a damaged shard 1 fails process 1 only.
  pathlib.Path(paths[1]).write_bytes(b"not a tar file" * 100)
  assert len(files.make_source(spec, OPTIONS, 0, 2)) == counts[0] + counts[2] + counts[4]
  with pytest.raises(PathError, match="00001.tar"):
    files.make_source(spec, OPTIONS, 1, 2)


def test_each_process_streams_only_its_own_shards(tmp_path, caplog):
  counts = [3, 4, 2, 5, 2, 2]  # 8, 6 and 4 records in processes 0, 1, 2 of 3
  _write_shards(tmp_path, counts)
  config = _data_config(dict(format="webdataset", shards=str(tmp_path / "*.tar")))
  for p in range(3):
    part = files.make_source(config["train"], OPTIONS, p, 3)
    pipeline.check_train_split(config, 6, 3, process_index=p)
    dataset = pipeline.make_train_dataset(
      config, TOKENIZER, global_batch_size=6, seed=3, process_index=p, process_count=3
    )
    iterator = iter(dataset)
    epoch = len(part) // 2  # local batch 2; process p's records only, each once per epoch
    seen = [i for _ in range(epoch) for i in next(iterator)["image_id"].tolist()]
    assert sorted(seen) == part.image_ids.tolist()
  # A mixture's default weights count a part divided by file P times: every record one rate.
  single = dict(format="webdataset", shards=str(tmp_path / "00000.tar"))  # 1 shard: by record
  mixed = _data_config(dict(mixture=[config["train"], single]))
  mixture = pipeline.make_source(mixed, "train", process_index=1, process_count=3)
  assert mixture.weights == [3 * 6, 3]
  with pytest.raises(ConfigError, match="this process's files"):
    pipeline.check_train_split(config, 3 * 32, 3, process_index=2)  # 4 records in process 2
  with caplog.at_level(logging.WARNING):
    files.make_source(config["train"], OPTIONS, 0, 4)  # 6 shards over 4 processes: 2 or 1 each
  assert "drawn more often" in caplog.text
