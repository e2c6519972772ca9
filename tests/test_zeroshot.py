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
