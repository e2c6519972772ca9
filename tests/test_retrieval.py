import numpy as np
import pytest

from vlalign.evaluation import retrieval

K = 5  # captions per image


def _caption_maps(num_images: int, k: int = K) -> tuple[np.ndarray, np.ndarray]:
  """Caption t belongs to image t // k: `(txt2img [N*k], img2txt [N, k])`."""
  txt2img = np.repeat(np.arange(num_images), k).astype(np.int32)
  img2txt = np.arange(num_images * k, dtype=np.int32).reshape(num_images, k)
  return txt2img, img2txt


def _loop_reference(sim, txt2img, img2txt, ks=(1, 5, 10), ties="optimistic"):
  """Slow and plain: rank = how many candidates beat the ground truth, per the tie rule."""
  n_img, n_txt = sim.shape

  def beats(candidate, gt):
    return candidate > gt if ties == "optimistic" else candidate >= gt

  i2t_ranks = []
  for i in range(n_img):
    gts = [int(t) for t in img2txt[i] if t >= 0]
    ranks = []
    for g in gts:
      ranks.append(sum(1 for t in range(n_txt) if t not in gts and beats(sim[i, t], sim[i, g])))
    i2t_ranks.append(min(ranks))
  t2i_ranks = []
  for t in range(n_txt):
    g = int(txt2img[t])
    t2i_ranks.append(sum(1 for i in range(n_img) if i != g and beats(sim[i, t], sim[g, t])))
  out = {}
  for k in ks:
    out[f"i2t_r{k}"] = 100.0 * sum(r < k for r in i2t_ranks) / n_img
  for k in ks:
    out[f"t2i_r{k}"] = 100.0 * sum(r < k for r in t2i_ranks) / n_txt
  out["rsum"] = sum(out.values())
  return out


@pytest.mark.parametrize("ties", retrieval.TIE_RULES)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_loop_reference_on_random_matrices(seed, ties):
  rng = np.random.default_rng(seed)
  n_img = 24
  txt2img, img2txt = _caption_maps(n_img)
  sim = rng.normal(size=(n_img, n_img * K))
  sim[:, ::3] += 0.5 * (txt2img[::3] == np.arange(n_img)[:, None])  # some signal
  sim = np.round(sim, 1)  # coarse values: many ties, so the tie rule matters
  got = retrieval.retrieval_metrics(sim, txt2img, img2txt, ties=ties)
  want = _loop_reference(sim, txt2img, img2txt, ties=ties)
  assert got.keys() == want.keys()
  for key in want:
    assert got[key] == pytest.approx(want[key]), key
  assert 0 < got["rsum"] < 600  # neither trivial case


def test_perfect_diagonal_scores_100():
  n_img = 4
  txt2img, img2txt = _caption_maps(n_img)
  sim = (txt2img[None, :] == np.arange(n_img)[:, None]).astype(np.float32)
  got = retrieval.retrieval_metrics(sim, txt2img, img2txt)
  assert got == {
    **{f"{d}_r{k}": 100.0 for d in ("i2t", "t2i") for k in (1, 5, 10)},
    "rsum": 600.0,
  }


def test_reversed_ranking_scores_0():
  n_img = 12
  txt2img, img2txt = _caption_maps(n_img)
  sim = -(txt2img[None, :] == np.arange(n_img)[:, None]).astype(np.float32)
  sim += 1e-3 * np.arange(n_img * K)  # distinct scores; ground truth still last in every row
  got = retrieval.retrieval_metrics(sim, txt2img, img2txt)
  # i2t: 55 wrong captions beat all ground truths; t2i: 11 wrong images beat the right one.
  assert all(v == 0.0 for v in got.values())


def test_graded_ranks_give_known_recalls():
  # One caption per image; sim[i, j] = -((2i - j) mod N) puts the ground truth of image i at rank i
  # in its row and that of caption j at rank j in its column (2i mod N is a permutation, N odd).
  n = 21
  txt2img, img2txt = _caption_maps(n, k=1)
  i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
  sim = -((2 * i - j) % n).astype(np.float64)
  np.testing.assert_array_equal(retrieval.i2t_ranks(sim, img2txt), np.arange(n))
  np.testing.assert_array_equal(retrieval.t2i_ranks(sim, txt2img), np.arange(n))
  got = retrieval.retrieval_metrics(sim, txt2img, img2txt)
  for d in ("i2t", "t2i"):
    for k in (1, 5, 10):
      assert got[f"{d}_r{k}"] == pytest.approx(100.0 * k / n)
  assert got["rsum"] == pytest.approx(2 * 100.0 * 16 / n)


def test_an_image_whose_second_caption_is_the_only_hit_counts():
  n_img = 3
  txt2img, img2txt = _caption_maps(n_img)
  sim = np.random.default_rng(0).uniform(0.0, 0.5, size=(n_img, n_img * K))
  for i in range(n_img):
    sim[i, img2txt[i]] = -1.0  # every image's captions at the bottom of its row ...
  sim[0, img2txt[0, 1]] = 1.0  # ... except image 0's second caption, the top-scoring one
  np.testing.assert_array_equal(retrieval.i2t_ranks(sim, img2txt), [0, 10, 10])
  got = retrieval.retrieval_metrics(sim, txt2img, img2txt)
  for k in (1, 5, 10):
    assert got[f"i2t_r{k}"] == pytest.approx(100.0 / 3)


def test_missing_captions_are_marked_negative():
  txt2img = np.array([0, 0, 1], np.int32)
  img2txt = np.array([[0, 1], [2, -1]], np.int32)
  sim = np.array([[0.1, 0.9, 0.5], [0.8, 0.0, 0.7]])
  np.testing.assert_array_equal(retrieval.i2t_ranks(sim, img2txt), [0, 1])
  got = retrieval.retrieval_metrics(sim, txt2img, img2txt, ks=(1,))
  assert got == pytest.approx(_loop_reference(sim, txt2img, img2txt, ks=(1,)))
  assert got["i2t_r1"] == 50.0 and got["t2i_r1"] == pytest.approx(200.0 / 3)


def test_ties_follow_the_documented_rule():
  n_img = 3
  txt2img, img2txt = _caption_maps(n_img)
  constant = np.ones((n_img, n_img * K))  # a collapsed model
  optimistic = retrieval.retrieval_metrics(constant, txt2img, img2txt, ties="optimistic")
  pessimistic = retrieval.retrieval_metrics(constant, txt2img, img2txt, ties="pessimistic")
  assert optimistic["rsum"] == 600.0
  # Pessimistic: 10 wrong captions tie with image's best caption; 2 wrong images with each caption.
  assert pessimistic == {
    "i2t_r1": 0.0,
    "i2t_r5": 0.0,
    "i2t_r10": 0.0,
    "t2i_r1": 0.0,
    "t2i_r5": 100.0,
    "t2i_r10": 100.0,
    "rsum": 200.0,
  }
  # One wrong caption ties with the best ground truth, one ground truth ties with it too.
  sim = np.zeros((1, 4))
  sim[0, [0, 1, 2]] = 1.0
  one_image = (np.zeros(4, np.int32), np.array([[0, 1, 3]], np.int32))
  assert retrieval.i2t_ranks(sim, one_image[1], "optimistic")[0] == 0
  assert retrieval.i2t_ranks(sim, one_image[1], "pessimistic")[0] == 1  # only caption 2 beats it
  with pytest.raises(ValueError, match="tie rule"):
    retrieval.i2t_ranks(sim, one_image[1], "random")


def test_non_finite_similarities_give_nan_not_a_perfect_score():
  txt2img, img2txt = _caption_maps(2)
  sim = np.full((2, 2 * K), np.nan)
  got = retrieval.retrieval_metrics(sim, txt2img, img2txt)
  assert all(np.isnan(v) for v in got.values())
  with pytest.raises(ValueError, match="shape"):
    retrieval.retrieval_metrics(sim.T, txt2img, img2txt)


def _fake_eval_data(n_img: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
  txt2img, img2txt = _caption_maps(n_img)
  length = 6
  mask = (np.arange(length)[None] < rng.integers(2, length + 1, size=(n_img * K, 1))).astype(
    np.int32
  )
  return {
    "images": rng.normal(size=(n_img, 4, 4, 3)).astype(np.float32),
    "text_ids": (rng.integers(1, 20, size=(n_img * K, length)) * mask).astype(np.int32),
    "text_mask": mask,
    "txt2img": txt2img,
    "img2txt": img2txt,
  }


class _FakeEncoders:
  """Fixed random linear maps + L2 normalisation; records the batch sizes it was called with."""

  def __init__(self, embed_dim: int = 8, vocab: int = 20, seed: int = 0):
    rng = np.random.default_rng(seed)
    self.image_map = rng.normal(size=(4 * 4 * 3, embed_dim)).astype(np.float32)
    self.token_table = rng.normal(size=(vocab, embed_dim)).astype(np.float32)
    self.batch_sizes = []

  @staticmethod
  def _normalise(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)

  def image(self, params, images):
    self.batch_sizes.append(len(images))
    return self._normalise(params * images.reshape(len(images), -1) @ self.image_map)

  def text(self, params, ids, mask):
    self.batch_sizes.append(len(ids))
    return self._normalise(params * np.einsum("bl,ble->be", mask, self.token_table[ids]))


def test_evaluator_batches_with_padding_match_one_big_batch():
  rng = np.random.default_rng(0)
  data = _fake_eval_data(n_img=7, rng=rng)  # 7 images, 35 captions: neither divides 4
  enc = _FakeEncoders()
  evaluator = retrieval.RetrievalEvaluator(
    "val", enc.image, enc.text, data, batch_size=4, every_steps=10
  )
  params = 1.5
  images = evaluator.embed_images(params)
  texts = evaluator.embed_texts(params)
  assert set(enc.batch_sizes) == {4}  # one shape only, so one compilation
  np.testing.assert_allclose(images, enc.image(params, data["images"]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    texts, enc.text(params, data["text_ids"], data["text_mask"]), rtol=1e-5, atol=1e-6
  )
  got = evaluator.run(params)
  want = _loop_reference(images @ texts.T, data["txt2img"], data["img2txt"])
  assert got == pytest.approx(want)
  assert evaluator.name == "val" and evaluator.every_steps == 10


def test_embed_in_batches_accepts_device_arrays_and_checks_shapes():
  import jax.numpy as jnp

  x = np.arange(10, dtype=np.float32).reshape(5, 2)
  out = retrieval.embed_in_batches(lambda p, a: jnp.asarray(a) * p, 2.0, (x,), batch_size=3)
  assert isinstance(out, np.ndarray) and out.dtype == np.float32
  np.testing.assert_array_equal(out, 2.0 * x)
  with pytest.raises(ValueError, match="expected"):
    retrieval.embed_in_batches(lambda p, a: a[:1], None, (x,), batch_size=3)


def test_evaluator_rejects_inconsistent_caption_maps():
  rng = np.random.default_rng(0)
  data = _fake_eval_data(n_img=3, rng=rng)
  data["txt2img"] = data["txt2img"][::-1].copy()
  enc = _FakeEncoders()
  with pytest.raises(ValueError, match="another image"):
    retrieval.RetrievalEvaluator("val", enc.image, enc.text, data, batch_size=4, every_steps=0)


def _fake_pipeline(monkeypatch):
  """Puts a fake `vlalign.data.pipeline` in place; returns the calls it records."""
  import sys
  import types

  import vlalign.data

  calls = []

  def make_eval_data(data_config, tokenizer, split):
    calls.append(("eval", split))
    return _fake_eval_data(3, np.random.default_rng(0))

  def make_zeroshot_data(data_config, split, task_name):
    calls.append(("zeroshot", split, task_name))
    return {
      "images": np.zeros((4, 4, 4, 3), np.float32),
      "labels": np.array([0, 1, 0, 1], np.int32),
      "class_names": ["a", "b"],
      "templates": ["{}"],
    }

  fake = types.SimpleNamespace(
    make_eval_data=make_eval_data,
    make_zeroshot_data=make_zeroshot_data,
    split_size=lambda config, split: 10,  # enough images for R@10 (checked by the builders)
    eval_text_len=lambda config: config["max_len"],
  )
  monkeypatch.setitem(sys.modules, "vlalign.data.pipeline", fake)
  monkeypatch.setattr(vlalign.data, "pipeline", fake, raising=False)
  return calls


def _build(evals):
  import ml_collections

  from vlalign import evaluation

  enc = _FakeEncoders()
  return evaluation.build_evaluators(
    ml_collections.ConfigDict(evals),
    predict={"encode_image": enc.image, "encode_text": enc.text},
    tokenizer=None,
    data_config=ml_collections.ConfigDict({"max_len": 6}),
    default_batch_size=8,
  )


def test_build_evaluators_from_config(monkeypatch):
  calls = _fake_pipeline(monkeypatch)
  evaluators = _build(
    {
      "val": {"type": "retrieval", "split": "val", "every_steps": 500},
      "zeroshot_color": {"type": "zeroshot", "split": "test", "task": "color", "batch_size": 2},
    }
  )
  assert list(evaluators) == ["val", "zeroshot_color"]
  assert calls == [("eval", "val"), ("zeroshot", "test", "color")]
  val, zs = evaluators["val"], evaluators["zeroshot_color"]
  assert isinstance(val, retrieval.RetrievalEvaluator)
  assert (val.name, val.every_steps, val.batch_size) == ("val", 500, 8)
  assert (zs.name, zs.every_steps, zs.batch_size, zs.max_len) == ("zeroshot_color", 0, 2, 6)
  assert set(val.run(1.0)) == {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"}


def test_build_evaluators_errors(monkeypatch):
  _fake_pipeline(monkeypatch)
  with pytest.raises(
    ValueError,
    match=r"unknown type 'segmentation'.*\['codebook', 'lexical_retrieval', 'lexical_words', "
    r"'patchdis', 'retrieval', 'retrieval_itm', 'zeroshot'\]",
  ):
    _build({"p": {"type": "segmentation", "split": "val"}})
  with pytest.raises(ValueError, match=r"unknown type None"):
    _build({"p": {"split": "val"}})
  with pytest.raises(ValueError, match=r"misses \['task'\]"):
    _build({"z": {"type": "zeroshot", "split": "test"}})
  with pytest.raises(ValueError, match=r"unknown fields \['evry_steps'\]"):
    _build({"v": {"type": "retrieval", "split": "val", "evry_steps": 5}})


class _CountingRows:
  """A lazy row source (as `pipeline.ImageRows`): `rows[idx]` is `values[idx]`, recorded."""

  def __init__(self, values):
    self.values, self.num_images, self.asked = values, len(values), []

  def __len__(self):
    return self.num_images

  def __getitem__(self, rows):
    self.asked.append(np.asarray(rows).tolist())
    return self.values[rows]


def test_embed_in_batches_loads_only_the_rows_of_this_process():
  """With `process_rows` (as `sharding.host_fn` gives) telling that this process holds half of
  each batch, only those rows are taken, once each, and passed as `ProcessRows`."""
  from vlalign.sharding import ProcessRows

  values = np.arange(10, dtype=np.float32)[:, None]
  rows = _CountingRows(values)
  passed = []

  def encode(params, batch):
    passed.append(batch)
    return np.zeros((4, 1), np.float32)  # a host_fn gathers every process's rows

  encode.process_rows = lambda n: np.arange(n // 2, n)  # the second half of each batch
  out = retrieval.embed_in_batches(encode, None, (rows,), batch_size=4)
  assert out.shape == (10, 1)
  assert all(isinstance(b, ProcessRows) and b.num_rows == 4 for b in passed)
  # Batches [0..3], [4..7], [8, 9, 9, 9] (padded with the last row): positions 2 and 3 of each.
  assert rows.asked == [[2, 3], [6, 7], [9]]
  assert [b.local[:, 0].tolist() for b in passed] == [[2, 3], [6, 7], [9, 9]]
  encode.process_rows = np.arange  # this process holds every row: plain arrays, as before
  passed.clear()
  retrieval.embed_in_batches(encode, None, (values,), batch_size=4)
  assert all(isinstance(b, np.ndarray) and len(b) == 4 for b in passed)


def test_embed_in_batches_of_chosen_rows_and_lazy_rows_equal_arrays():
  values = np.random.default_rng(0).normal(size=(9, 3)).astype(np.float32)
  rows = _CountingRows(values)
  encode = lambda p, x: x * p  # noqa: E731
  whole = retrieval.embed_in_batches(encode, 2.0, (values,), batch_size=4)
  np.testing.assert_array_equal(retrieval.embed_in_batches(encode, 2.0, (rows,), 4), whole)
  assert rows.asked == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]  # the padding is not decoded again
  some = retrieval.embed_in_batches(encode, 2.0, (rows,), 4, rows=np.array([7, 1, 5]))
  np.testing.assert_array_equal(some, whole[[7, 1, 5]])
  with pytest.raises(ValueError, match="at least one row"):
    retrieval.embed_in_batches(encode, 2.0, (values,), 4, rows=np.array([], np.int64))
  assert retrieval.unreadable_images(values).tolist() == []  # an in-memory array reads whole
