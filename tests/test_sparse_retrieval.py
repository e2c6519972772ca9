import sys
import types

import ml_collections
import numpy as np
import pytest

from vlalign import evaluation
from vlalign.errors import ConfigError
from vlalign.evaluation import lexical_retrieval, retrieval, sparse

CAPTIONS = 5  # per image
VOCAB = 40


# ---------------------------------------------------------------------------------------------
# Sparsification


def _lexical_like(rng, rows, cols, density=0.3):
  """Coarse values (many ties), mostly zero, a few negative entries."""
  x = np.round(rng.uniform(-0.2, 1.0, size=(rows, cols)), 1).astype(np.float32)
  return np.where(rng.random((rows, cols)) < density, x, 0).astype(np.float32)


def _topk_loop(x, k):
  out = np.zeros_like(x)
  for i, row in enumerate(x):
    order = sorted(range(len(row)), key=lambda j: (-row[j], j))  # ties: lower column first
    for j in order[:k]:
      if row[j] > 0:
        out[i, j] = row[j]
  return out


@pytest.mark.parametrize("k", [1, 2, 5, VOCAB, VOCAB + 3])
def test_sparsify_topk_matches_a_loop(k):
  x = _lexical_like(np.random.default_rng(k), 30, VOCAB, density=0.5)
  x[3] = 0.0  # an empty row
  x[4] = 0.5  # a row of ties
  got = sparse.sparsify_topk(x, k)
  assert got.dtype == x.dtype and got.shape == x.shape
  np.testing.assert_array_equal(got, _topk_loop(x, k))
  np.testing.assert_array_equal(sparse.active_counts(got)[3:5], [0, min(k, VOCAB)])


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 2.0])
def test_sparsify_threshold_matches_a_loop(t):
  x = _lexical_like(np.random.default_rng(0), 20, VOCAB, density=0.6)
  want = np.zeros_like(x)
  for i in range(len(x)):
    for j in range(VOCAB):
      if x[i, j] > t:
        want[i, j] = x[i, j]
  np.testing.assert_array_equal(sparse.sparsify_threshold(x, t), want)


def test_sparsify_rejects_bad_arguments():
  x = np.ones((2, 3), np.float32)
  for k in (0, -1, True, 1.5):
    with pytest.raises(ValueError, match="positive int"):
      sparse.sparsify_topk(x, k)
  for t in (-0.1, float("nan"), float("inf")):
    with pytest.raises(ValueError, match="finite"):
      sparse.sparsify_threshold(x, t)
  with pytest.raises(ValueError, match=r"\[N, V\]"):
    sparse.sparsify_topk(np.ones(3), 1)


def test_active_counts_and_sparsity_stats_by_hand():
  x = np.array([[0, 1, 0, 2], [0, 0, 0, 0], [3, 4, 5, 0]], np.float32)
  np.testing.assert_array_equal(sparse.active_counts(x), [2, 0, 3])
  want = {"active": 5 / 3, "sparsity": 100.0 * 7 / 12}
  assert sparse.sparsity_stats(x) == pytest.approx(want)
  rows = sparse.SparseRows.from_dense(x)
  np.testing.assert_array_equal(sparse.active_counts(rows), [2, 0, 3])
  assert sparse.sparsity_stats(rows) == pytest.approx(want)
  explicit_zero = sparse.SparseRows([0, 2], [0, 1], [0.0, 1.0], 4)  # a stored 0 is not active
  np.testing.assert_array_equal(sparse.active_counts(explicit_zero), [1])


# ---------------------------------------------------------------------------------------------
# SparseRows


def test_sparse_rows_round_trip_and_helpers():
  rng = np.random.default_rng(0)
  x = _lexical_like(rng, 12, VOCAB, density=0.2)
  x[[0, 5, 11]] = 0.0  # empty rows, first and last included
  rows = sparse.SparseRows.from_dense(x)
  assert rows.shape == x.shape and rows.nnz == np.count_nonzero(x)
  assert (rows.indptr.dtype, rows.indices.dtype, rows.values.dtype) == (
    np.int64,
    np.int32,
    np.float32,
  )
  assert len(rows.indptr) == len(x) + 1
  np.testing.assert_array_equal(rows.to_dense(), x)
  np.testing.assert_array_equal(rows.row_ids(), np.nonzero(x)[0])
  stacked = sparse.SparseRows.vstack(
    [sparse.SparseRows.from_dense(x[:4]), sparse.SparseRows.from_dense(x[4:])]
  )
  np.testing.assert_array_equal(stacked.indptr, rows.indptr)
  np.testing.assert_array_equal(stacked.to_dense(), x)
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  want = np.where(norms > 0, x / np.maximum(norms, 1e-12), 0)
  np.testing.assert_allclose(rows.l2_normalised().to_dense(), want, rtol=1e-6)


def test_sparse_rows_validates():
  with pytest.raises(ValueError, match="strictly increasing"):
    sparse.SparseRows([0, 2], [3, 1], [1.0, 1.0], 4)
  with pytest.raises(ValueError, match="strictly increasing"):
    sparse.SparseRows([0, 2], [1, 1], [1.0, 1.0], 4)
  sparse.SparseRows([0, 1, 2], [3, 1], [1.0, 1.0], 4)  # decreasing across rows is fine
  with pytest.raises(ValueError, match=r"\[0, 4\)"):
    sparse.SparseRows([0, 1], [4], [1.0], 4)
  with pytest.raises(ValueError, match="indptr"):
    sparse.SparseRows([1, 2], [0], [1.0], 4)
  with pytest.raises(ValueError, match="nnz"):
    sparse.SparseRows([0, 2], [0], [1.0], 4)


# ---------------------------------------------------------------------------------------------
# Inverted index


def _dyadic_sparse(rng, rows, cols, density, words=None):
  """Values in {0.25, 0.5, 1, 2}: exact float sums, so many exact ties in the scores."""
  x = rng.choice([0.25, 0.5, 1.0, 2.0], size=(rows, cols)).astype(np.float32)
  mask = rng.random((rows, cols)) < density
  if words is not None:
    mask &= np.isin(np.arange(cols), words)[None]
  return np.where(mask, x, 0).astype(np.float32)


def _ranking_reference(scores, k):
  ids, top = [], []
  for row in scores:
    order = sorted(range(len(row)), key=lambda j: (-row[j], j))[:k]
    ids.append(order)
    top.append(row[order])
  return np.array(top), np.array(ids)


def _gallery_and_queries(seed, negative=False):
  rng = np.random.default_rng(seed)
  num_items, num_queries = 25, 12
  gallery = _dyadic_sparse(rng, num_items, VOCAB, 0.1, words=np.arange(30))
  gallery[7] = 0.0  # an empty item
  queries = _dyadic_sparse(rng, num_queries, VOCAB, 0.08)
  queries[0] = 0.0  # a query with no active word
  queries[1] = 0.0
  queries[1, 35:] = 1.0  # active words no gallery item uses
  queries[2] = 0.0
  queries[2, np.flatnonzero(gallery.any(axis=0))[0]] = (
    1.0  # touches few items: the rest fill with zeros
  )
  if negative:  # the rule holds for any values, e.g. touched items scoring below 0
    gallery[gallery == 0.25] = -0.5
    queries[queries == 0.25] = -1.0
  return gallery, queries


@pytest.mark.parametrize("negative", [False, True])
@pytest.mark.parametrize("k", [1, 2, 5, 24, 25, 40])
def test_search_equals_the_dense_top_k(k, negative):
  gallery, queries = _gallery_and_queries(k, negative)
  dense = queries.astype(np.float64) @ gallery.T.astype(np.float64)  # [Q, G]
  want_scores, want_ids = _ranking_reference(dense, k)
  index = sparse.InvertedIndex.build(sparse.SparseRows.from_dense(gallery))
  got_scores, got_ids = index.search(sparse.SparseRows.from_dense(queries), k)
  assert got_ids.shape == (len(queries), min(k, len(gallery))) and got_ids.dtype == np.int64
  np.testing.assert_array_equal(got_ids, want_ids)
  np.testing.assert_array_equal(got_scores, want_scores)
  np.testing.assert_array_equal(got_ids[0], np.arange(min(k, len(gallery))))  # nothing touched
  top, ids = sparse.dense_topk(dense, k)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(top, want_scores)


def test_search_ranks_touched_items_before_untouched_ones():
  gallery = np.zeros((6, 4), np.float32)
  gallery[[4, 1, 5], [0, 0, 1]] = [1.0, 1.0, 3.0]  # items 1 and 4 tie
  index = sparse.InvertedIndex.build(sparse.SparseRows.from_dense(gallery))
  query = sparse.SparseRows.from_dense(np.array([[2.0, 1.0, 0.0, 0.0]], np.float32))
  scores, ids = index.search(query, 5)
  np.testing.assert_array_equal(ids, [[5, 1, 4, 0, 2]])
  np.testing.assert_array_equal(scores, [[3.0, 2.0, 2.0, 0.0, 0.0]])
  np.testing.assert_array_equal(index.item_ids[index.indptr[0] : index.indptr[1]], [1, 4])
  with pytest.raises(ValueError, match="columns"):
    index.search(sparse.SparseRows.from_dense(np.ones((1, 3), np.float32)), 1)
  with pytest.raises(ValueError, match="positive int"):
    index.search(query, 0)


def test_scores_equal_the_dense_product():
  rng = np.random.default_rng(1)
  gallery = _lexical_like(rng, 30, VOCAB, 0.2)
  queries = _lexical_like(rng, 9, VOCAB, 0.2)
  queries[2] = 0.0
  index = sparse.InvertedIndex.build(sparse.SparseRows.from_dense(gallery))
  got = index.scores(sparse.SparseRows.from_dense(queries))
  assert got.shape == (9, 30) and got.dtype == np.float32
  np.testing.assert_allclose(got, queries @ gallery.T, rtol=1e-6, atol=1e-6)
  exact = index.scores(sparse.SparseRows.from_dense(queries), dtype=np.float64)
  np.testing.assert_allclose(exact, queries.astype(np.float64) @ gallery.T, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# The evaluator


def _eval_data(num_images, rng):
  txt2img = np.repeat(np.arange(num_images), CAPTIONS).astype(np.int32)
  img2txt = np.arange(num_images * CAPTIONS, dtype=np.int32).reshape(num_images, CAPTIONS)
  length = 6
  lengths = rng.integers(2, length + 1, size=(num_images * CAPTIONS, 1))
  mask = (np.arange(length)[None] < lengths).astype(np.int32)
  return {
    "images": rng.normal(size=(num_images, 4, 4, 3)).astype(np.float32),
    "text_ids": (rng.integers(1, 20, size=(num_images * CAPTIONS, length)) * mask).astype(np.int32),
    "text_mask": mask,
    "txt2img": txt2img,
    "img2txt": img2txt,
  }


class _FakeLexical:
  """Random linear maps then ReLU: non-negative, not normalised, about half the words active."""

  def __init__(self, seed=0, vocab=VOCAB):
    rng = np.random.default_rng(seed)
    self.image_map = rng.normal(size=(4 * 4 * 3, vocab)).astype(np.float32)
    self.token_table = rng.normal(size=(20, vocab)).astype(np.float32)

  def image(self, params, images):
    return np.maximum(params * images.reshape(len(images), -1) @ self.image_map, 0)

  def text(self, params, ids, mask):
    return np.maximum(params * np.einsum("bl,blv->bv", mask, self.token_table[ids]), 0)


def _unit(fn):
  return lambda *args: fn(*args) / np.linalg.norm(fn(*args), axis=-1, keepdims=True)


def _evaluator(lex, data, **kwargs):
  return lexical_retrieval.LexicalRetrievalEvaluator(
    "lex", lex.image, lex.text, data, batch_size=8, every_steps=0, **kwargs
  )


def test_dense_and_full_topk_metrics_equal_the_retrieval_evaluator():
  data = _eval_data(12, np.random.default_rng(0))
  lex = _FakeLexical()
  got = _evaluator(lex, data, topk=[3, VOCAB], thresholds=[0.5]).run(1.5)
  reference = retrieval.RetrievalEvaluator(
    "ref", _unit(lex.image), _unit(lex.text), data, batch_size=8, every_steps=0
  ).run(1.5)
  recalls = list(reference)
  stats = ["img_active", "img_sparsity", "txt_active", "txt_sparsity"]
  assert list(got) == [
    f"{p}/{key}" for p in ("dense", "top3", f"top{VOCAB}", "thr0.5") for key in recalls + stats
  ]
  assert {key: got[f"dense/{key}"] for key in recalls} == pytest.approx(reference)
  assert {key: got[f"top{VOCAB}/{key}"] for key in recalls + stats} == pytest.approx(
    {key: got[f"dense/{key}"] for key in recalls + stats}
  )
  assert 0 < reference["rsum"] < 600  # neither trivial case


def test_sparsity_numbers_equal_hand_computed_ones():
  data = _eval_data(4, np.random.default_rng(1))
  lex = _FakeLexical(seed=1)
  got = _evaluator(lex, data, topk=[3], thresholds=[0, 1.0]).run(1.0)
  images = lex.image(1.0, data["images"])
  texts = lex.text(1.0, data["text_ids"], data["text_mask"])
  for side, x in (("img", images), ("txt", texts)):
    positive = [sum(1 for v in row if v > 0) for row in x]
    above_one = [sum(1 for v in row if v > 1.0) for row in x]
    cells = x.size
    for prefix, counts in (
      ("dense", positive),
      ("top3", [min(3, c) for c in positive]),
      ("thr0", positive),
      ("thr1", above_one),
    ):
      assert got[f"{prefix}/{side}_active"] == pytest.approx(np.mean(counts)), (prefix, side)
      assert got[f"{prefix}/{side}_sparsity"] == pytest.approx(100.0 * (1 - sum(counts) / cells))
  assert 0 < got["top3/img_active"] < got["dense/img_active"]


def test_top_k_metrics_are_those_of_the_sparsified_vectors():
  data = _eval_data(12, np.random.default_rng(2))
  lex = _FakeLexical(seed=2)
  got = _evaluator(lex, data, topk=[2]).run(1.0)
  images = sparse.sparsify_topk(lex.image(1.0, data["images"]), 2)
  texts = sparse.sparsify_topk(lex.text(1.0, data["text_ids"], data["text_mask"]), 2)
  unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  want = retrieval.retrieval_metrics(unit(images) @ unit(texts).T, data["txt2img"], data["img2txt"])
  assert {key: got[f"top2/{key}"] for key in want} == pytest.approx(want)


def test_non_finite_vectors_give_nan_everywhere():
  data = _eval_data(3, np.random.default_rng(0))
  lex = _FakeLexical()

  def image(params, images):
    out = lex.image(params, images)
    out[0, 0] = np.nan
    return out

  ev = lexical_retrieval.LexicalRetrievalEvaluator(
    "lex", image, lex.text, data, batch_size=8, every_steps=0, topk=[2], thresholds=[0.1]
  )
  got = ev.run(1.0)
  assert list(got) == ev.metric_names() and all(np.isnan(v) for v in got.values())


def _fake_pipeline(monkeypatch, num_images=12, split_size=12):
  import vlalign.data

  calls = []

  def make_eval_data(data_config, tokenizer, split):
    calls.append(split)
    return _eval_data(num_images, np.random.default_rng(0))

  fake = types.SimpleNamespace(
    make_eval_data=make_eval_data, split_size=lambda config, split: split_size
  )
  monkeypatch.setitem(sys.modules, "vlalign.data.pipeline", fake)
  monkeypatch.setattr(vlalign.data, "pipeline", fake, raising=False)
  return calls


def _build(evals, predict=None, check_only=False):
  lex = _FakeLexical()
  return evaluation.build_evaluators(
    ml_collections.ConfigDict(evals),
    predict={"lexical_image": lex.image, "lexical_text": lex.text} if predict is None else predict,
    tokenizer=None,
    data_config=ml_collections.ConfigDict({"max_len": 6}),
    default_batch_size=8,
    check_only=check_only,
  )


def test_build_from_config(monkeypatch):
  calls = _fake_pipeline(monkeypatch)
  settings = {"type": "lexical_retrieval", "split": "val", "topk": [4, 1], "thresholds": [0.25]}
  assert _build({"lex": settings}, check_only=True) == {} and calls == []
  evaluators = _build({"lex": dict(settings, every_steps=100, batch_size=5)})
  ev = evaluators["lex"]
  assert isinstance(ev, lexical_retrieval.LexicalRetrievalEvaluator) and calls == ["val"]
  assert (ev.name, ev.every_steps, ev.batch_size, ev.topk, ev.thresholds) == (
    "lex",
    100,
    5,
    (4, 1),
    (0.25,),
  )
  assert list(ev.run(1.0)) == ev.metric_names()
  plain = _build({"lex": {"type": "lexical_retrieval", "split": "test"}})["lex"]
  assert (plain.topk, plain.thresholds, plain.every_steps) == ((), (), 0)
  assert all(key.startswith("dense/") for key in plain.run(1.0))


@pytest.mark.parametrize(
  ("extra", "message"),
  [
    ({"topks": [1]}, r"unknown fields \['topks'\]"),
    ({"topk": [0]}, "positive ints"),
    ({"topk": [-2]}, "positive ints"),
    ({"topk": [2.0]}, "positive ints"),
    ({"topk": 5}, "must be a list"),
    ({"topk": [3, 3]}, "repeated"),
    ({"thresholds": [-0.5]}, ">= 0"),
    ({"thresholds": [float("nan")]}, "finite"),
    ({"thresholds": [0.5, 0.50000001]}, "repeat a metric prefix"),
    ({"ties": "random"}, "tie rule"),
  ],
)
def test_config_errors(monkeypatch, extra, message):
  _fake_pipeline(monkeypatch)
  settings = {"type": "lexical_retrieval", "split": "val", **extra}
  with pytest.raises(ConfigError, match=message):
    _build({"lex": settings}, check_only=True)


def test_missing_prediction_functions_and_small_splits(monkeypatch):
  _fake_pipeline(monkeypatch, split_size=5)
  settings = {"type": "lexical_retrieval", "split": "val"}
  with pytest.raises(ConfigError, match="lexical_text"):
    _build({"lex": settings}, predict={"lexical_image": None}, check_only=True)
  with pytest.raises(ConfigError, match="fewer than"):  # R@10 over 5 images
    _build({"lex": settings}, check_only=True)
  with pytest.raises(ConfigError, match=r"misses \['split'\]"):
    _build({"lex": {"type": "lexical_retrieval"}}, check_only=True)
