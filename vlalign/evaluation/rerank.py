"""Image-text retrieval re-ranked by an ITM head: the ALBEF / TCL evaluation protocol.

Two stages, as in `evaluation()` of `Retrieval.py` in salesforce/ALBEF (commit b9727e4) and in
uta-smile/TCL (commit 74a3e4f, the same function unchanged):

1. ITC. Every image and caption is encoded once; `sim = img_emb @ txt_emb.T` (`[N_img, N_txt]`)
   ranks all candidates. Its metrics are returned as `itc_i2t_r1`, ..., `itc_rsum`.
2. ITM. For each image, its `k` most similar captions by `sim` are scored again by the fusion
   encoder + ITM head on the pair (image tokens, caption tokens); for each caption, its `k` most
   similar images likewise. These give two score matrices, `i2t [N_img, N_txt]` and
   `t2i [N_txt, N_img]`, ranked with `retrieval_metrics` (`i2t_r1`, ..., `rsum`; the i2t recalls
   from `i2t`, the t2i recalls from `t2i`).

What the references put in the score matrices (checked in the sources above): the RAW ITM logit
of the "match" class, `itm_head(fused_cls)[:, 1]`, with no softmax and no ITC similarity added,
in the top-k entries, and the constant -100 everywhere else. (BLIP's `train_retrieval.py`,
salesforce/BLIP commit 056a169, differs here: it stores `itm_logit + topk_sim`.) The ITM scores
here are the raw `itm_score_fn` outputs, as in ALBEF/TCL.

One deliberate difference outside the top-k: instead of a constant -100, a candidate outside a
row's top-k scores `floor - (max(sim_row) - sim)`, with `floor = min(-100, min ITM score - 1)`.
So (a) every top-k candidate still outranks every other one, even for ITM scores below -100; and
(b) the candidates outside the top-k keep their ITC order instead of tying. The order inside the
top-k is therefore ALBEF's exactly, and every recall R@r with r <= k equals the reference's. Only
R@r with r > k differs: there the reference's answer depends on how its sort breaks a tie of
-100s, and ours is the ITC order. With `k=1` the re-ranked metrics equal the ITC ones.

Top-k: a row's `min(k, n_candidates)` highest similarities (`np.argpartition`; a tie at the k-th
place is broken arbitrarily, as `torch.topk` does). A pair found from both sides (a caption in its
image's top-k and that image in the caption's top-k) is scored once and used in both matrices.

Cost: at most `N_img * k + N_txt * k` fusion-encoder forward passes (ITM pair scorings), run in
fixed-size batches of `batch_size` pairs (the last one padded, so one shape compiles). With COCO
5k test (5,000 images, 25,000 captions) and ALBEF's `k_test=256` that is up to 7.7M pairs, far
more than the encoding of the split; keep `k` small for periodic evaluations during training.
The image and caption tokens of the whole split (`[N_img, T, Di]`, `[N_txt, L, Dt]`) are kept on
the host in float32, and the two score matrices in float64.

A similarity matrix with NaN or infinity makes every metric NaN (no ITM pass is run); so does a
non-finite ITM score (the metrics of `retrieval_metrics` on a non-finite matrix).
"""

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from vlalign.errors import ConfigError
from vlalign.evaluation.common import EVALUATORS, EvalContext, check_keys
from vlalign.evaluation.retrieval import (
  _CHUNK_ROWS,
  RetrievalEvaluator,
  checked_split,
  embed_in_batches,
  log_unreadable,
  retrieval_metrics,
)

# The score of a candidate outside the top-k in ALBEF / TCL (the ceiling of ours, see above).
REFERENCE_FILL = -100.0

# The method's prediction functions this evaluator needs (`Method.predict_fns`).
PREDICT_FNS = ("encode_image_tokens", "encode_text_tokens", "itm_score")

EncodeWithTokensFn = Callable[..., tuple[Any, Any]]
ItmScoreFn = Callable[[Any, np.ndarray, np.ndarray, np.ndarray], Any]
PairScorer = Callable[[np.ndarray, np.ndarray], np.ndarray]


def embed_with_tokens(
  encode_fn: EncodeWithTokensFn, params: Any, arrays: Sequence[np.ndarray], batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
  """Runs `encode_fn(params, *batch) -> (emb, tokens)` over fixed-size batches of `arrays`.

  Batching and padding are `embed_in_batches`'s (one shape, padded rows dropped).

  Args:
    encode_fn: `(params, *[batch_size, ...] arrays) -> (emb [batch_size, E], tokens
      [batch_size, T, D])`.
    params: passed through to `encode_fn` untouched.
    arrays: arrays with the same leading size `N >= 1`.
    batch_size: rows per call.

  Returns:
    `(emb [N, E], tokens [N, T, D])`, float32 host arrays.
  """
  token_shape = []

  def flat_fn(p: Any, *batch: np.ndarray) -> np.ndarray:
    emb, tokens = jax.device_get(encode_fn(p, *batch))
    emb, tokens = np.asarray(emb, np.float32), np.asarray(tokens, np.float32)
    if emb.ndim != 2 or tokens.ndim != 3 or len(tokens) != len(emb):
      raise ValueError(
        f"encode_fn returned emb {emb.shape} and tokens {tokens.shape}; expected [B, E] and "
        "[B, T, D]"
      )
    token_shape[:] = tokens.shape[1:]
    return np.concatenate([emb, tokens.reshape(len(tokens), -1)], axis=1)

  flat_fn.process_rows = getattr(encode_fn, "process_rows", None)  # Same rows as encode_fn.
  flat = embed_in_batches(flat_fn, params, arrays, batch_size)  # [N, E + T * D]
  embed_dim = flat.shape[1] - math.prod(token_shape)
  return flat[:, :embed_dim], flat[:, embed_dim:].reshape(len(flat), *token_shape)


def topk_candidates(scores: np.ndarray, k: int) -> np.ndarray:
  """Column indices of each row's `min(k, C)` highest scores, in no particular order.

  Args:
    scores: `[R, C]`.
    k: candidates per row, >= 1.

  Returns:
    `[R, min(k, C)]` int64.
  """
  num_rows, num_cols = scores.shape
  k = min(k, num_cols)
  if k == num_cols:
    return np.broadcast_to(np.arange(num_cols), (num_rows, num_cols)).copy()
  out = np.empty((num_rows, k), np.int64)
  for start in range(0, num_rows, _CHUNK_ROWS):  # Bounds the [rows, C] int64 temporary.
    rows = slice(start, start + _CHUNK_ROWS)
    out[rows] = np.argpartition(-scores[rows], k - 1, axis=1)[:, :k]
  return out


def reranked_matrix(
  sim: np.ndarray, candidates: np.ndarray, candidate_scores: np.ndarray
) -> np.ndarray:
  """One direction's score matrix: ITM scores on the candidates, ITC order below them.

  Args:
    sim: `[R, C]` ITC similarities, one row per query.
    candidates: `[R, k]` column indices of each row's re-scored candidates.
    candidate_scores: `[R, k]` their ITM scores.

  Returns:
    `[R, C]` float64: `candidate_scores` at `candidates`; elsewhere
    `floor - (max(sim_row) - sim)` with `floor = min(-100, min(candidate_scores) - 1)`.
  """
  sim = np.asarray(sim, np.float64)
  candidate_scores = np.asarray(candidate_scores, np.float64)
  floor = np.minimum(REFERENCE_FILL, candidate_scores.min() - 1.0)  # NaN stays NaN.
  scores = floor - (sim.max(axis=1, keepdims=True) - sim)
  np.put_along_axis(scores, candidates, candidate_scores, axis=1)
  return scores


def reranked_matrices(
  sim: np.ndarray, score_pairs: PairScorer, k: int
) -> tuple[np.ndarray, np.ndarray]:
  """Both re-ranked score matrices of the ALBEF protocol (see the module docstring).

  Args:
    sim: `[N_img, N_txt]` ITC similarities.
    score_pairs: `(image_index [P], text_index [P]) -> [P]` ITM scores of the pairs.
    k: candidates re-scored per query.

  Returns:
    `(i2t [N_img, N_txt], t2i [N_txt, N_img])` float64 score matrices.
  """
  sim = np.asarray(sim)
  num_images, num_texts = sim.shape
  texts_of_image = topk_candidates(sim, k)  # [N_img, k_t]
  images_of_text = topk_candidates(sim.T, k)  # [N_txt, k_i]
  pair_image = np.concatenate(
    [np.repeat(np.arange(num_images), texts_of_image.shape[1]), images_of_text.ravel()]
  )
  pair_text = np.concatenate(
    [texts_of_image.ravel(), np.repeat(np.arange(num_texts), images_of_text.shape[1])]
  )
  unique_pairs, inverse = np.unique(pair_image * num_texts + pair_text, return_inverse=True)
  unique_scores = np.asarray(score_pairs(unique_pairs // num_texts, unique_pairs % num_texts))
  if unique_scores.shape != unique_pairs.shape:
    raise ValueError(f"score_pairs returned {unique_scores.shape}; expected {unique_pairs.shape}")
  scores = unique_scores[inverse.ravel()]
  split = texts_of_image.size
  i2t = reranked_matrix(sim, texts_of_image, scores[:split].reshape(texts_of_image.shape))
  t2i = reranked_matrix(sim.T, images_of_text, scores[split:].reshape(images_of_text.shape))
  return i2t, t2i


def score_pairs_in_batches(
  itm_score_fn: ItmScoreFn,
  params: Any,
  image_tokens: np.ndarray,
  text_tokens: np.ndarray,
  text_mask: np.ndarray,
  image_index: np.ndarray,
  text_index: np.ndarray,
  batch_size: int,
) -> np.ndarray:
  """ITM scores of the pairs `(image_index[p], text_index[p])`, `batch_size` pairs per call.

  Args:
    itm_score_fn: `(params, image_tokens [n, T, Di], text_tokens [n, L, Dt], text_mask [n, L])
      -> [n]`.
    params: passed through to `itm_score_fn` untouched.
    image_tokens: `[N_img, T, Di]` of the whole split.
    text_tokens: `[N_txt, L, Dt]` of the whole split.
    text_mask: `[N_txt, L]`.
    image_index: `[P]` int, P >= 1.
    text_index: `[P]` int.
    batch_size: pairs per call; the last batch is padded by repeating its last pair.

  Returns:
    `[P]` float32 scores.
  """

  def batch_fn(p: Any, images: np.ndarray, texts: np.ndarray) -> np.ndarray:
    out = np.asarray(
      jax.device_get(itm_score_fn(p, image_tokens[images], text_tokens[texts], text_mask[texts]))
    )
    if out.shape != images.shape:
      raise ValueError(f"itm_score_fn returned shape {out.shape}; expected [{len(images)}]")
    return out[:, None]

  return embed_in_batches(batch_fn, params, (image_index, text_index), batch_size)[:, 0]


def rerank_metrics(
  i2t: np.ndarray,
  t2i: np.ndarray,
  txt2img: np.ndarray,
  img2txt: np.ndarray,
  ks: Sequence[int] = (1, 5, 10),
  ties: str = "pessimistic",
) -> dict[str, float]:
  """Recalls of the two re-ranked matrices: i2t ones from `i2t`, t2i ones from `t2i`.

  Args:
    i2t: `[N_img, N_txt]` scores of the captions of each image.
    t2i: `[N_txt, N_img]` scores of the images of each caption.
    txt2img: `[N_txt]` int image index of each caption.
    img2txt: `[N_img, K]` int caption indices of each image (negative = none).
    ks: the k of each recall.
    ties: one of `TIE_RULES`.

  Returns:
    `{i2t_r{k}, t2i_r{k} for k in ks, rsum}` in percent, NaN where a matrix is not finite.
  """
  from_i2t = retrieval_metrics(i2t, txt2img, img2txt, ks, ties)
  from_t2i = retrieval_metrics(np.asarray(t2i).T, txt2img, img2txt, ks, ties)
  metrics = {f"i2t_r{r}": from_i2t[f"i2t_r{r}"] for r in ks}
  metrics.update({f"t2i_r{r}": from_t2i[f"t2i_r{r}"] for r in ks})
  metrics["rsum"] = float(sum(metrics.values()))
  return metrics


def _check_k(k: Any) -> None:
  if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
    raise ConfigError(f"k must be a positive int; got {k!r}")


class RerankRetrievalEvaluator(RetrievalEvaluator):
  """Retrieval ranked by ITC, then re-ranked by ITM on each query's top-k (module docstring).

  `run(params)` returns the ITC metrics (`itc_i2t_r1`, ..., `itc_rsum`) and the re-ranked ones
  (`i2t_r1`, ..., `rsum`) from one encoding of the split. Runs on every process with the same
  host data; all model functions take and return host numpy (or global) arrays. Images are
  decoded and encoded as `RetrievalEvaluator`'s (each process decodes the rows its devices hold);
  the tokens of the whole split and the ITM passes are on every process.
  """

  def __init__(
    self,
    name: str,
    encode_image_fn: EncodeWithTokensFn,
    encode_text_fn: EncodeWithTokensFn,
    itm_score_fn: ItmScoreFn,
    eval_data: dict[str, np.ndarray],
    batch_size: int,
    every_steps: int,
    k: int = 16,
    ties: str = "pessimistic",
    ks: Sequence[int] = (1, 5, 10),
  ):
    """Builds the evaluator.

    Args:
      name: the evaluator's name (metrics are logged as `eval/<name>/<metric>`).
      encode_image_fn: `(params, images [B, H, W, 3]) -> (emb [B, E], tokens [B, T, Di])`, the
        tokens being what the fusion encoder attends to (CLS + patches).
      encode_text_fn: `(params, ids [B, L], mask [B, L]) -> (emb [B, E], tokens [B, L, Dt])`.
      itm_score_fn: `(params, image_tokens [n, T, Di], text_tokens [n, L, Dt], text_mask [n, L])
        -> [n]` the match score (ITM "match" logit) of each pair.
      eval_data: as for `RetrievalEvaluator`.
      batch_size: rows per encode call and pairs per ITM call (last batches padded).
      every_steps: run every this many train steps; 0 = only at the end of training.
      k: candidates re-scored per query (clipped to the number of candidates).
      ties: one of `TIE_RULES`, for both stages.
      ks: the k of each recall.
    """
    super().__init__(
      name, encode_image_fn, encode_text_fn, eval_data, batch_size, every_steps, ks, ties
    )
    _check_k(k)
    self.k = int(k)
    self._itm_score = itm_score_fn

  def encode_images(self, params: Any) -> tuple[np.ndarray, np.ndarray]:
    """`(emb [N_img, E], tokens [N_img, T, Di])` (unreadable images are black ones)."""
    out = embed_with_tokens(self._encode_image, params, (self.images,), self.batch_size)
    log_unreadable(self.name, self.images)
    return out

  def encode_texts(self, params: Any) -> tuple[np.ndarray, np.ndarray]:
    """`(emb [N_txt, E], tokens [N_txt, L, Dt])`."""
    return embed_with_tokens(
      self._encode_text, params, (self.text_ids, self.text_mask), self.batch_size
    )

  def embed_images(self, params: Any) -> np.ndarray:
    """`[N_img, E]` image embeddings."""
    return self.encode_images(params)[0]

  def embed_texts(self, params: Any) -> np.ndarray:
    """`[N_txt, E]` caption embeddings."""
    return self.encode_texts(params)[0]

  def score_matrices(self, params: Any) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """`(sim [N_img, N_txt], i2t [N_img, N_txt], t2i [N_txt, N_img])` from one encoding.

    `i2t` and `t2i` are None (and no ITM pass runs) when `sim` is not finite.
    """
    image_emb, image_tokens = self.encode_images(params)
    text_emb, text_tokens = self.encode_texts(params)
    sim = image_emb @ text_emb.T
    if not np.all(np.isfinite(sim)):
      return sim, None, None

    def score_pairs(image_index: np.ndarray, text_index: np.ndarray) -> np.ndarray:
      return score_pairs_in_batches(
        self._itm_score,
        params,
        image_tokens,
        text_tokens,
        self.text_mask,
        image_index,
        text_index,
        self.batch_size,
      )

    return sim, *reranked_matrices(sim, score_pairs, self.k)

  def run(self, params: Any, step: int | None = None) -> dict[str, float]:
    """ITC metrics under `itc_*` and ITM re-ranked metrics under the plain names (percent)."""
    del step  # Writes no files named by the step.
    sim, i2t, t2i = self.score_matrices(params)
    itc = retrieval_metrics(sim, self.txt2img, self.img2txt, self.ks, self.ties)
    metrics = {f"itc_{key}": value for key, value in itc.items()}
    if i2t is None:
      metrics.update(dict.fromkeys(itc, float("nan")))
    else:
      metrics.update(rerank_metrics(i2t, t2i, self.txt2img, self.img2txt, self.ks, self.ties))
    return metrics


@EVALUATORS.register("retrieval_itm")
def build_retrieval_itm(name: str, settings: dict, ctx: EvalContext) -> RerankRetrievalEvaluator:
  """Builder for `type: "retrieval_itm"` (fields `split`, `every_steps`, `k`, `batch_size`,
  `ties`).

  The model functions come from `ctx.predict`: `encode_image_tokens`, `encode_text_tokens` and
  `itm_score` (`PREDICT_FNS`), with the signatures of `RerankRetrievalEvaluator`; a method whose
  model has no ITM head provides none of them.
  """
  from vlalign.data import pipeline

  check_keys(name, settings, {"split"}, {"k", "ties"})
  kind = "retrieval_itm (a model with an ITM head)"
  fns = [ctx.predict_fn(fn, name, kind) for fn in PREDICT_FNS]
  _check_k(settings.get("k", 16))
  split = checked_split(name, settings, ctx)
  if ctx.check_only:
    return None
  return RerankRetrievalEvaluator(
    name,
    *fns,
    pipeline.make_eval_data(ctx.data_config, ctx.tokenizer, split),
    batch_size=settings.get("batch_size", ctx.default_batch_size),
    every_steps=settings.get("every_steps", 0),
    k=settings.get("k", 16),
    ties=settings.get("ties", "pessimistic"),
  )
