import numpy as np
import pytest

from vlalign.evaluation import zeroshot

CLASSES = ["red", "green", "blue", "yellow"]
TEMPLATES = ["a {} shape", "a picture of something {}", "{}"]
EMBED_DIM = 8


class _WordTokenizer:
  """Whitespace words -> ids from a fixed vocabulary (class names first, from id 1); 0 = padding."""

  def __init__(self):
    words = CLASSES + sorted({w for t in TEMPLATES for w in t.split() if w != "{}"})
    self.vocab = {w: i + 1 for i, w in enumerate(words)}

  def encode_batch(self, texts, max_len):
    ids = np.zeros((len(texts), max_len), np.int32)
    for row, text in enumerate(texts):
      words = [self.vocab[w] for w in text.split()][:max_len]
      ids[row, : len(words)] = words
    return ids, (ids > 0).astype(np.int32)


def _unit_rows(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _labelled_images(labels):
  """Images whose every pixel holds the label, so an encoder can read it back."""
  return np.broadcast_to(labels[:, None, None, None], (len(labels), 2, 2, 3)).astype(np.float32)


def test_class_embeddings_average_normalised_templates():
  tokenizer = _WordTokenizer()
  table = np.random.default_rng(0).normal(size=(len(tokenizer.vocab) + 1, EMBED_DIM))

  def encode_text(params, ids, mask):  # bag of words, NOT normalised: norms differ per text
    return params * np.einsum("bl,ble->be", mask, table[ids])

  got = zeroshot.class_embeddings(encode_text, 2.0, tokenizer, CLASSES, TEMPLATES, 6, batch_size=4)
  want = []
  for name in CLASSES:
    per_template = []
    for template in TEMPLATES:
      ids, mask = tokenizer.encode_batch([template.format(name)], 6)
      emb = encode_text(2.0, ids, mask)[0]
      per_template.append(emb / np.linalg.norm(emb))
    mean = np.mean(per_template, axis=0)
    want.append(mean / np.linalg.norm(mean))
  assert got.shape == (len(CLASSES), EMBED_DIM) and got.dtype == np.float32
  np.testing.assert_allclose(got, np.array(want), rtol=1e-5, atol=1e-6)
  raw_mean = _unit_rows(
    np.mean(
      [
        encode_text(2.0, *tokenizer.encode_batch([t.format(c) for t in TEMPLATES], 6))
        for c in CLASSES
      ],
      axis=1,
    )
  )
  assert not np.allclose(got, raw_mean, atol=1e-3)  # normalising before averaging matters here


def test_prompts_are_class_major_and_templates_are_checked():
  assert zeroshot.prompts(["a", "b"], ["x {}", "{} y"]) == ["x a", "a y", "x b", "b y"]
  with pytest.raises(ValueError, match="exactly one"):
    zeroshot.prompts(["a"], ["no slot"])


def _evaluator(encode_image, encode_text, labels, batch_size=16):
  data = {
    "images": _labelled_images(labels),
    "labels": labels,
    "class_names": CLASSES,
    "templates": TEMPLATES,
  }
  return zeroshot.ZeroShotEvaluator(
    "zeroshot_color",
    encode_image,
    encode_text,
    _WordTokenizer(),
    data,
    batch_size=batch_size,
    every_steps=0,
    max_len=6,
  )


def test_encoder_that_maps_class_text_to_the_image_vector_scores_100():
  class_vectors = _unit_rows(np.random.default_rng(1).normal(size=(len(CLASSES), EMBED_DIM)))

  def encode_image(params, images):
    return class_vectors[images[:, 0, 0, 0].astype(int)]

  def encode_text(params, ids, mask):  # the class-name token (ids 1..C) picks the vector
    class_token = np.where((ids >= 1) & (ids <= len(CLASSES)), ids, 0).max(axis=1)
    return class_vectors[class_token - 1]

  labels = np.random.default_rng(2).integers(0, len(CLASSES), size=37).astype(np.int32)
  got = _evaluator(encode_image, encode_text, labels).run(None)
  assert got == {"acc": 100.0, "chance": 25.0}


def test_random_encoder_scores_about_chance():
  rng = np.random.default_rng(3)
  image_map = rng.normal(size=(12, EMBED_DIM))
  table = rng.normal(size=(32, EMBED_DIM))
  noise = rng.normal(size=(2000, 2, 2, 3)).astype(np.float32)

  def encode_image(params, images):  # ignores the label in the pixels: sees only the noise
    index = images[:, 0, 0, 1].astype(int)
    return _unit_rows(noise[index].reshape(len(images), -1) @ image_map)

  def encode_text(params, ids, mask):
    return _unit_rows(np.einsum("bl,ble->be", mask, table[ids]))

  labels = rng.integers(0, len(CLASSES), size=2000).astype(np.int32)
  evaluator = _evaluator(encode_image, encode_text, labels, batch_size=256)
  evaluator.images = evaluator.images.copy()
  evaluator.images[:, 0, 0, 1] = np.arange(2000)  # lets the fake encoder find each image's noise
  got = evaluator.run(None)
  assert got["chance"] == 25.0
  assert abs(got["acc"] - 25.0) < 5.0  # 2000 draws: the standard deviation is ~1 point


def test_top1_accuracy_against_a_loop_and_nan():
  rng = np.random.default_rng(4)
  image_emb, class_emb = rng.normal(size=(30, 5)), rng.normal(size=(6, 5))
  labels = rng.integers(0, 6, size=30)
  hits = sum(int(np.argmax([image_emb[m] @ c for c in class_emb]) == labels[m]) for m in range(30))
  assert zeroshot.top1_accuracy(image_emb, class_emb, labels) == pytest.approx(100.0 * hits / 30)
  image_emb[0, 0] = np.nan
  assert np.isnan(zeroshot.top1_accuracy(image_emb, class_emb, labels))


def test_evaluator_rejects_bad_labels():
  with pytest.raises(ValueError, match="labels"):
    _evaluator(None, None, np.array([0, 4], np.int32))


# ----------------------------------------------------------------------------- datasets on disk

FOLDER_CLASSES = ["blue", "green", "red"]  # sorted class directories = label order
_RGB = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}


class _ColourTokenizer:
  """Words without punctuation; a colour word gets id 1 + its label, any other word 9."""

  def encode_batch(self, texts, max_len):
    ids = np.zeros((len(texts), max_len), np.int32)
    for row, text in enumerate(texts):
      words = [w.strip(".,") for w in text.split()][:max_len]
      ids[row, : len(words)] = [
        FOLDER_CLASSES.index(w) + 1 if w in FOLDER_CLASSES else 9 for w in words
      ]
    return ids, (ids > 0).astype(np.int32)


def _encode_colour_image(params, images):
  """One-hot of the brightest channel's class (R -> red = 2, G -> green = 1, B -> blue = 0)."""
  return np.eye(3, dtype=np.float32)[2 - images.mean(axis=(1, 2)).argmax(axis=-1)]


def _encode_colour_text(params, ids, mask):
  """One-hot of `params[label]` for the colour word's label (`params` = identity: right)."""
  label = np.where((ids >= 1) & (ids <= 3), ids, 0).max(axis=1) - 1
  return np.eye(3, dtype=np.float32)[np.asarray(params)[label]]


def _jpeg_bytes(colour, size):
  import io

  from PIL import Image

  buffer = io.BytesIO()
  Image.new("RGB", size, colour).save(buffer, format="JPEG", quality=95)
  return buffer.getvalue()


@pytest.fixture
def colour_tree(tmp_path):
  """`val/<colour>/<i>.jpg`: blue 3, green 2, red 3 solid-colour JPEGs of varied shapes, and a
  truncated `red/zz_bad.jpg`."""
  root = tmp_path / "val"
  sizes = [(40, 30), (24, 48), (33, 33)]
  for colour, count in (("blue", 3), ("green", 2), ("red", 3)):
    (root / colour).mkdir(parents=True)
    for i in range(count):
      (root / colour / f"{i}.jpg").write_bytes(_jpeg_bytes(_RGB[colour], sizes[i]))
  (root / "red" / "zz_bad.jpg").write_bytes(_jpeg_bytes(_RGB["red"], (40, 30))[:120])
  return root


def _build(settings, check_only=False, image_size=16, batch_size=3):
  from vlalign.evaluation import build_evaluators

  predict = {"encode_image": _encode_colour_image, "encode_text": _encode_colour_text}
  evaluators = build_evaluators(
    {"imagenet_like": {"type": "zeroshot", **settings}},
    predict=predict,
    tokenizer=_ColourTokenizer(),
    data_config={"image_size": image_size, "max_len": 12},
    default_batch_size=batch_size,
    check_only=check_only,
  )
  return evaluators.get("imagenet_like")


def test_folder_zeroshot_scores_a_right_and_a_wrong_encoder_and_skips_the_bad_jpeg(colour_tree):
  evaluator = _build({"dataset": dict(format="image_folder", root=str(colour_tree))})
  assert isinstance(evaluator, zeroshot.StreamingZeroShotEvaluator)
  assert evaluator.class_names == FOLDER_CLASSES and len(evaluator.templates) == 80  # "clip"
  # The bad JPEG is dropped from the accuracy (over the 8 readable images) and counted.
  want = {"acc": 100.0, "chance": 100.0 / 3, "skipped_images": 1.0}
  assert evaluator.run(np.arange(3)) == pytest.approx(want)
  # "green" prompts embed as blue: green images tie blue and green, the lower index (blue) wins.
  assert evaluator.run(np.array([0, 0, 2])) == pytest.approx({**want, "acc": 75.0})


def test_folder_zeroshot_decodes_one_batch_at_a_time(colour_tree, monkeypatch):
  from vlalign.data import folder, pipeline

  loaded, seen = [], []
  original = folder.LabelledImages.image

  def counting_image(self, index, *args, **kwargs):
    loaded.append(index)
    return original(self, index, *args, **kwargs)

  def encode_image(params, images):
    seen.append(sorted(loaded))  # what had been decoded when this batch is encoded
    return _encode_colour_image(params, images)

  monkeypatch.setattr(folder.LabelledImages, "image", counting_image)
  evaluator = _build({"dataset": dict(format="image_folder", root=str(colour_tree))})
  evaluator._encode_image = encode_image
  assert isinstance(evaluator.rows, pipeline.ImageRows)
  assert not loaded  # building reads no image
  metrics = evaluator.run(np.arange(3))
  assert seen == [[0, 1, 2], [0, 1, 2, 3, 4, 5], list(range(9))]  # 9 images, batches of 3
  assert metrics["skipped_images"] == 1.0
  assert evaluator.run(np.arange(3)) == metrics  # skips are counted per run


def test_folder_zeroshot_settings_files_and_check_only(colour_tree, tmp_path, monkeypatch):
  from vlalign.data import images

  names = tmp_path / "names.txt"
  names.write_text("blue\ngreen\nred\n")
  templates = tmp_path / "templates.txt"
  templates.write_text("a photo of a {}.\nart of the {}.\n")
  dataset = dict(
    format="image_folder",
    root=str(colour_tree),
    classnames=str(names),
    templates=str(templates),
    max_examples=4,
    resize="squash",
    decoder="pil",
    num_threads=0,
  )

  def no_decoding(*args, **kwargs):
    raise AssertionError("check_only decoded an image")

  with monkeypatch.context() as patch:
    patch.setattr(images, "read_image", no_decoding)
    patch.setattr(images, "decode_image", no_decoding)
    assert _build({"dataset": dataset, "max_len": 8}, check_only=True) is None
  evaluator = _build({"dataset": dataset, "every_steps": 5, "batch_size": 2})
  assert (
    evaluator.templates == ["a photo of a {}.", "art of the {}."] and evaluator.every_steps == 5
  )
  assert len(evaluator.rows) == 4  # an evenly spaced subset (indices 0, 2, 4, 6): no bad JPEG
  assert evaluator.run(np.arange(3)) == pytest.approx(
    {"acc": 100.0, "chance": 100.0 / 3, "skipped_images": 0.0}
  )


@pytest.mark.parametrize(
  ("change", "error", "match"),
  [
    (dict(root="/no/such/val"), "PathError", "imagenet_like.*/no/such/val"),
    (dict(classnames="imagenet"), "ConfigError", "1000 names but .* has 3 classes"),
    (dict(templates="/no/templates.txt"), "PathError", "/no/templates.txt"),
    (dict(templates=["no slot"]), "ConfigError", "exactly one"),
    (dict(resize="crop"), "ConfigError", "resize 'crop'"),
    (dict(decoder="cv2"), "ConfigError", "decoder 'cv2'"),
    (dict(num_threads=-1), "ConfigError", "num_threads"),
    (dict(shuffle=True), "ConfigError", r"unknown fields \['shuffle'\]"),
    (dict(format="coco"), "ConfigError", "unknown labelled-image format"),
  ],
)
def test_folder_zeroshot_setting_errors(colour_tree, change, error, match):
  from vlalign import errors

  dataset = {**dict(format="image_folder", root=str(colour_tree)), **change}
  with pytest.raises(getattr(errors, error), match=match):
    _build({"dataset": dataset}, check_only=True)


def test_zeroshot_settings_need_either_dataset_or_split_and_task(colour_tree):
  from vlalign.errors import ConfigError

  dataset = dict(format="image_folder", root=str(colour_tree))
  with pytest.raises(ConfigError, match="either dataset"):
    _build({"dataset": dataset, "split": "test", "task": "color"}, check_only=True)
  with pytest.raises(ConfigError, match="unknown fields"):
    _build({"dataset": dataset, "templates": "clip"}, check_only=True)
  with pytest.raises(ConfigError, match="misses"):
    _build({"task": "color"}, check_only=True)


def test_label_ranks_match_a_stable_sort_with_ties():
  rng = np.random.default_rng(5)
  logits = rng.integers(0, 4, size=(200, 7)).astype(np.float32)  # many ties
  labels = rng.integers(0, 7, size=200)
  order = np.argsort(-logits, axis=1, kind="stable")  # ties: lower class index first
  want = np.argmax(order == labels[:, None], axis=1)
  np.testing.assert_array_equal(zeroshot.label_ranks(logits, labels), want)
  assert np.array_equal(zeroshot.label_ranks(logits, labels) == 0, logits.argmax(1) == labels)


def test_accuracy_metrics_top5_only_above_5_classes_and_nan():
  ranks = np.array([0, 1, 4, 5, 9])
  assert zeroshot.accuracy_metrics(ranks, 10) == {"acc": 20.0, "acc5": 60.0, "chance": 10.0}
  assert zeroshot.accuracy_metrics(np.array([0, 2]), 5) == {"acc": 50.0, "chance": 20.0}
  nan = zeroshot.accuracy_metrics(ranks, 10, finite=False)
  assert np.isnan(nan["acc"]) and np.isnan(nan["acc5"]) and nan["chance"] == 10.0
  assert np.isnan(zeroshot.accuracy_metrics(np.array([], np.int64), 3)["acc"])


def test_streaming_accuracy_is_nan_for_non_finite_scores(colour_tree):
  evaluator = _build({"dataset": dict(format="image_folder", root=str(colour_tree))})
  evaluator._encode_image = lambda params, images: np.full((len(images), 3), np.nan, np.float32)
  metrics = evaluator.run(np.arange(3))
  assert np.isnan(metrics["acc"]) and metrics["skipped_images"] == 1.0


def test_class_embeddings_are_the_same_in_prompt_chunks(monkeypatch):
  tokenizer = _WordTokenizer()
  table = np.random.default_rng(6).normal(size=(len(tokenizer.vocab) + 1, EMBED_DIM))

  def encode_text(params, ids, mask):
    return np.einsum("bl,ble->be", mask, table[ids])

  whole = zeroshot.class_embeddings(encode_text, None, tokenizer, CLASSES, TEMPLATES, 6, 64)
  monkeypatch.setattr(zeroshot, "_PROMPT_CHUNK_BATCHES", 1)  # 12 prompts in chunks of 5
  chunked = zeroshot.class_embeddings(encode_text, None, tokenizer, CLASSES, TEMPLATES, 6, 5)
  np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-6)
