"""LexVLA retrieval: dense and sparsified lexical vectors (`type: "lexical_retrieval"`).

LexVLA encodes images and captions as non-negative lexical vectors over a vocabulary of V words
(`vlalign/models/lexical.py`). This evaluator encodes the split once with the method's prediction
functions

    lexical_image(params, images [B, H, W, 3]) -> [B, V]   (non-negative)
    lexical_text(params, ids [B, L], mask [B, L]) -> [B, V]

(the `lexvla` method's are unit vectors, so a threshold of `1/sqrt(V)` is LexVLA's "above the
uniform vector's entries"; any scale works, thresholds apply to the vectors as returned)

and reports, in one `run`:

* `dense/<metric>`: the metrics of `RetrievalEvaluator` (`i2t_r1`, ..., `t2i_r10`, `rsum`) of the
  L2-normalised vectors ranked by their dot product, and `dense/{img,txt}_{active,sparsity}`: the
  mean number of non-zero entries per vector and the percent of zero entries
  (`sparse.sparsity_stats`) of the raw vectors.
* `top{k}/<metric>` for each k of `topk`: both sides keep the k largest entries of each vector
  (`sparse.sparsify_topk`), are L2-normalised and scored through an inverted index over the images
  (`sparse.InvertedIndex.scores`, the full `[N_img, N_txt]` matrix that the recalls need), with
  `top{k}/{img,txt}_{active,sparsity}` of the sparsified vectors.
* `thr{t}/<metric>` for each t of `thresholds` (formatted with `{:g}`, e.g. `thr0.5/t2i_r1`): the
  same with the entries strictly above t kept (`sparse.sparsify_threshold`).

The recalls follow `retrieval.py` (tie rule `ties`, pessimistic by default). Lexical vectors with
NaN or infinity give NaN for every metric.

Memory: the split's vectors are held densely on the host in float32, `N_txt * V * 4` bytes for the
captions (COCO 5k test with Llama 2's 32,000 words: 25,000 captions, 3.2 GB), plus one normalised
copy for the dense metrics; the sparsified ones are built in row chunks straight into CSR form.
"""

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from vlalign.errors import ConfigError
from vlalign.evaluation.common import EVALUATORS, EvalContext, check_keys
from vlalign.evaluation.retrieval import (
  DEFAULT_KS,
  RetrievalEvaluator,
  _check_ties,
  checked_split,
  retrieval_metrics,
)
from vlalign.evaluation.sparse import (
  InvertedIndex,
  SparseRows,
  sparsify_threshold,
  sparsify_topk,
  sparsity_stats,
)
from vlalign.evaluation.zeroshot import _l2_normalise

# The method's prediction functions this evaluator needs (`Method.predict_fns`).
PREDICT_FNS = ("lexical_image", "lexical_text")

# Rows sparsified at once: bounds the dense temporaries of `sparse_rows`.
_SPARSIFY_ROWS = 1024

Sparsifier = Callable[[np.ndarray], np.ndarray]


def check_topk(name: str, topk: Any) -> tuple[int, ...]:
  """`topk` as a tuple of distinct positive ints; ConfigError otherwise."""
  if not isinstance(topk, list | tuple):
    raise ConfigError(f"evaluator {name!r}: topk must be a list of positive ints; got {topk!r}")
  for k in topk:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
      raise ConfigError(f"evaluator {name!r}: topk entries must be positive ints; got {k!r}")
  if len(set(topk)) != len(topk):
    raise ConfigError(f"evaluator {name!r}: topk has repeated entries: {list(topk)}")
  return tuple(int(k) for k in topk)


def threshold_prefix(t: float) -> str:
  """The metric prefix of threshold `t`, e.g. `thr0.5`."""
  return f"thr{t:g}"


def check_thresholds(name: str, thresholds: Any) -> tuple[float, ...]:
  """`thresholds` as a tuple of finite numbers >= 0, distinct prefixes; ConfigError otherwise."""
  if not isinstance(thresholds, list | tuple):
    raise ConfigError(
      f"evaluator {name!r}: thresholds must be a list of numbers >= 0; got {thresholds!r}"
    )
  for t in thresholds:
    if (
      isinstance(t, bool)
      or not isinstance(t, int | float | np.integer | np.floating)
      or not math.isfinite(t)
      or t < 0
    ):
      raise ConfigError(f"evaluator {name!r}: thresholds must be finite numbers >= 0; got {t!r}")
  prefixes = [threshold_prefix(float(t)) for t in thresholds]
  if len(set(prefixes)) != len(prefixes):
    raise ConfigError(f"evaluator {name!r}: thresholds repeat a metric prefix: {prefixes}")
  return tuple(float(t) for t in thresholds)


def sparse_rows(x: np.ndarray, sparsify: Sparsifier) -> SparseRows:
  """`sparsify(x)` `[N, V] -> [N, V]` in CSR form, computed in chunks of rows."""
  return SparseRows.vstack(
    [
      SparseRows.from_dense(sparsify(x[start : start + _SPARSIFY_ROWS]))
      for start in range(0, max(len(x), 1), _SPARSIFY_ROWS)
    ]
  )


def _stats(images: Any, texts: Any) -> dict[str, float]:
  """`{img,txt}_{active,sparsity}` of `[N, V]` arrays or `SparseRows`."""
  out = {}
  for side, x in (("img", images), ("txt", texts)):
    out.update({f"{side}_{key}": value for key, value in sparsity_stats(x).items()})
  return out


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
  return {f"{prefix}/{key}": value for key, value in metrics.items()}


class LexicalRetrievalEvaluator(RetrievalEvaluator):
  """Retrieval with dense and sparsified lexical vectors (see the module docstring).

  Runs on every process with the same host data; the prediction functions take host numpy
  batches. `embed_images` / `embed_texts` return the raw (non-normalised) lexical vectors.
  """

  def __init__(
    self,
    name: str,
    lexical_image_fn: Callable[[Any, np.ndarray], Any],
    lexical_text_fn: Callable[[Any, np.ndarray, np.ndarray], Any],
    eval_data: dict[str, np.ndarray],
    batch_size: int,
    every_steps: int,
    topk: Sequence[int] = (),
    thresholds: Sequence[float] = (),
    ks: Sequence[int] = DEFAULT_KS,
    ties: str = "pessimistic",
  ):
    """Builds the evaluator.

    Args:
      name: the evaluator's name (metrics are logged as `eval/<name>/<metric>`).
      lexical_image_fn: `(params, images [B, H, W, 3]) -> [B, V]` non-negative lexical vectors.
      lexical_text_fn: `(params, ids [B, L], mask [B, L]) -> [B, V]` likewise.
      eval_data: as for `RetrievalEvaluator`.
      batch_size: rows per encode call (the last batch is padded).
      every_steps: run every this many train steps; 0 = only at the end of training.
      topk: the k of each top-k sparsification (distinct, >= 1).
      thresholds: the t of each threshold sparsification (distinct, finite, >= 0).
      ks: the k of each recall.
      ties: one of `TIE_RULES`.
    """
    super().__init__(
      name, lexical_image_fn, lexical_text_fn, eval_data, batch_size, every_steps, ks, ties
    )
    self.topk = check_topk(name, list(topk))
    self.thresholds = check_thresholds(name, list(thresholds))

  def sparsifiers(self) -> list[tuple[str, Sparsifier]]:
    """`(metric prefix, [N, V] -> [N, V] sparsifier)` of each configured sparsification."""
    out = [(f"top{k}", lambda x, k=k: sparsify_topk(x, k)) for k in self.topk]
    out += [(threshold_prefix(t), lambda x, t=t: sparsify_threshold(x, t)) for t in self.thresholds]
    return out

  def metric_names(self) -> list[str]:
    """Every key `run` returns."""
    recalls = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in self.ks] + ["rsum"]
    stats = [f"{side}_{key}" for side in ("img", "txt") for key in ("active", "sparsity")]
    prefixes = ["dense"] + [prefix for prefix, _ in self.sparsifiers()]
    return [f"{prefix}/{key}" for prefix in prefixes for key in recalls + stats]

  def sparse_metrics(
    self, images: np.ndarray, texts: np.ndarray, sparsify: Sparsifier
  ) -> dict[str, float]:
    """Recalls and sparsity of `sparsify`'d vectors scored through an inverted index.

    Args:
      images: `[N_img, V]` raw lexical vectors.
      texts: `[N_txt, V]` raw lexical vectors.
      sparsify: `[N, V] -> [N, V]`.

    Returns:
      `retrieval_metrics` keys and `{img,txt}_{active,sparsity}` (unprefixed).
    """
    image_rows, text_rows = sparse_rows(images, sparsify), sparse_rows(texts, sparsify)
    index = InvertedIndex.build(image_rows.l2_normalised())
    sim = index.scores(text_rows.l2_normalised()).T  # [N_img, N_txt]
    metrics = retrieval_metrics(sim, self.txt2img, self.img2txt, self.ks, self.ties)
    return {**metrics, **_stats(image_rows, text_rows)}

  def run(self, params: Any, step: int | None = None) -> dict[str, float]:
    """Embeds the split with `params`; the dense, `top{k}/` and `thr{t}/` metrics (percent)."""
    del step  # Writes no files named by the step.
    images, texts = self.embed_images(params), self.embed_texts(params)  # [N_img, V], [N_txt, V]
    if images.shape[1] != texts.shape[1]:
      raise ValueError(
        f"lexical_image gives {images.shape[1]} words and lexical_text {texts.shape[1]}"
      )
    if not (np.all(np.isfinite(images)) and np.all(np.isfinite(texts))):
      return dict.fromkeys(self.metric_names(), float("nan"))
    sim = _l2_normalise(images) @ _l2_normalise(texts).T  # [N_img, N_txt]
    dense = retrieval_metrics(sim, self.txt2img, self.img2txt, self.ks, self.ties)
    metrics = _prefixed("dense", {**dense, **_stats(images, texts)})
    del sim
    for prefix, sparsify in self.sparsifiers():
      metrics.update(_prefixed(prefix, self.sparse_metrics(images, texts, sparsify)))
    return metrics


@EVALUATORS.register("lexical_retrieval")
def build_lexical_retrieval(
  name: str, settings: dict, ctx: EvalContext
) -> LexicalRetrievalEvaluator:
  """Builder for `type: "lexical_retrieval"` (fields `split`, `topk`, `thresholds`, `ties`,
  `every_steps`, `batch_size`).

  The prediction functions come from `ctx.predict`: `lexical_image` and `lexical_text`
  (`PREDICT_FNS`), with the signatures of `LexicalRetrievalEvaluator`.
  """
  from vlalign.data import pipeline  # Imported here: evaluators need no data code until built.

  check_keys(name, settings, {"split"}, {"topk", "thresholds", "ties"})
  _check_ties(settings.get("ties", "pessimistic"))
  topk = check_topk(name, settings.get("topk", []))
  thresholds = check_thresholds(name, settings.get("thresholds", []))
  kind = "lexical_retrieval (a model with lexical vectors)"
  fns = [ctx.predict_fn(fn, name, kind) for fn in PREDICT_FNS]
  split = checked_split(name, settings, ctx)
  if ctx.check_only:
    return None
  return LexicalRetrievalEvaluator(
    name,
    *fns,
    pipeline.make_eval_data(ctx.data_config, ctx.tokenizer, split),
    batch_size=settings.get("batch_size", ctx.default_batch_size),
    every_steps=settings.get("every_steps", 0),
    topk=topk,
    thresholds=thresholds,
    ties=settings.get("ties", "pessimistic"),
  )
