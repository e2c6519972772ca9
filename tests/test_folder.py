import collections
import io
import os

import numpy as np
import pytest
from PIL import Image

from vlalign.data import folder, images
from vlalign.errors import ConfigError, PathError

COLOURS = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}


def _jpeg(colour, size=(40, 30)):
  buffer = io.BytesIO()
  Image.new("RGB", size, colour).save(buffer, format="JPEG", quality=95)
  return buffer.getvalue()


def _tree(root, per_class):
  """`root/<class>/<i>.jpg`, solid colour per class; `per_class` maps class dir -> image count."""
  for class_dir, count in per_class.items():
    (root / class_dir).mkdir(parents=True)
    colour = COLOURS.get(class_dir, (128, 128, 128))
    for i in range(count):
      (root / class_dir / f"{i:03d}.jpg").write_bytes(_jpeg(colour))
  return root


# ----------------------------------------------------------------------------- shipped lists


def test_shipped_imagenet_classnames_and_clip_templates():
  names = folder.load_lines("imagenet")
  templates = folder.load_lines("clip")
  assert len(names) == 1000 and len(templates) == 80
  assert names[:3] == ["tench", "goldfish", "great white shark"] and names[-1] == "toilet paper"
  assert names[134] == "crane bird" and names[517] == "construction crane"  # disambiguated
  # OpenAI's curated list repeats two names; kept as published (labels are indices).
  counts = collections.Counter(names)
  repeated = {n: [i for i, m in enumerate(names) if m == n] for n in counts if counts[n] > 1}
  assert repeated == {"missile": [657, 744], "sunglasses": [836, 837]}
  assert len(set(templates)) == 80 and all(t.count("{}") == 1 for t in templates)
  assert templates[0] == "a bad photo of a {}." and templates[-1] == "a tattoo of the {}."


def test_load_lines_reads_a_file_and_names_a_missing_one(tmp_path):
  path = tmp_path / "names.txt"
  path.write_text("  cat \n\ndog\r\n")
  assert folder.load_lines(path) == ["cat", "dog"]
  assert folder.load_lines(str(path)) == ["cat", "dog"]
  missing = tmp_path / "nope.txt"
  with pytest.raises(PathError, match="nope.txt"):
    folder.load_lines(str(missing))


# ----------------------------------------------------------------------------- image folders


def test_image_folder_lists_sorted_classes_and_files(tmp_path):
  root = _tree(tmp_path / "val", {"red": 2, "blue": 1, "green": 0, "sky_blue": 1})
  (root / "red" / "B.JPEG").write_bytes(_jpeg(COLOURS["red"]))  # ImageNet's extension
  (root / "red" / "notes.txt").write_text("not an image")
  (root / "red" / ".hidden.jpg").write_bytes(b"")
  (root / ".cache").mkdir()
  (root / "loose.jpg").write_bytes(_jpeg(COLOURS["red"]))  # not in a class directory
  source = folder.make_source(dict(format="image_folder", root=str(root)))
  # Empty class directories still count, so the labels match the full tree's.
  assert source.class_names == ("blue", "green", "red", "sky blue")
  assert len(source) == 5
  np.testing.assert_array_equal(source.labels(range(5)), [0, 2, 2, 2, 3])
  assert source.labels([4, 0]).dtype == np.int32
  # Sorted by file name: "000.jpg", "001.jpg", "B.JPEG".
  pixels = source.image(3, 16)
  assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8
  assert np.all(np.abs(pixels.astype(int) - COLOURS["red"]) <= 3)


def test_image_folder_classnames_file_and_count_mismatch(tmp_path):
  root = _tree(tmp_path / "val", {"n01": 1, "n02": 1})
  names = tmp_path / "names.txt"
  names.write_text("first class\nsecond class\n")
  spec = dict(format="image_folder", root=str(root), classnames=str(names))
  assert folder.make_source(spec).class_names == ("first class", "second class")
  spec["classnames"] = ["a", "b"]
  assert folder.make_source(spec).class_names == ("a", "b")
  spec["classnames"] = "imagenet"
  with pytest.raises(ConfigError, match="1000 names but image_folder .* has 2 classes"):
    folder.make_source(spec)


def test_image_folder_errors(tmp_path):
  with pytest.raises(PathError, match="missing_root"):
    folder.make_source(dict(format="image_folder", root=str(tmp_path / "missing_root")))
  (tmp_path / "empty" / "cls").mkdir(parents=True)
  with pytest.raises(ConfigError, match="hold no image"):
    folder.make_source(dict(format="image_folder", root=str(tmp_path / "empty")))
  (tmp_path / "flat").mkdir()
  with pytest.raises(ConfigError, match="no class sub-directories"):
    folder.make_source(dict(format="image_folder", root=str(tmp_path / "flat")))
  with pytest.raises(ConfigError, match="misses"):
    folder.make_source(dict(format="image_folder"))
  with pytest.raises(ConfigError, match=r"unknown fields \['split'\]"):
    folder.make_source(dict(format="image_folder", root=str(tmp_path), split="val"))
  with pytest.raises(ConfigError, match="unknown labelled-image format"):
    folder.make_source(dict(format="folders", root=str(tmp_path)))


def test_max_examples_keeps_an_evenly_spaced_subset(tmp_path):
  root = _tree(tmp_path / "val", {"blue": 4, "green": 4, "red": 4})
  source = folder.make_source(dict(format="image_folder", root=str(root), max_examples=3))
  assert len(source) == 3
  np.testing.assert_array_equal(source.labels(range(3)), [0, 1, 2])  # every class kept
  source = folder.make_source(dict(format="image_folder", root=str(root), max_examples=100))
  assert len(source) == 12
  with pytest.raises(ConfigError, match="max_examples"):
    folder.make_source(dict(format="image_folder", root=str(root), max_examples=0))


def test_unreadable_image_raises_unreadable_image_error(tmp_path):
  root = _tree(tmp_path / "val", {"red": 1})
  (root / "red" / "bad.jpg").write_bytes(_jpeg(COLOURS["red"])[:100])  # truncated
  source = folder.make_source(dict(format="image_folder", root=str(root)))
  source.image(0, 8)
  with pytest.raises(images.UnreadableImageError, match="bad.jpg"):
    source.image(1, 8)


# ----------------------------------------------------------------------------- TFDS


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
  """A prepared ArrayRecord builder: 6 solid-colour JPEGs, labels 0, 1, 2, 0, 1, 2."""
  tfds = pytest.importorskip("tensorflow_datasets")

  class VlalignTinyLabelled(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      features = tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
          "label": tfds.features.ClassLabel(names=["red_thing", "green", "blue"]),
        }
      )
      return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
      return {"validation": self._generate_examples()}

    def _generate_examples(self):
      colours = [COLOURS["red"], COLOURS["green"], COLOURS["blue"]]
      for i in range(6):
        yield i, {"image": _jpeg(colours[i % 3]), "label": i % 3}

  builder = VlalignTinyLabelled(
    data_dir=str(tmp_path_factory.mktemp("tfds")), file_format="array_record"
  )
  builder.download_and_prepare()
  return str(builder.data_dir)


def test_tfds_source_reads_labels_names_and_undecoded_images(tiny_tfds, tmp_path):
  source = folder.make_source(dict(format="tfds", builder_dir=tiny_tfds))
  assert source.class_names == ("red thing", "green", "blue") and len(source) == 6
  labels = source.labels(range(6))
  assert sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2]  # TFDS stores the examples shuffled
  rgb = [COLOURS["red"], COLOURS["green"], COLOURS["blue"]]
  for index, label in enumerate(labels):
    pixels = source.image(index, 8, "center_crop")
    assert pixels.shape == (8, 8, 3) and np.all(np.abs(pixels.astype(int) - rgb[label]) <= 3)
  subset = folder.make_source(dict(format="tfds", builder_dir=tiny_tfds, max_examples=2))
  np.testing.assert_array_equal(subset.labels([0, 1]), labels[[0, 3]])
  names = dict(format="tfds", builder_dir=tiny_tfds, classnames=["r", "g", "b"])
  assert folder.make_source(names).class_names == ("r", "g", "b")
  with pytest.raises(ConfigError, match="2 names but tfds .* has 3 classes"):
    folder.make_source({**names, "classnames": ["r", "g"]})
  with pytest.raises(ConfigError, match="no split 'train'"):
    folder.make_source(dict(format="tfds", builder_dir=tiny_tfds, split="train"))
  with pytest.raises(ConfigError, match="no feature 'jpeg'"):
    folder.make_source(dict(format="tfds", builder_dir=tiny_tfds, image_key="jpeg"))
  with pytest.raises(PathError, match="nowhere"):
    folder.make_source(dict(format="tfds", builder_dir=str(tmp_path / "nowhere")))
  name_dir = os.path.dirname(tiny_tfds)  # <data_dir>/<name>/<version>
  data_dir, name = os.path.dirname(name_dir), os.path.basename(name_dir)
  by_name = folder.make_source(dict(format="tfds", name=name, data_dir=data_dir))
  np.testing.assert_array_equal(by_name.labels(range(6)), labels)
  with pytest.raises(PathError, match="no prepared dataset 'other'"):
    folder.make_source(dict(format="tfds", name="other", data_dir=data_dir))
  with pytest.raises(ConfigError, match="name and data_dir"):
    folder.make_source(dict(format="tfds", name="imagenet2012"))


def test_labelled_images_decodes_arrays_paths_and_bytes(tmp_path):
  red = np.zeros((12, 20, 3), np.uint8)
  red[..., 0] = 255
  path = tmp_path / "red.png"
  Image.fromarray(red).save(path)
  raws = [red, red[..., :1], str(path), path.read_bytes()]  # array, greyscale array, path, bytes
  source = folder.LabelledImages("mixed", ["red"], 4, raws.__getitem__, np.zeros_like)
  for index in range(4):
    want = (255, 0, 0) if index != 1 else (255, 255, 255)
    np.testing.assert_array_equal(source.image(index, 6, "squash"), np.full((6, 6, 3), want))
