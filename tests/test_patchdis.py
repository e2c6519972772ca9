"""Lexical evaluators: PatchDis (patch-level discrimination) and word precision."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlalign import evaluation
from vlalign.data import shapes, tokenizer
from vlalign.data import transforms as T
from vlalign.errors import ConfigError
from vlalign.evaluation import lexical

DATA = dict(name="shapes", image_size=32, max_len=24, test_size=12, val_size=3, seed=0)
TOKENIZER = tokenizer.WordTokenizer(shapes.vocabulary())


# --- Pure functions -----------------------------------------------------------------------------


def test_class_scores_against_a_loop_with_zero_rows():
  rng = np.random.default_rng(0)
  patch_lex = np.maximum(rng.normal(size=(2, 5, 7)), 0).astype(np.float32)
  class_lex = np.maximum(rng.normal(size=(3, 7)), 0).astype(np.float32)
  patch_lex[1, 2] = 0.0
  class_lex[2] = 0.0
  got = lexical.class_scores(patch_lex, class_lex)
  want = np.zeros((2, 5, 3))
  for b in range(2):
    for n in range(5):
      for c in range(3):
        p, q = patch_lex[b, n], class_lex[c]
        norms = np.linalg.norm(p) * np.linalg.norm(q)
        want[b, n, c] = 0.0 if norms == 0 else p @ q / norms
  assert got.shape == (2, 5, 3) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert np.all(got[1, 2] == 0) and np.all(got[..., 2] == 0)


@pytest.mark.parametrize("grid, size", [(4, 32), (4, 13), (3, 3), (7, 64)])
def test_upsampling_matches_jax_image_resize(grid, size):
  maps = np.random.default_rng(1).normal(size=(2, grid, grid, 3)).astype(np.float32)
  got = lexical.upsample_grid(maps, size)
  want = jax.image.resize(jnp.asarray(maps), (2, size, size, 3), method="linear")
  np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-5)


def _bilinear_weight(pixel: int, patch: int, grid: int, size: int) -> float:
  """Weight of grid cell `patch` at output `pixel` (half-pixel centres, edges clamped)."""
  pos = min(max((pixel + 0.5) * grid / size - 0.5, 0.0), grid - 1.0)
  return max(0.0, 1.0 - abs(pos - patch))


def test_one_hot_patch_labels_its_pixel_block():
  grid, size, row, col = 4, 32, 1, 2  # patch (1, 2) covers rows 8..15 and columns 16..23
  scores = np.zeros((1, grid * grid, 2), np.float32)
  scores[0, row * grid + col, 1] = 1.0  # row-major: patch index row * g + col
  labels = lexical.patch_labels_to_pixels(scores, size, background_threshold=0.3)
  assert labels.shape == (1, size, size) and labels.dtype == np.int32
  assert np.all(labels[0, 8:16, 16:24] == 2)  # class 1 -> label 2
  want = np.zeros((size, size), np.int32)
  for y in range(size):
    for x in range(size):
      value = _bilinear_weight(y, row, grid, size) * _bilinear_weight(x, col, grid, size)
      want[y, x] = 2 if value > 0.3 else 0
  np.testing.assert_array_equal(labels[0], want)
  assert np.all(labels[0, :4] == 0) and np.all(labels[0, :, :12] == 0)  # far from the patch
  # Without a background channel in the way, every pixel takes the higher class; ties go low.
  scores[0, :, 0] = 0.5
  labels = lexical.patch_labels_to_pixels(scores, size, background_threshold=-1.0)
  assert set(np.unique(labels)) == {1, 2}
  np.testing.assert_array_equal(lexical.patch_labels_to_pixels(scores * 0, size, 0.0), 0)


def test_grid_must_be_square():
  with pytest.raises(ValueError, match="square"):
    lexical.patch_labels_to_pixels(np.zeros((1, 12, 2)), 16, 0.0)


def _loop_confusion(pred, target, k):
  cm = np.zeros((k, k), np.int64)
  for p, t in zip(pred.ravel(), target.ravel()):
    if t >= 0:
      cm[t, p] += 1
  return cm


def _loop_miou(cm):
  ious = []
  for c in range(len(cm)):
    tp, fp, fn = cm[c, c], cm[:, c].sum() - cm[c, c], cm[c, :].sum() - cm[c, c]
    if tp + fp + fn > 0:
      ious.append(tp / (tp + fp + fn))
  return np.mean(ious)


def test_confusion_and_miou_against_loops():
  rng = np.random.default_rng(2)
  k = 6
  target = rng.integers(-1, k - 1, size=(3, 9, 9))  # -1 = ignored; label 5 never in the target
  pred = rng.integers(0, k - 2, size=(3, 9, 9))  # ... nor in the prediction: absent from the mean
  cm = lexical.confusion_matrix(pred, target, k)
  np.testing.assert_array_equal(cm, _loop_confusion(pred, target, k))
  assert cm.sum() == np.sum(target >= 0)
  miou, iou = lexical.mean_iou(cm)
  assert miou == pytest.approx(_loop_miou(cm))
  assert np.isnan(iou[5]) and np.all(np.isfinite(iou[:5]))
  assert lexical.mean_iou(np.diag([3, 0, 4]))[0] == 1.0  # an absent label does not count
  assert np.isnan(lexical.mean_iou(np.zeros((2, 2)))[0])
  with pytest.raises(ValueError, match="outside"):
    lexical.confusion_matrix(np.array([2]), np.array([0]), 2)


def test_pixel_targets_of_a_hand_made_mask():
  mask = np.array([[0, 1, 1], [2, 2, 0], [0, 3, 0]], np.uint8)
  got = lexical.pixel_targets(mask, np.array([4, 0, 2], np.int32))
  np.testing.assert_array_equal(got, [[0, 5, 5], [1, 1, 0], [0, 3, 0]])
  got = lexical.pixel_targets(mask[:2], np.array([5, 1, -1], np.int32))  # padded third object
  np.testing.assert_array_equal(got, [[0, 6, 6], [2, 2, 0]])
  with pytest.raises(ValueError, match="no class"):
    lexical.pixel_targets(mask, np.array([5, 1, -1], np.int32))


# --- PatchDis evaluator -------------------------------------------------------------------------


def _source():
  return shapes.ShapesSource("test", num_examples=DATA["test_size"], image_size=32, seed=0)


def _by_image(source):
  """Normalised image bytes -> example, so that a fake model can look up the true mask."""
  return {T.normalize_image(source[i]["image"]).tobytes(): source[i] for i in range(len(source))}


def _class_text_fn(class_names, vocab_size):
  """Fake `lexical_text`: the one-hot vector of the class name in the prompt (lexicon: the
  classes, then one filler entry)."""
  class_ids = np.array([TOKENIZER.token_ids(name)[0] for name in class_names])

  def lexical_text(params, ids, mask):
    out = np.zeros((len(ids), vocab_size), np.float32)
    for row, row_ids in enumerate(ids):
      hits = np.flatnonzero(np.isin(class_ids, row_ids))
      out[row, hits] = 1.0
    return out

  return lexical_text


def _cheating_patches_fn(source, attribute, num_classes, patch):
  """Fake `lexical_patches` reading the true mask: a patch's vector is the fraction of its pixels
  of each class, then the background fraction (a filler word no class prompt has)."""
  examples = _by_image(source)

  def lexical_patches(params, images):
    out = []
    for image in images:
      ex = examples[np.ascontiguousarray(image).tobytes()]
      target = lexical.pixel_targets(ex["mask"], ex[attribute])  # [S, S] in 0..C
      side = target.shape[0] // patch
      blocks = target.reshape(side, patch, side, patch).transpose(0, 2, 1, 3).reshape(side**2, -1)
      counts = np.stack([np.sum(blocks == k, axis=1) for k in range(num_classes + 1)], axis=1)
      out.append(np.roll(counts, -1, axis=1) / patch**2)  # classes first, background last
    return np.stack(out).astype(np.float32)

  return lexical_patches


def _patchdis(patches_fn, text_fn, task="shape", **kw):
  return lexical.PatchDisEvaluator(
    "patchdis_test", patches_fn, text_fn, TOKENIZER, _source(), task=task, batch_size=5, **kw
  )


@pytest.mark.parametrize("task", ["shape", "color"])
def test_patchdis_of_a_pixel_exact_model_is_100(task):
  source = _source()
  attribute, names = {
    "shape": ("object_shape", shapes.SHAPES),
    "color": ("object_color", shapes.COLORS),
  }[task]
  patches = _cheating_patches_fn(source, attribute, len(names), patch=1)
  text = _class_text_fn(names, len(names) + 1)
  got = _patchdis(patches, text, task=task, background_threshold=0.5).run(None)
  assert got == {"miou": 100.0, "miou_objects": 100.0, "pixel_acc": 100.0}


def test_patchdis_of_a_patch_model_that_reads_the_masks_is_close_to_100():
  source = _source()
  patches = _cheating_patches_fn(source, "object_shape", len(shapes.SHAPES), patch=2)
  text = _class_text_fn(shapes.SHAPES, len(shapes.SHAPES) + 1)
  got = _patchdis(patches, text, background_threshold=0.5).run(None)
  # 2 x 2 patches: only the pixels at the objects' edges can go wrong (a 32 x 32 image).
  assert got["miou"] > 85.0 and got["miou_objects"] > 99.0 and got["pixel_acc"] > 98.0
  # The threshold moves the background but not the objects-only score.
  high = _patchdis(patches, text, background_threshold=0.99).run(None)
  assert high["miou_objects"] == got["miou_objects"] and high["miou"] < got["miou"]


def test_patchdis_of_a_random_model_is_low():
  rng = np.random.default_rng(3)
  num_classes = len(shapes.SHAPES)

  def random_patches(params, images):
    return rng.random((len(images), 64, num_classes + 1)).astype(np.float32)

  text = _class_text_fn(shapes.SHAPES, num_classes + 1)
  got = _patchdis(random_patches, text).run(None)
  assert got["miou"] < 20.0 and got["miou_objects"] < 30.0


def test_patchdis_builder_validates_and_builds():
  def ctx(predict, check_only=False):
    return evaluation.EvalContext(predict, TOKENIZER, DATA, 4, check_only)

  fake = {"lexical_patches": None, "lexical_text": None}
  ok = dict(type="patchdis", split="test", task="color", max_images=7, background_threshold=0.1)
  assert lexical.build_patchdis("p", ok, ctx(fake, check_only=True)) is None
  built = evaluation.build_evaluators({"p": ok}, predict=fake, tokenizer=TOKENIZER, **_ctx_args())
  ev = built["p"]
  assert isinstance(ev, lexical.PatchDisEvaluator)
  assert ev.num_images == 7 and ev.class_names == list(shapes.COLORS)
  assert ev.templates == list(shapes.ZEROSHOT_TASKS["color"].templates)
  assert ev.background_threshold == 0.1 and ev.batch_size == 4 and ev.max_len == 24
  bad = [
    (dict(ok, task="size"), "unknown task"),
    (dict(ok, templates=["no slot"]), "exactly one"),
    (dict(ok, background_threshold="high"), "finite number"),
    (dict(ok, max_images=0), "positive integer"),
    (dict(ok, colour="red"), "unknown fields"),
  ]
  for settings, message in bad:
    with pytest.raises(ConfigError, match=message):
      lexical.build_patchdis("p", settings, ctx(fake, check_only=True))
  with pytest.raises(ConfigError, match="lexical_patches"):
    lexical.build_patchdis("p", ok, ctx({"encode_image": None}, check_only=True))


def _ctx_args():
  return dict(data_config=DATA, default_batch_size=4)


# --- Word precision -----------------------------------------------------------------------------


def _ids(*words):
  return [TOKENIZER.token_ids(w)[0] for w in words]


def test_top_lexicon_ids_skip_inactive_entries():
  lex = np.array([[0.2, 0.0, 0.9, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0, 0.3]], np.float32)
  lexicon_ids = np.array([10, 11, 12, 13, 14])
  got = lexical.top_lexicon_ids(lex, lexicon_ids, 3)
  np.testing.assert_array_equal(got, [[12, 10, 13], [14, -1, -1]])  # ties: lower entry first


def test_caption_words_drop_specials_and_function_words():
  ignore = lexical.ignored_ids(TOKENIZER, lexical.DEFAULT_IGNORE_WORDS)
  assert set(_ids("a", "the", "of", ",")) <= ignore and not set(_ids("left", "red")) & ignore
  words = lexical.caption_word_ids(
    TOKENIZER, [["a red circle to the left of a blue zebra"], ["one cross", "two crosses"]], ignore
  )
  assert words == [
    set(_ids("red", "circle", "left", "blue")),  # "zebra" is [UNK]: dropped
    set(_ids("one", "cross", "two", "crosses")),
  ]


def _fake_images(count):
  images = np.zeros((count, 32, 32, 3), np.uint8)
  images[:, 0, 0, 0] = np.arange(count)  # lets the fake model tell the images apart
  return images


def test_lexical_words_against_a_hand_count():
  lexicon_words = ["a", "red", "square", "circle", "blue", "squares", "picture", "left"]
  lexicon_ids = np.array(_ids(*lexicon_words), np.int32)
  vectors = np.zeros((3, len(lexicon_words)), np.float32)
  vectors[0, :4] = [0.9, 0.8, 0.5, 0.1]  # top-3: a, red, square; "circle" is 4th
  vectors[1, [4, 5]] = [0.7, 0.2]  # only two active entries: blue, squares
  vectors[2, [1, 7]] = [0.3, 0.3]  # red, left
  images = _fake_images(3)
  source = [
    {"image": images[0], "captions": ("a red circle", "a picture of a red circle")},
    {"image": images[1], "captions": ("two blue squares", "a blue square on the left")},
    {"image": images[2], "captions": ("a red cross on the left",)},
  ]
  normalised = T.normalize_image(images)[:, 0, 0, 0]

  def lexical_image(params, batch):
    index = [int(np.argmin(np.abs(normalised - v))) for v in batch[:, 0, 0, 0]]
    return vectors[index]

  ev = lexical.LexicalWordsEvaluator(
    "words", lexical_image, lambda params: lexicon_ids, TOKENIZER, source, k=3, batch_size=2
  )
  got = ev.run(None)
  # image 0: words {red, circle, picture}, top {a, red, square}: 1 hit
  # image 1: words {two, blue, squares, square, left}, top {blue, squares}: 2 hits
  # image 2: words {red, cross, left}, top {red, left}: 2 hits
  assert got["precision_at_3"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 2 / 3) / 3)
  assert got["recall_at_3"] == pytest.approx(100 * (1 / 3 + 2 / 5 + 2 / 3) / 3)
  assert got["active"] == pytest.approx((4 + 2 + 2) / 3)
  assert set(got) == {"precision_at_3", "recall_at_3", "active"}
  ev.max_images, ev.num_images = 1, 1
  assert ev.run(None)["precision_at_3"] == pytest.approx(100 / 3)


def test_lexical_words_on_the_split_with_a_model_that_reads_the_captions():
  """A fake model activating exactly the caption words: recall 100, and precision 100 once k is
  at most the number of caption words."""
  source = shapes.ShapesSource("val", num_examples=3, image_size=32, seed=0)
  examples = _by_image(source)
  ignore = lexical.ignored_ids(TOKENIZER, lexical.DEFAULT_IGNORE_WORDS)
  lexicon_ids = np.arange(5, TOKENIZER.vocab_size, dtype=np.int32)

  def lexical_image(params, images):
    out = np.zeros((len(images), len(lexicon_ids)), np.float32)
    for row, image in enumerate(images):
      words = lexical.caption_word_ids(
        TOKENIZER, [examples[np.ascontiguousarray(image).tobytes()]["captions"]], ignore
      )[0]
      out[row, np.isin(lexicon_ids, list(words))] = 1.0
    return out

  predict = {"lexical_image": lexical_image, "lexicon_ids": lambda params: lexicon_ids}
  evals = {"w": dict(type="lexical_words", split="val", k=2)}
  ev = evaluation.build_evaluators(evals, predict=predict, tokenizer=TOKENIZER, **_ctx_args())["w"]
  got = ev.run(None)
  assert got["precision_at_2"] == 100.0 and got["recall_at_2"] < 100.0 and got["active"] > 2
  ev.k = 40
  assert ev.run(None)["recall_at_40"] == 100.0
  ev.k = len(lexicon_ids) + 1
  with pytest.raises(ConfigError, match="exceeds"):
    ev.run(None)
  with pytest.raises(ConfigError, match="positive integer"):
    evaluation.build_evaluators(
      {"w": dict(evals["w"], k=0)}, predict=predict, tokenizer=TOKENIZER, **_ctx_args()
    )
  with pytest.raises(ConfigError, match="lexicon_ids"):
    evaluation.build_evaluators(
      evals, predict={"lexical_image": None}, tokenizer=TOKENIZER, **_ctx_args()
    )
