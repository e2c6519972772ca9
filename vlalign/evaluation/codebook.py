"""Codebook health on an evaluation split (CODIS): code usage, perplexity, dead codes, and how often
an image and its caption pick the same code; a PNG of the usage per code.

Every image and caption of the split is assigned to its nearest centre (the argmax of z C^T, i.e.
the highest student assignment probability at any temperature). Metrics:

* `used`: codes picked by at least one image or caption; `dead`: the others; `size`: K;
* `perplexity`: exp of the entropy of the usage distribution (K when usage is uniform, 1 when one
  code takes everything);
* `agreement`: percent of captions whose code is their image's code.

With an output directory, `run(params, step)` also writes `<name>_step<step>.png`: the number of
samples per code, codes sorted by usage.
"""

from collections.abc import Callable
from typing import Any

import numpy as np

from vlalign import workdir as workdir_lib
from vlalign.evaluation.common import EVALUATORS, EvalContext, check_keys
from vlalign.evaluation.plots import bar_chart_png
from vlalign.evaluation.retrieval import as_rows, embed_in_batches


def code_usage_metrics(
  image_codes: np.ndarray, text_codes: np.ndarray, txt2img: np.ndarray, size: int
) -> tuple[dict[str, float], np.ndarray]:
  """`(metrics, counts [K])` of hard codes (see the module docstring).

  Args:
    image_codes: `[N_img]` int code of each image.
    text_codes: `[N_txt]` int code of each caption.
    txt2img: `[N_txt]` the image of each caption.
    size: K.
  """
  counts = np.bincount(np.concatenate([image_codes, text_codes]), minlength=size)
  probs = counts / max(counts.sum(), 1)
  nonzero = probs[probs > 0]
  used = int(np.sum(counts > 0))
  metrics = {
    "size": float(size),
    "used": float(used),
    "dead": float(size - used),
    "perplexity": float(np.exp(-np.sum(nonzero * np.log(nonzero)))),
    "agreement": float(100.0 * np.mean(image_codes[txt2img] == text_codes)),
  }
  return metrics, counts


class CodebookEvaluator:
  """Code usage of a fixed split (see the module docstring)."""

  def __init__(
    self,
    name: str,
    encode_image_fn: Callable[..., Any],
    encode_text_fn: Callable[..., Any],
    codebook_fn: Callable[[Any], Any],
    eval_data: dict[str, np.ndarray],
    batch_size: int,
    every_steps: int,
    output_dir: Any = None,
  ):
    self.name = name
    self.every_steps = int(every_steps)
    self.batch_size = int(batch_size)
    self.output_dir = output_dir
    self._encode_image = encode_image_fn
    self._encode_text = encode_text_fn
    self._codebook = codebook_fn
    self.images = as_rows(eval_data["images"])
    self.text_ids = np.asarray(eval_data["text_ids"])
    self.text_mask = np.asarray(eval_data["text_mask"])
    self.txt2img = np.asarray(eval_data["txt2img"])

  def codes(self, params: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(image codes [N_img], caption codes [N_txt], codebook [K, E])`."""
    codebook = np.asarray(self._codebook(params), np.float32)
    images = embed_in_batches(self._encode_image, params, (self.images,), self.batch_size)
    texts = embed_in_batches(
      self._encode_text, params, (self.text_ids, self.text_mask), self.batch_size
    )
    return np.argmax(images @ codebook.T, axis=1), np.argmax(texts @ codebook.T, axis=1), codebook

  def run(self, params: Any, step: int | None = None) -> dict[str, float]:
    image_codes, text_codes, codebook = self.codes(params)
    metrics, counts = code_usage_metrics(image_codes, text_codes, self.txt2img, len(codebook))
    if self.output_dir is not None and step is not None:
      title = (
        f"{self.name} at step {step}: samples per code, sorted ({int(metrics['used'])}/"
        f"{len(codebook)} codes used, perplexity {metrics['perplexity']:.1f})"
      )
      png = bar_chart_png(np.sort(counts)[::-1], title, xlabel="codes by usage")
      workdir_lib.write_bytes(
        workdir_lib.as_path(self.output_dir) / f"{self.name}_step{step}.png", png
      )
    return metrics


@EVALUATORS.register("codebook")
def build_codebook(name: str, settings: dict, ctx: EvalContext) -> CodebookEvaluator | None:
  """Builder for `type: "codebook"` (fields `split`, `every_steps`, `batch_size`); needs a method
  with a codebook (prediction function `codebook`)."""
  from vlalign.data import pipeline

  check_keys(name, settings, {"split"}, set())
  kind = "codebook (a method with a codebook, e.g. 'codis')"
  fns = [ctx.predict_fn(fn, name, kind) for fn in ("encode_image", "encode_text", "codebook")]
  pipeline.split_size(ctx.data_config, settings["split"])
  if ctx.check_only:
    return None
  return CodebookEvaluator(
    name,
    *fns,
    pipeline.make_eval_data(ctx.data_config, ctx.tokenizer, settings["split"]),
    batch_size=settings.get("batch_size", ctx.default_batch_size),
    every_steps=settings.get("every_steps", 0),
    output_dir=ctx.output_dir,
  )
