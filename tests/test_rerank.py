import dataclasses
import sys
import types

import numpy as np
import pytest

from vlalign import evaluation
from vlalign.evaluation import rerank, retrieval

K = 2  # captions per image


def _caption_maps(num_images: int) -> tuple[np.ndarray, np.ndarray]:
  """Caption t belongs to image t // K."""
  txt2img = np.repeat(np.arange(num_images), K).astype(np.int32)
  img2txt = np.arange(num_images * K, dtype=np.int32).reshape(num_images, K)
  return txt2img, img2txt


def _eval_data(num_images: int, length: int = 3) -> dict[str, np.ndarray]:
  """Images and captions that carry their own index (pixel value / first token id)."""
  txt2img, img2txt = _caption_maps(num_images)
  num_texts = len(txt2img)
  ids = np.zeros((num_texts, length), np.int32)
  ids[:, 0] = np.arange(num_texts)
  mask = np.ones((num_texts, length), np.int32)
  mask[::2, -1] = 0
  images = np.broadcast_to(
    np.arange(num_images, dtype=np.float32)[:, None, None, None], (num_images, 2, 2, 3)
  ).copy()
  return {
    "images": images,
    "text_ids": ids,
    "text_mask": mask,
    "txt2img": txt2img,
    "img2txt": img2txt,
  }


class _FakeModel:
  """A model whose ITC similarity is `params * sim` and whose ITM score is `itm[i, t]`.

  Image i embeds as `params * sim[i]` and caption t as the one-hot `e_t`, so `img @ txt.T = sim`.
  The tokens carry the indices, so the ITM fake can look the pair up. Records every batch.
  """

  def __init__(self, sim: np.ndarray, itm: np.ndarray):
    self.sim = np.asarray(sim, np.float32)
    self.itm = np.asarray(itm, np.float32)
    self.encode_batches = []
    self.itm_batches = []
    self.itm_pairs = []

  def image(self, params, images):
    self.encode_batches.append(len(images))
    index = images[:, 0, 0, 0].astype(int)
    tokens = np.repeat(index[:, None, None], 3, axis=1).astype(np.float32)  # [B, T=3, Di=1]
    return params * self.sim[index], tokens

  def text(self, params, ids, mask):
    self.encode_batches.append(len(ids))
    index = ids[:, 0]
    tokens = (
      np.repeat(index[:, None, None], ids.shape[1], axis=1).astype(np.float32) * mask[..., None]
    )
    return np.eye(self.sim.shape[1], dtype=np.float32)[index], tokens

  def itm_score(self, params, image_tokens, text_tokens, text_mask):
    assert image_tokens.shape[1:] == (3, 1) and text_tokens.shape[:2] == text_mask.shape
    self.itm_batches.append(len(image_tokens))
    images = image_tokens[:, 0, 0].astype(int)
    texts = text_tokens[:, 0, 0].astype(int)
    self.itm_pairs.extend(zip(images.tolist(), texts.tolist()))
    return self.itm[images, texts]


def _evaluator(model, num_images, batch_size=4, k=3, ties="pessimistic"):
  return rerank.RerankRetrievalEvaluator(
    "val",
    model.image,
    model.text,
    model.itm_score,
    _eval_data(num_images),
    batch_size=batch_size,
    every_steps=7,
    k=k,
    ties=ties,
  )


def _match_indicator(num_images: int) -> np.ndarray:
  txt2img, _ = _caption_maps(num_images)
  return (txt2img[None, :] == np.arange(num_images)[:, None]).astype(np.float32)


def _random_case(seed: int, num_images: int = 5, itm_scale: float = 1.0):
  rng = np.random.default_rng(seed)
  sim = rng.uniform(-1, 1, size=(num_images, num_images * K)).astype(np.float32)
  itm = (itm_scale * rng.normal(size=sim.shape)).astype(np.float32)
  return sim, itm


def _loop_reranked(sim, itm, k):
  """Slow reference of both score matrices: ITM on each row's top-k, ITC order below a floor."""

  def one_direction(rows, itm_rows):
    rows = np.asarray(rows, np.float64)
    num_rows, num_cols = rows.shape
    top = [
      sorted(range(num_cols), key=lambda c: -rows[r, c])[: min(k, num_cols)]
      for r in range(num_rows)
    ]
    floor = min(-100.0, min(float(itm_rows[r, c]) for r in range(num_rows) for c in top[r]) - 1.0)
    out = np.zeros((num_rows, num_cols))
    for r in range(num_rows):
      for c in range(num_cols):
        if c in top[r]:
          out[r, c] = itm_rows[r, c]
        else:
          out[r, c] = floor - (max(rows[r]) - rows[r, c])
    return out, top

  return one_direction(sim, itm), one_direction(sim.T, itm.T)


def _loop_recalls(scores, gts_of_row, ties, ks=(1, 5, 10)):
  """Recall@k of one direction: rank = wrong candidates beating the best ground truth."""
  hits = {r: 0 for r in ks}
  for row, gts in zip(scores, gts_of_row):
    best = max(row[g] for g in gts)
    beaten = [
      c
      for c in range(len(row))
      if c not in gts and (row[c] > best or (ties == "pessimistic" and row[c] == best))
    ]
    for r in ks:
      hits[r] += len(beaten) < r
  return {r: 100.0 * hits[r] / len(scores) for r in ks}


def test_oracle_itm_fixes_an_itc_ranking_with_the_truth_second():
  n = 5
  txt2img, _ = _caption_maps(n)
  # Each image's captions score 0.9 with it, image (i+1)'s captions 1.0, others below 0.5.
  rng = np.random.default_rng(0)
  sim = rng.uniform(0, 0.5, size=(n, n * K))
  sim[np.arange(n)[:, None] == txt2img[None]] = 0.9
  sim[(np.arange(n)[:, None] + 1) % n == txt2img[None]] = 1.0
  model = _FakeModel(sim, _match_indicator(n))
  got = _evaluator(model, n, k=4).run(1.0)
  assert got["itc_i2t_r1"] == 0.0 and got["itc_t2i_r1"] == 0.0
  assert got["itc_i2t_r5"] == 100.0 and got["itc_t2i_r5"] == 100.0
  assert got["i2t_r1"] == 100.0 and got["t2i_r1"] == 100.0
  assert got["rsum"] == 600.0
  assert set(got) == {
    f"{p}{d}_r{r}" for p in ("", "itc_") for d in ("i2t", "t2i") for r in (1, 5, 10)
  } | {"rsum", "itc_rsum"}
  # ITC metrics equal those of the plain retrieval evaluator; pairs scored once each.
  assert {k[4:]: v for k, v in got.items() if k.startswith("itc_")} == pytest.approx(
    retrieval.retrieval_metrics(sim.astype(np.float32), *_caption_maps(n))
  )
  # Each pair of the union of both directions' top-k is scored once (plus batch padding).
  (_, top_i2t), (_, top_t2i) = _loop_reranked(sim, _match_indicator(n), 4)
  union = {(i, t) for i, ts in enumerate(top_i2t) for t in ts}
  union |= {(i, t) for t, its in enumerate(top_t2i) for i in its}
  assert set(model.itm_pairs) == union and len(union) < n * 4 + n * K * 4
  assert len(model.itm_pairs) == 4 * -(-len(union) // 4)


@pytest.mark.parametrize("ties", retrieval.TIE_RULES)
@pytest.mark.parametrize("seed", [0, 1])
def test_k1_keeps_the_itc_order(seed, ties):
  sim, itm = _random_case(seed, itm_scale=50.0)
  model = _FakeModel(sim, itm)
  got = _evaluator(model, 5, k=1, ties=ties).run(1.0)
  for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"):
    assert got[key] == pytest.approx(got[f"itc_{key}"]), key


@pytest.mark.parametrize("k", [1, 3, 100])
def test_candidates_outside_topk_never_outrank_those_inside(k):
  sim, itm = _random_case(2, num_images=6, itm_scale=300.0)  # Some ITM scores below -100.
  assert itm.min() < -100
  model = _FakeModel(sim, itm)
  _, i2t, t2i = _evaluator(model, 6, k=k).score_matrices(1.0)
  for scores, rows in ((i2t, sim), (t2i, sim.T)):
    for score_row, sim_row in zip(scores, rows):
      top = np.argsort(-sim_row)[: min(k, len(sim_row))]
      rest = np.setdiff1d(np.arange(len(sim_row)), top)
      if len(rest):
        assert score_row[top].min() > score_row[rest].max()
        # Outside the top-k, the ITC order is kept.
        np.testing.assert_array_equal(np.argsort(score_row[rest]), np.argsort(sim_row[rest]))


@pytest.mark.parametrize("k", [2, 4])
def test_matrices_and_metrics_match_a_loop_reference(k):
  sim, itm = _random_case(3, num_images=5, itm_scale=3.0)
  model = _FakeModel(sim, itm)
  evaluator = _evaluator(model, 5, batch_size=4, k=k)
  _, i2t, t2i = evaluator.score_matrices(1.0)
  (want_i2t, _), (want_t2i, _) = _loop_reranked(sim, itm, k)
  np.testing.assert_allclose(i2t, want_i2t, rtol=0, atol=1e-12)
  np.testing.assert_allclose(t2i, want_t2i, rtol=0, atol=1e-12)
  txt2img, img2txt = _caption_maps(5)
  got = evaluator.run(1.0)
  for ties in retrieval.TIE_RULES:
    metrics = rerank.rerank_metrics(i2t, t2i, txt2img, img2txt, ties=ties)
    i2t_want = _loop_recalls(want_i2t, [list(g) for g in img2txt], ties)
    t2i_want = _loop_recalls(want_t2i, [[g] for g in txt2img], ties)
    for r in (1, 5, 10):
      assert metrics[f"i2t_r{r}"] == pytest.approx(i2t_want[r])
      assert metrics[f"t2i_r{r}"] == pytest.approx(t2i_want[r])
    if ties == "pessimistic":
      assert {key: got[key] for key in metrics} == pytest.approx(metrics)


def test_recalls_up_to_k_equal_albefs_constant_fill():
  """ALBEF fills -100 outside the top-k; with ITM scores above -100, R@r for r <= k agree."""
  k = 5
  sim, itm = _random_case(4, num_images=6, itm_scale=3.0)
  txt2img, img2txt = _caption_maps(6)
  (i2t, top_i2t), (t2i, top_t2i) = _loop_reranked(sim, itm, k)

  def albef(itm_rows, top):
    out = np.full(itm_rows.shape, -100.0)
    for r, cols in enumerate(top):
      out[r, cols] = itm_rows[r, cols]
    return out

  ref = rerank.rerank_metrics(
    albef(itm, top_i2t), albef(itm.T, top_t2i), txt2img, img2txt, ks=(1, 5)
  )
  ours = rerank.rerank_metrics(i2t, t2i, txt2img, img2txt, ks=(1, 5))
  assert ours == pytest.approx(ref)


def test_pair_batching_with_padding_matches_one_big_batch():
  sim, itm = _random_case(5, num_images=5)
  small = _FakeModel(sim, itm)
  big = _FakeModel(sim, itm)
  _, i2t_small, t2i_small = _evaluator(small, 5, batch_size=4, k=3).score_matrices(1.0)
  _, i2t_big, t2i_big = _evaluator(big, 5, batch_size=64, k=3).score_matrices(1.0)
  assert set(small.itm_batches) == {4} and set(small.encode_batches) == {4}  # one shape each
  assert big.itm_batches == [64] and len(set(big.itm_pairs)) % 4 != 0  # padding was needed
  np.testing.assert_array_equal(i2t_small, i2t_big)
  np.testing.assert_array_equal(t2i_small, t2i_big)
  # score_pairs_in_batches on its own, against a direct lookup.
  image_tokens = np.arange(5, dtype=np.float32)[:, None, None] * np.ones((1, 3, 1), np.float32)
  text_tokens = np.arange(10, dtype=np.float32)[:, None, None] * np.ones((1, 4, 1), np.float32)
  images, texts = np.array([4, 0, 2, 2, 1]), np.array([9, 3, 0, 5, 5])
  scores = rerank.score_pairs_in_batches(
    small.itm_score, None, image_tokens, text_tokens, np.ones((10, 4)), images, texts, 2
  )
  np.testing.assert_array_equal(scores, itm[images, texts])


def test_embeddings_are_computed_once_and_split_correctly():
  sim, itm = _random_case(6, num_images=5)
  model = _FakeModel(sim, itm)
  evaluator = _evaluator(model, 5, batch_size=4)
  emb, tokens = evaluator.encode_texts(2.0)
  data = _eval_data(5)
  want_emb, want_tokens = model.text(2.0, data["text_ids"], data["text_mask"])
  np.testing.assert_array_equal(emb, want_emb)
  np.testing.assert_array_equal(tokens, want_tokens)
  model.encode_batches.clear()
  evaluator.run(1.0)
  assert len(model.encode_batches) == 2 + 3  # ceil(5 / 4) image + ceil(10 / 4) text batches


def test_non_finite_similarities_give_nan_without_itm_calls():
  sim, itm = _random_case(7)
  sim[1, 3] = np.nan
  model = _FakeModel(sim, itm)
  got = _evaluator(model, 5).run(1.0)
  assert len(got) == 14 and all(np.isnan(v) for v in got.values())
  assert model.itm_batches == []
  sim, itm = _random_case(7)
  itm[:] = np.nan
  got = _evaluator(_FakeModel(sim, itm), 5).run(1.0)
  assert all(np.isnan(got[key]) for key in ("i2t_r1", "t2i_r10", "rsum"))
  assert not np.isnan(got["itc_rsum"])


def test_bad_itm_and_encoder_outputs_are_rejected():
  sim, itm = _random_case(8)
  model = _FakeModel(sim, itm)
  evaluator = _evaluator(model, 5)
  evaluator._itm_score = lambda p, a, b, c: np.zeros((len(a), 2))
  with pytest.raises(ValueError, match="itm_score_fn returned"):
    evaluator.run(1.0)
  evaluator._encode_image = lambda p, x: (np.zeros((len(x), 4)), np.zeros((len(x), 4)))
  with pytest.raises(ValueError, match=r"expected \[B, E\] and \[B, T, D\]"):
    evaluator.run(1.0)
  for k in (0, -1, 2.5, True):
    with pytest.raises(ValueError, match="k must be a positive int"):
      _evaluator(model, 5, k=k)


# --- building from config -------------------------------------------------------------------


def _fake_pipeline(monkeypatch):
  import vlalign.data

  calls = []

  def make_eval_data(data_config, tokenizer, split):
    calls.append(split)
    return _eval_data(4)

  # The builders first check that the split has enough images for R@10 (`split_size`).
  fake = types.SimpleNamespace(make_eval_data=make_eval_data, split_size=lambda config, split: 10)
  monkeypatch.setitem(sys.modules, "vlalign.data.pipeline", fake)
  monkeypatch.setattr(vlalign.data, "pipeline", fake, raising=False)
  return calls


def _predict(model):
  return {
    "encode_image_tokens": model.image,
    "encode_text_tokens": model.text,
    "itm_score": model.itm_score,
  }


def _context(model):
  return evaluation.EvalContext(
    predict=_predict(model), tokenizer=None, data_config={"max_len": 3}, default_batch_size=8
  )


def test_build_from_config(monkeypatch):
  import ml_collections

  calls = _fake_pipeline(monkeypatch)
  model = _FakeModel(*_random_case(9, num_images=4))
  builder = evaluation.EVALUATORS.get("retrieval_itm")
  settings = ml_collections.ConfigDict(
    {"type": "retrieval_itm", "split": "test", "every_steps": 100, "k": 4, "ties": "optimistic"}
  ).to_dict()
  ev = builder("val_itm", settings, _context(model))
  assert isinstance(ev, rerank.RerankRetrievalEvaluator) and calls == ["test"]
  assert (ev.name, ev.every_steps, ev.batch_size, ev.k, ev.ties) == (
    "val_itm",
    100,
    8,
    4,
    "optimistic",
  )
  defaults = builder(
    "d", {"type": "retrieval_itm", "split": "val", "batch_size": 2}, _context(model)
  )
  assert (defaults.every_steps, defaults.batch_size, defaults.k, defaults.ties) == (
    0,
    2,
    16,
    "pessimistic",
  )
  assert "itc_rsum" in ev.run(1.0)


def test_build_errors(monkeypatch):
  _fake_pipeline(monkeypatch)
  model = _FakeModel(*_random_case(9, num_images=4))
  builder = evaluation.EVALUATORS.get("retrieval_itm")
  ctx = _context(model)
  with pytest.raises(ValueError, match=r"misses \['split'\]"):
    builder("v", {"type": "retrieval_itm", "k": 4}, ctx)
  with pytest.raises(ValueError, match=r"unknown fields \['top_k'\]"):
    builder("v", {"type": "retrieval_itm", "split": "val", "top_k": 4}, ctx)
  with pytest.raises(ValueError, match="k must be a positive int"):
    builder("v", {"type": "retrieval_itm", "split": "val", "k": 0}, ctx)
  with pytest.raises(ValueError, match="unknown tie rule"):
    builder("v", {"type": "retrieval_itm", "split": "val", "ties": "random"}, ctx)
  no_itm_predict = {k: v for k, v in _predict(model).items() if k != "itm_score"}
  no_itm = dataclasses.replace(ctx, predict=no_itm_predict)
  with pytest.raises(ValueError, match=r"a model with an ITM head.*'itm_score'"):
    builder("v", {"type": "retrieval_itm", "split": "val"}, no_itm)
  # A two-tower method's functions only: the same clear error.
  with pytest.raises(ValueError, match="a model with an ITM head"):
    evaluation.build_evaluators(
      {"v": {"type": "retrieval_itm", "split": "val"}},
      predict={"encode_image": model.image, "encode_text": model.text},
      tokenizer=None,
      data_config={"max_len": 3},
      default_batch_size=8,
    )
