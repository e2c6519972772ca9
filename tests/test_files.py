"""Datasets on disk (vlalign/data/files.py) through the Grain pipeline: every reader, bad data,
mixtures, exact resumption and streamed evaluation data."""

import json
import os
import pathlib
import subprocess
import sys

import grain
import numpy as np
import pytest

from vlalign.data import files, images, pipeline, shapes, shapes_to_files
from vlalign.data.tokenizer import build_tokenizer
from vlalign.errors import ConfigError, PathError

SIZE = 32
SIZES = {"train": 24, "val": 12}
OPTIONS = files.ImageOptions(size=SIZE)
TOKENIZER = build_tokenizer(dict(tokenizer="shapes_words"))


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
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
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
