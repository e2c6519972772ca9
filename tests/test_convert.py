"""The dataset converter: TFDS ArrayRecord output read back by `files`, resumption, bad data."""

import dataclasses
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from vlalign.data import convert, files, images
from vlalign.errors import ConfigError

NUM = 9
MISSING, TRUNCATED, NO_CAPTION = 2, 4, 5


def _picture(i: int) -> np.ndarray:
  """uint8 `[H, W, 3]`: a gradient plus noise, a different size for each i."""
  h, w = 40 + 4 * i, 56
  y, x = np.mgrid[:h, :w]
  noise = np.random.default_rng(i).integers(0, 40, (h, w, 3))
  base = np.stack([x * 4, y * 3, (x + y + 20 * i) % 256], -1)
  return np.clip(base + noise, 0, 255).astype(np.uint8)


@pytest.fixture
def albef(tmp_path):
  """An ALBEF-style dataset: NUM entries, one missing file, one truncated JPEG, one empty
  caption; entries 2k and 2k+1 share an image id."""
  root = tmp_path / "images"
  root.mkdir()
  entries = []
  for i in range(NUM):
    Image.fromarray(_picture(i)).save(root / f"{i}.jpg", quality=90)
    entries.append({"image": f"{i}.jpg", "caption": f"a picture {i}", "image_id": f"img{i // 2}"})
  entries[MISSING]["image"] = "missing.jpg"
  data = (root / f"{TRUNCATED}.jpg").read_bytes()
  (root / f"{TRUNCATED}.jpg").write_bytes(data[: len(data) // 2])
  entries[NO_CAPTION]["caption"] = " "
  ann = tmp_path / "ann.json"
  ann.write_text(json.dumps(entries))
  return {"format": "albef_json", "ann": str(ann), "image_root": str(root)}


def _tree(directory) -> dict[str, bytes]:
  """`{relative path: bytes}` of every file under `directory`."""
  out = {}
  for dirpath, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = f.read()
  return out


def _kept() -> list[int]:
  return [i for i in range(NUM) if i not in (MISSING, TRUNCATED, NO_CAPTION)]


def test_converts_and_reads_back(albef, tmp_path):
  out = tmp_path / "out"
  result = convert.convert(albef, str(out), "tiny", convert.Options(examples_per_shard=4))
  assert result.complete and (result.examples, result.skipped) == (6, 3)
  assert (result.num_shards, result.shards_done) == (3, 3)
  assert result.first_skips[0].startswith(f"example {MISSING}: ")
  assert "missing.jpg" in result.first_skips[0]
  builder_dir = out / "tiny" / "1.0.0"
  assert result.builder_dir == str(builder_dir)

  source = files.make_source(albef, files.ImageOptions(size=32))
  back = files.make_source(
    dict(format="tfds", builder_dir=str(builder_dir)), files.ImageOptions(size=32)
  )
  kept = _kept()
  assert len(back) == len(kept)
  root = albef["image_root"]
  for j, i in enumerate(kept):
    assert back.captions_of(j) == (f"a picture {i}",)
    assert back.encoded_image(j) == (tmp_path / "images" / f"{i}.jpg").read_bytes()
    np.testing.assert_array_equal(back[j]["image"], images.read_image(f"{root}/{i}.jpg", 32))
  # Ids are the source's, read back densely renumbered: 0 and 1 share one, as in the source.
  np.testing.assert_array_equal(source.image_ids[kept], [0, 0, 1, 3, 3, 4])
  np.testing.assert_array_equal(back.image_ids, [0, 0, 1, 2, 2, 3])

  import tensorflow_datasets as tfds

  raw = tfds.data_source("tiny", data_dir=str(out), split="train")  # by name, no registered code
  assert [int(raw[j]["image_id"]) for j in range(len(raw))] == [0, 0, 1, 3, 3, 4]
  assert isinstance(raw[0]["image"], bytes)

  state = json.loads((builder_dir / "convert" / "train.json").read_text())
  assert state["result"]["skipped"] == 3
  assert state["result"]["skipped_no_caption"] == 1
  assert state["result"]["skipped_unreadable_image"] == 2
  assert state["result"]["shard_lengths"] == [3, 2, 1]
  assert state["arguments"]["source"]["ann"] == albef["ann"]


def test_resumes_after_an_interruption_with_identical_output(albef, tmp_path, monkeypatch):
  options = convert.Options(examples_per_shard=3)
  whole = convert.convert(albef, str(tmp_path / "a"), "tiny", options, num_workers=2)

  part = convert.convert(albef, str(tmp_path / "b"), "tiny", options, stop_after_shards=1)
  assert not part.complete and part.shards_done == 1 and part.examples == 2
  layout = convert.Layout(part.builder_dir, "tiny", "train", 3)
  assert not os.path.exists(os.path.join(part.builder_dir, "dataset_info.json"))
  # A kill inside shard 1, and one between shard 2's rename and its record (never both in one
  # run; each alone leaves this kind of file).
  with open(layout.shard(1) + ".incomplete", "wb") as f:
    f.write(b"half a shard")
  with open(layout.shard(2), "wb") as f:
    f.write(b"a shard without its record")

  written = []
  write_shard = convert.write_shard
  monkeypatch.setattr(
    convert, "write_shard", lambda lay, i, *a: written.append(i) or write_shard(lay, i, *a)
  )
  resumed = convert.convert(albef, str(tmp_path / "b"), "tiny", options)
  assert written == [1, 2]
  assert resumed == dataclasses.replace(whole, builder_dir=resumed.builder_dir)
  assert _tree(tmp_path / "a") == _tree(tmp_path / "b")

  written.clear()
  again = convert.convert(albef, str(tmp_path / "b"), "tiny", options)  # done: nothing to write
  assert written == [] and again == resumed
  assert _tree(tmp_path / "a") == _tree(tmp_path / "b")


def test_max_shorter_side_writes_smaller_jpegs(albef, tmp_path):
  options = convert.Options(max_shorter_side=24, jpeg_quality=80)
  result = convert.convert(albef, str(tmp_path / "out"), "small", options)
  back = files.make_source(
    dict(format="tfds", builder_dir=result.builder_dir), files.ImageOptions(size=16)
  )
  for j, i in enumerate(_kept()):
    original = (tmp_path / "images" / f"{i}.jpg").read_bytes()
    stored = back.encoded_image(j)
    assert stored == images.downscale_jpeg(original, 24, 80)
    assert len(stored) < len(original)
    with Image.open(io.BytesIO(stored)) as image:
      assert image.format == "JPEG" and min(image.size) == 24


def test_other_arguments_into_the_same_split_fail(albef, tmp_path):
  out = str(tmp_path / "out")
  convert.convert(albef, out, "tiny", convert.Options(examples_per_shard=4), stop_after_shards=1)
  with pytest.raises(ConfigError, match=r"other arguments \(.*max_shorter_side: 0 -> 32\)"):
    convert.convert(albef, out, "tiny", convert.Options(examples_per_shard=4, max_shorter_side=32))
  with pytest.raises(ConfigError, match=r"source.max_examples: None -> 5"):
    convert.convert(
      {**albef, "max_examples": 5}, out, "tiny", convert.Options(examples_per_shard=4)
    )
  # Another split of the same dataset is fine, and both end up in dataset_info.json.
  convert.convert(albef, out, "tiny", convert.Options(examples_per_shard=4))
  test = convert.convert(albef, out, "tiny", convert.Options(split="test", examples_per_shard=5))
  import tensorflow_datasets as tfds

  builder = tfds.builder_from_directory(test.builder_dir)
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 6, "test": 6}


def test_webdataset_source(tmp_path):
  shard = tmp_path / "00000.tar"
  with tarfile.open(shard, "w") as tar:
    for key, caption in (("a", "first"), ("b", "second")):
      for ext, data in ((".jpg", images.encode_jpeg(_picture(len(caption)))), (".txt", caption)):
        data = data.encode() if isinstance(data, str) else data
        info = tarfile.TarInfo(key + ext)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  spec = {"format": "webdataset", "shards": str(shard)}
  result = convert.convert(spec, str(tmp_path / "out"), "web", num_workers=2)
  back = files.make_source(
    dict(format="tfds", name="web", data_dir=str(tmp_path / "out")), files.ImageOptions(size=8)
  )
  assert result.examples == 2
  assert [back.captions_of(i) for i in range(2)] == [("first",), ("second",)]


def test_spec_from_flags():
  none = dict.fromkeys(convert._SHORTHAND)
  spec = convert.spec_from_flags(None, {**none, "format": "albef_json", "ann": "a.json,b.json",
                                        "image_root": "/x"})  # fmt: skip
  assert spec == {"format": "albef_json", "ann": ["a.json", "b.json"], "image_root": "/x"}
  spec = convert.spec_from_flags(
    None, {**none, "format": "karpathy", "ann": "k.json", "image_root": "/x", "split_name": "test"}
  )
  assert spec["split"] == "test" and spec["ann"] == "k.json"
  assert convert.spec_from_flags('{"format": "tfds", "builder_dir": "d"}', none)["format"] == "tfds"
  for source, shorthand, message in (
    ('{"format": "tfds"}', {"format": "tfds"}, "not both"),
    ("{bad", {}, "not valid JSON"),
    (None, {}, "give the source"),
    (None, {"format": "karpathy", "ann": "k.json", "image_root": "/x"}, "needs --split_name"),
    (None, {"format": "albef_json", "shards": "a.tar"}, "--shards does not apply"),
    (None, {"format": "parquet"}, "unknown --format"),
  ):
    with pytest.raises(ConfigError, match=message):
      convert.spec_from_flags(source, {**none, **shorthand})


def test_names_and_options_are_checked():
  with pytest.raises(ConfigError, match="not a valid dataset name"):
    convert.check_name("My-Data")
  with pytest.raises(ConfigError, match="registered in TFDS"):
    convert.check_name("coco_captions")
  convert.check_name("coco_captions_vl")
  with pytest.raises(ConfigError, match="--split"):
    convert.check_options(convert.Options(split="train[:10]"))
  with pytest.raises(ConfigError, match="--jpeg_quality"):
    convert.check_options(convert.Options(jpeg_quality=0))


def test_pure_helpers():
  assert [(r.start, r.stop) for r in convert.shard_ranges(7, 3)] == [(0, 3), (3, 6), (6, 7)]
  assert list(convert.ordered_map(lambda i: i * i, range(50), workers=3)) == [
    i * i for i in range(50)
  ]
  line = convert.progress_line("d[train]", 250, 1000, 3, 50.0)
  assert line == "d[train]: 250/1,000 examples (25.0%), skipped 3, 50.0 examples/s, ETA 0m15s"
  assert convert.format_duration(3725) == "1h02m05s"
  assert convert.differences({"a": 1, "s": {"x": 1}}, {"a": 1, "s": {"x": 2}}) == ["s.x: 1 -> 2"]


_ENCODE_ONE = """
import hashlib, types
import numpy as np
from vlalign.data import convert, images
source = types.SimpleNamespace(
  captions_of=lambda i: ("a", "b"),
  encoded_image=lambda i: images.encode_jpeg(np.zeros((8, 8, 3), np.uint8)),
  image_ids=np.array([7]),
)
print(hashlib.sha256(convert.Encoder(source, convert.Options())(0).record).hexdigest())
"""


def test_records_do_not_depend_on_the_process():
  """String hashes (the order of a dict's keys) differ between processes; records must not."""
  digests = {
    subprocess.run(
      [sys.executable, "-c", _ENCODE_ONE],
      capture_output=True,
      text=True,
      env={**os.environ, "PYTHONHASHSEED": str(seed)},
      timeout=120,
      check=True,
    ).stdout.strip()
    for seed in range(1, 5)
  }
  assert len(digests) == 1 and len(digests.pop()) == 64


def test_binary(albef, tmp_path):
  args = [
    *(sys.executable, "-m", "vlalign.data.convert", f"--out_dir={tmp_path / 'out'}", "--name=tiny"),
    *("--format=albef_json", f"--ann={albef['ann']}", f"--image_root={albef['image_root']}"),
    *("--examples_per_shard=4", "--log_every_s=0"),
  ]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONHASHSEED": "0"}
  done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
  assert done.returncode == 0, done.stderr
  assert "wrote 6 of 9 examples" in done.stdout and "skipped 3" in done.stdout
  assert "examples/s, ETA" in done.stderr and "shard 3/3 written" in done.stderr
  # Another process (another string-hash seed, other threads) writes the same bytes, as a
  # resumed conversion must.
  convert.convert(albef, str(tmp_path / "here"), "tiny", convert.Options(examples_per_shard=4))
  assert _tree(tmp_path / "out") == _tree(tmp_path / "here")

  other = subprocess.run(args + ["--max_shorter_side=32"], capture_output=True, text=True,
                         env=env, timeout=120)  # fmt: skip
  assert other.returncode == 2
  last = other.stderr.strip().splitlines()[-1]
  assert (
    last.startswith("error: ") and "other arguments" in last and "Traceback" not in other.stderr
  )
