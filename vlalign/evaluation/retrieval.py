"""Zero-shot image-text retrieval: Recall@K in both directions, several captions per image.

Metrics follow the convention of ALBEF and big_vision, in percent:

* `i2t_r{k}`: an image counts as a hit when ANY of its ground-truth captions is among the k
  highest-scoring captions of all `N_txt`.
* `t2i_r{k}`: a caption counts as a hit when its one image is among the k highest-scoring images of
  all `N_img`.
* `rsum`: the sum of all the recalls above (600 is perfect for `ks=(1, 5, 10)`).

Ties. The rank of a ground truth is the number of wrong candidates that beat it. With
`ties="pessimistic"` (the default) a wrong candidate with an equal score beats it too, so a
collapsed model (every embedding equal) scores 0 rather than 100; with `ties="optimistic"` only a
strictly higher score beats it. Real float32 embeddings almost never tie.

A similarity matrix with any NaN or infinity gives NaN for every metric rather than a number that
the comparisons above would make up.

Chance levels for `N_img` images with `K` captions each (so `N_txt = K * N_img`): both `t2i_r{k}`
and `i2t_r{k}` are about `100 * k / N_img` percent (exactly `100 * k / N_img` for t2i, and
`100 * (1 - C(N_txt - K, k) / C(N_txt, k))` for i2t). With 1,000 images: R@1 0.1, R@5 0.5,
R@10 1.0 in each direction, rsum 3.2.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from vlalign.errors import ConfigError
from vlalign.evaluation.common import (
  EVALUATORS,
  EvalContext,
  check_keys,
  check_recall_candidates,
)
from vlalign.sharding import ProcessRows, rows_to_load, union_over_processes

TIE_RULES = ("optimistic", "pessimistic")
DEFAULT_KS = (1, 5, 10)

# Rows of the similarity matrix compared at once: bounds the [rows, N] boolean temporaries.
_CHUNK_ROWS = 512


def _check_ties(ties: str) -> None:
  if ties not in TIE_RULES:
    raise ConfigError(f"unknown tie rule {ties!r}; choose one of {TIE_RULES}")


def _ranks_of_best(
  scores: np.ndarray, best: np.ndarray, num_gt_at_best: np.ndarray, ties: str
) -> np.ndarray:
  """Rank of each row's best ground truth among the row's candidates.

  Args:
    scores: `[R, C]` candidate scores, one row per query.
    best: `[R]` the score of each row's best ground truth.
    num_gt_at_best: `[R]` how many ground truths of the row score exactly `best` (>= 1).
    ties: one of `TIE_RULES`.

  Returns:
    `[R]` int64 ranks, 0 = first.
  """
  ranks = np.empty(len(scores), np.int64)
  for start in range(0, len(scores), _CHUNK_ROWS):
    rows = slice(start, start + _CHUNK_ROWS)
    column = best[rows, None]
    if ties == "optimistic":
      ranks[rows] = np.sum(scores[rows] > column, axis=1)
    else:
      ranks[rows] = np.sum(scores[rows] >= column, axis=1) - num_gt_at_best[rows]
  return ranks


def i2t_ranks(sim: np.ndarray, img2txt: np.ndarray, ties: str = "pessimistic") -> np.ndarray:
  """For each image, the rank of its best-ranked ground-truth caption.

  Args:
    sim: `[N_img, N_txt]` image-text similarities.
    img2txt: `[N_img, K]` int caption indices of each image; negative entries mean "no caption"
      (for datasets with a varying caption count), but every image needs at least one.
    ties: one of `TIE_RULES` (see the module docstring).

  Returns:
    `[N_img]` int64 ranks, 0 = a ground-truth caption is the top-scoring one.
  """
  _check_ties(ties)
  sim = np.asarray(sim)
  img2txt = np.asarray(img2txt)
  valid = img2txt >= 0
  if not valid.any(axis=1).all():
    raise ValueError("every image needs at least one caption in img2txt")
  gt_scores = np.take_along_axis(sim, np.where(valid, img2txt, 0), axis=1)
  gt_scores = np.where(valid, gt_scores, -np.inf)  # [N_img, K]
  best = gt_scores.max(axis=1)  # Fewest candidates beat the highest-scoring ground truth.
  num_gt_at_best = np.sum(gt_scores == best[:, None], axis=1)
  return _ranks_of_best(sim, best, num_gt_at_best, ties)


def t2i_ranks(sim: np.ndarray, txt2img: np.ndarray, ties: str = "pessimistic") -> np.ndarray:
  """For each caption, the rank of its image.

  Args:
    sim: `[N_img, N_txt]` image-text similarities.
    txt2img: `[N_txt]` int image index of each caption.
    ties: one of `TIE_RULES` (see the module docstring).

  Returns:
    `[N_txt]` int64 ranks, 0 = the caption's image is the top-scoring one.
  """
  _check_ties(ties)
  sim_t = np.asarray(sim).T  # [N_txt, N_img]
  txt2img = np.asarray(txt2img)
  best = sim_t[np.arange(len(sim_t)), txt2img]
  return _ranks_of_best(sim_t, best, np.ones(len(sim_t), np.int64), ties)


def recall_at(ranks: np.ndarray, k: int) -> float:
  """Percent of queries whose rank is below `k`."""
  return float(100.0 * np.mean(np.asarray(ranks) < k))


def retrieval_metrics(
  sim: np.ndarray,
  txt2img: np.ndarray,
  img2txt: np.ndarray,
  ks: Sequence[int] = (1, 5, 10),
  ties: str = "pessimistic",
) -> dict[str, float]:
  """Recall@k in both directions and their sum, in percent.

  Args:
    sim: `[N_img, N_txt]` image-text similarities (higher = more similar).
    txt2img: `[N_txt]` int image index of each caption.
    img2txt: `[N_img, K]` int caption indices of each image (negative = none).
    ks: the k of each recall.
    ties: one of `TIE_RULES` (see the module docstring).

  Returns:
    `{i2t_r{k}, t2i_r{k} for k in ks, rsum}` as Python floats; all NaN when `sim` is not finite.
  """
  sim = np.asarray(sim)
  if sim.ndim != 2 or sim.shape != (len(img2txt), len(txt2img)):
    raise ValueError(
      f"sim has shape {sim.shape}; expected [N_img, N_txt] = [{len(img2txt)}, {len(txt2img)}]"
    )
  keys = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in ks]
  if not np.all(np.isfinite(sim)):
    return {**dict.fromkeys(keys, float("nan")), "rsum": float("nan")}
  i2t = i2t_ranks(sim, img2txt, ties)
  t2i = t2i_ranks(sim, txt2img, ties)
  metrics = {f"i2t_r{k}": recall_at(i2t, k) for k in ks}
  metrics.update({f"t2i_r{k}": recall_at(t2i, k) for k in ks})
  metrics["rsum"] = float(sum(metrics.values()))
  return metrics


def as_rows(array: Any) -> Any:
  """`array` as something `embed_in_batches` can index by rows: a numpy array, or a source that
  decodes rows on demand (`vlalign.data.pipeline.ImageRows`) kept as it is."""
  return array if hasattr(array, "num_images") else np.asarray(array)


def _take(array: Any, rows: np.ndarray) -> np.ndarray:
  """`array[rows]`; a source that decodes rows on demand decodes each distinct row once."""
  if not hasattr(array, "num_images"):
    return array[rows]
  distinct, inverse = np.unique(rows, return_inverse=True)
  return array[distinct][inverse.reshape(-1)]


def embed_in_batches(
  encode_fn: Callable[..., Any],
  params: Any,
  arrays: Sequence[np.ndarray],
  batch_size: int,
  rows: Any = None,
) -> np.ndarray:
  """Runs `encode_fn(params, *batch)` over fixed-size batches of `arrays`; returns `[N, E]` float32.

  The last batch is padded up to `batch_size` by repeating the last row and the padded outputs are
  dropped, so `encode_fn` always sees the same shapes (one compilation). Inputs are host numpy
  batches; outputs (host numpy or possibly sharded global arrays) are brought back to the host.

  Several processes: when `encode_fn` has `process_rows(batch_size)` (`sharding.host_fn`) and the
  batch is split over the devices of several processes, each process takes (decodes, for an
  `ImageRows`) only the rows of each batch that its devices hold and passes them as
  `sharding.ProcessRows`; the outputs, and so the result, are still the whole `[N, E]` on every
  process. Every process must call this with the same arguments (the batches are global).

  Args:
    encode_fn: `(params, *[batch_size, ...] arrays) -> [batch_size, E]`.
    params: passed through to `encode_fn` untouched.
    arrays: arrays with the same leading size `M >= 1`, e.g. `(images,)` or `(ids, mask)`; an
      `ImageRows` decodes only the rows of each batch (bounded host memory).
    batch_size: rows per call.
    rows: `[N]` int indices of the rows of `arrays` to embed, in order; None: all `M` rows.
  """
  arrays = [as_rows(a) for a in arrays]
  size = len(arrays[0])
  if size == 0 or any(len(a) != size for a in arrays):
    raise ValueError(f"need arrays of one non-zero length; got {[len(a) for a in arrays]}")
  rows = np.arange(size) if rows is None else np.asarray(rows, np.int64).reshape(-1)
  n = len(rows)
  if n == 0:
    raise ValueError("need at least one row to embed")
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive; got {batch_size}")
  local = rows_to_load(encode_fn, batch_size)
  outputs = []
  for start in range(0, n, batch_size):
    batch_rows = rows[np.minimum(np.arange(start, start + batch_size), n - 1)]  # last one repeated
    if local is None:
      batch = [_take(a, batch_rows) for a in arrays]
    else:
      batch = [ProcessRows(_take(a, batch_rows[local]), batch_size) for a in arrays]
    out = np.asarray(jax.device_get(encode_fn(params, *batch)))
    if out.ndim != 2 or len(out) != batch_size:
      raise ValueError(f"encode_fn returned shape {out.shape}; expected [{batch_size}, E]")
    outputs.append(out[: min(batch_size, n - start)])
  return np.concatenate(outputs).astype(np.float32)


def unreadable_images(images: Any) -> np.ndarray:
  """The indices of the images that could not be read so far, over every process (each decodes
  only its rows): `images.unreadable` (`pipeline.ImageRows`), `[]` for an in-memory array.
  Every process must call it (a collective when there are several)."""
  if not hasattr(images, "unreadable"):
    return np.zeros(0, np.int64)  # The same on every process: no collective needed.
  return union_over_processes(sorted(images.unreadable))


def log_unreadable(name: str, images: Any) -> None:
  """Logs how many images of an evaluator's split were unreadable (embedded as black images)."""
  skipped = unreadable_images(images)
  if len(skipped):
    logging.warning(
      "evaluator %s: %d of %d images could not be read and were embedded as black images "
      "(first: %s)",
      name,
      len(skipped),
      len(images),
      skipped[:10].tolist(),
    )


def _check_caption_maps(txt2img: np.ndarray, img2txt: np.ndarray, num_images: int) -> None:
  """Raises unless `txt2img` and `img2txt` describe the same caption-to-image assignment."""
  if txt2img.ndim != 1 or img2txt.ndim != 2 or len(img2txt) != num_images:
    raise ValueError(
      f"expected txt2img [N_txt] and img2txt [{num_images}, K]; got {txt2img.shape}, "
      f"{img2txt.shape}"
    )
  if txt2img.min() < 0 or txt2img.max() >= num_images or img2txt.max() >= len(txt2img):
    raise ValueError("txt2img / img2txt hold out-of-range indices")
  images, slots = np.nonzero(img2txt >= 0)
  if not np.array_equal(txt2img[img2txt[images, slots]], images):
    raise ValueError("img2txt lists a caption whose txt2img entry is another image")


class RetrievalEvaluator:
  """Image-text retrieval on a fixed eval split (see the module docstring for the metrics).

  Runs on every process with the same host data; the encode functions take host numpy batches.
  With `sharding.host_fn` encode functions on several processes, each process decodes only the
  images its devices hold (`embed_in_batches`); every process gets the whole embeddings and
  computes the same metrics.
  """

  def __init__(
    self,
    name: str,
    encode_image_fn: Callable[[Any, np.ndarray], Any],
    encode_text_fn: Callable[[Any, np.ndarray, np.ndarray], Any],
    eval_data: dict[str, np.ndarray],
    batch_size: int,
    every_steps: int,
    ks: Sequence[int] = DEFAULT_KS,
    ties: str = "pessimistic",
  ):
    """Builds the evaluator.

    Args:
      name: the evaluator's name (metrics are logged as `eval/<name>/<metric>`).
      encode_image_fn: `(params, images [B, H, W, 3]) -> [B, E]` L2-normalised embeddings.
      encode_text_fn: `(params, ids [B, L], mask [B, L]) -> [B, E]` L2-normalised embeddings.
      eval_data: `images [N, H, W, 3]`, `text_ids [N_txt, L]`, `text_mask [N_txt, L]`,
        `txt2img [N_txt]`, `img2txt [N, K]` (see `vlalign.data.pipeline.make_eval_data`).
      batch_size: rows per encode call (the last batch is padded).
      every_steps: run every this many train steps; 0 = only at the end of training.
      ks: the k of each recall.
      ties: one of `TIE_RULES`.
    """
    _check_ties(ties)
    self.name = name
    self.every_steps = int(every_steps)
    self.batch_size = int(batch_size)
    self.ks = tuple(ks)
    self.ties = ties
    self._encode_image = encode_image_fn
    self._encode_text = encode_text_fn
    self.images = as_rows(eval_data["images"])
    self.text_ids = np.asarray(eval_data["text_ids"])
    self.text_mask = np.asarray(eval_data["text_mask"])
    self.txt2img = np.asarray(eval_data["txt2img"])
    self.img2txt = np.asarray(eval_data["img2txt"])
    if self.text_ids.shape != self.text_mask.shape or len(self.text_ids) != len(self.txt2img):
      raise ValueError(
        f"text_ids {self.text_ids.shape}, text_mask {self.text_mask.shape} and txt2img "
        f"{self.txt2img.shape} disagree"
      )
    _check_caption_maps(self.txt2img, self.img2txt, len(self.images))

  def embed_images(self, params: Any) -> np.ndarray:
    """`[N_img, E]` image embeddings (unreadable images of a file split are black ones)."""
    images = embed_in_batches(self._encode_image, params, (self.images,), self.batch_size)
    log_unreadable(self.name, self.images)
    return images

  def embed_texts(self, params: Any) -> np.ndarray:
    """`[N_txt, E]` caption embeddings."""
    return embed_in_batches(
      self._encode_text, params, (self.text_ids, self.text_mask), self.batch_size
    )

  def run(self, params: Any, step: int | None = None) -> dict[str, float]:
    """Embeds the split with `params` and returns `retrieval_metrics` (percent)."""
    del step  # Writes no files named by the step.
    sim = self.embed_images(params) @ self.embed_texts(params).T  # [N_img, N_txt]
    return retrieval_metrics(sim, self.txt2img, self.img2txt, self.ks, self.ties)


def checked_split(name: str, settings: dict, ctx: EvalContext) -> str:
  """The evaluator's split, with a ConfigError when it is empty or too small for the recalls."""
  from vlalign.data import pipeline  # Imported here: evaluators need no data code until built.

  split = settings["split"]
  check_recall_candidates(name, split, pipeline.split_size(ctx.data_config, split), DEFAULT_KS)
  return split


@EVALUATORS.register("retrieval")
def build_retrieval(name: str, settings: dict, ctx: EvalContext) -> RetrievalEvaluator:
  """Builder for `type: "retrieval"` (fields `split`, `ties`, `every_steps`, `batch_size`)."""
  check_keys(name, settings, {"split"}, {"ties"})
  _check_ties(settings.get("ties", "pessimistic"))
  from vlalign.data import pipeline  # Imported here: evaluators need no data code until built.

  encode_image = ctx.predict_fn("encode_image", name, "retrieval")
  encode_text = ctx.predict_fn("encode_text", name, "retrieval")
  split = checked_split(name, settings, ctx)
  if ctx.check_only:
    return None
  return RetrievalEvaluator(
    name,
    encode_image,
    encode_text,
    pipeline.make_eval_data(ctx.data_config, ctx.tokenizer, split),
    batch_size=settings.get("batch_size", ctx.default_batch_size),
    every_steps=settings.get("every_steps", 0),
    ties=settings.get("ties", "pessimistic"),
  )
