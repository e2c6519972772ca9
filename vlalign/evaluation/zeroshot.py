"""Zero-shot classification with prompt ensembling, as in CLIP.

Each class is embedded by filling every template ("a photo of a {}.") with its name, encoding the
texts, L2-normalising each, averaging over templates and normalising again. An image is assigned the
class whose embedding has the highest dot product with the image embedding (the first such class on
ties). Accuracy is in percent; chance is `100 / C` for `C` classes.
"""

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from vlalign.errors import ConfigError
from vlalign.evaluation.common import EVALUATORS, EvalContext, check_keys
from vlalign.evaluation.retrieval import embed_in_batches


class Tokenizer(Protocol):
  def encode_batch(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """`(ids [N, L] int32, mask [N, L] int32)`."""
    ...


def _l2_normalise(x: np.ndarray, axis: int = -1) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
  """The `C * T` prompts, class-major: `templates[t].format(class_names[c])` at `c * T + t`."""
  for template in templates:
    if template.count("{}") != 1:
      raise ConfigError(f"template {template!r} must contain exactly one '{{}}'")
  return [template.format(name) for name in class_names for template in templates]


def class_embeddings(
  encode_text_fn: Callable[[Any, np.ndarray, np.ndarray], Any],
  params: Any,
  tokenizer: Tokenizer,
  class_names: Sequence[str],
  templates: Sequence[str],
  max_len: int,
  batch_size: int = 256,
) -> np.ndarray:
  """Prompt-ensembled class embeddings.

  Args:
    encode_text_fn: `(params, ids [B, L], mask [B, L]) -> [B, E]`.
    params: model parameters, passed through.
    tokenizer: has `encode_batch(texts, max_len) -> (ids, mask)`.
    class_names: `C` class names.
    templates: `T` templates, each with one `{}`.
    max_len: token length `L`.
    batch_size: texts per encode call (the last batch is padded).

  Returns:
    `[C, E]` float32 unit vectors: the renormalised mean over templates of the normalised text
    embeddings.
  """
  if not class_names or not templates:
    raise ValueError("need at least one class name and one template")
  ids, mask = tokenizer.encode_batch(prompts(class_names, templates), max_len)
  text_emb = embed_in_batches(encode_text_fn, params, (ids, mask), batch_size)
  text_emb = _l2_normalise(text_emb.reshape(len(class_names), len(templates), -1))  # [C, T, E]
  return _l2_normalise(text_emb.mean(axis=1)).astype(np.float32)


def top1_accuracy(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray) -> float:
  """Percent of images whose highest-scoring class is their label; NaN if any score is not finite.

  Args:
    image_emb: `[M, E]` image embeddings.
    class_emb: `[C, E]` class embeddings.
    labels: `[M]` int class indices.
  """
  logits = image_emb @ class_emb.T  # [M, C]
  if not np.all(np.isfinite(logits)):
    return float("nan")
  return float(100.0 * np.mean(np.argmax(logits, axis=1) == labels))


class ZeroShotEvaluator:
  """Zero-shot classification of a labelled image split by prompt-ensembled class embeddings.

  Runs on every process with the same host data; the encode functions take host numpy batches.
  """

  def __init__(
    self,
    name: str,
    encode_image_fn: Callable[[Any, np.ndarray], Any],
    encode_text_fn: Callable[[Any, np.ndarray, np.ndarray], Any],
    tokenizer: Tokenizer,
    zeroshot_data: dict[str, Any],
    batch_size: int,
    every_steps: int,
    max_len: int,
  ):
    """Builds the evaluator.

    Args:
      name: the evaluator's name (metrics are logged as `eval/<name>/<metric>`).
      encode_image_fn: `(params, images [B, H, W, 3]) -> [B, E]`.
      encode_text_fn: `(params, ids [B, L], mask [B, L]) -> [B, E]`.
      tokenizer: has `encode_batch(texts, max_len) -> (ids, mask)`.
      zeroshot_data: `images [M, H, W, 3]`, `labels [M]` int, `class_names` list of `C` str,
        `templates` list of str with one `{}` each (see `vlalign.data.pipeline.make_zeroshot_data`).
      batch_size: rows per encode call (the last batch is padded).
      every_steps: run every this many train steps; 0 = only at the end of training.
      max_len: token length of the prompts.
    """
    self.name = name
    self.every_steps = int(every_steps)
    self.batch_size = int(batch_size)
    self.max_len = int(max_len)
    self._encode_image = encode_image_fn
    self._encode_text = encode_text_fn
    self._tokenizer = tokenizer
    self.images = np.asarray(zeroshot_data["images"])
    self.labels = np.asarray(zeroshot_data["labels"])
    self.class_names = list(zeroshot_data["class_names"])
    self.templates = list(zeroshot_data["templates"])
    prompts(self.class_names, self.templates)  # Validates the templates now rather than at run.
    if self.labels.shape != (len(self.images),):
      raise ValueError(f"labels {self.labels.shape} do not match {len(self.images)} images")
    if self.labels.min() < 0 or self.labels.max() >= len(self.class_names):
      raise ValueError(f"labels must lie in [0, {len(self.class_names)})")

  def run(self, params: Any, step: int | None = None) -> dict[str, float]:
    """Returns `{"acc": top-1 accuracy, "chance": 100 / C}` in percent."""
    del step  # Writes no files named by the step.
    class_emb = class_embeddings(
      self._encode_text,
      params,
      self._tokenizer,
      self.class_names,
      self.templates,
      self.max_len,
      self.batch_size,
    )
    image_emb = embed_in_batches(self._encode_image, params, (self.images,), self.batch_size)
    return {
      "acc": top1_accuracy(image_emb, class_emb, self.labels),
      "chance": 100.0 / len(self.class_names),
    }


@EVALUATORS.register("zeroshot")
def build_zeroshot(name: str, settings: dict, ctx: EvalContext) -> ZeroShotEvaluator:
  """Builder for `type: "zeroshot"` (fields `split`, `task`, `max_len`, `every_steps`,
  `batch_size`)."""
  check_keys(name, settings, {"split", "task"}, {"max_len"})
  from vlalign.data import pipeline

  encode_image = ctx.predict_fn("encode_image", name, "zeroshot")
  encode_text = ctx.predict_fn("encode_text", name, "zeroshot")
  pipeline.split_size(ctx.data_config, settings["split"])
  if ctx.check_only:
    return None
  return ZeroShotEvaluator(
    name,
    encode_image,
    encode_text,
    ctx.tokenizer,
    pipeline.make_zeroshot_data(ctx.data_config, settings["split"], settings["task"]),
    batch_size=settings.get("batch_size", ctx.default_batch_size),
    every_steps=settings.get("every_steps", 0),
    max_len=settings["max_len"] if "max_len" in settings else ctx.data_config["max_len"],
  )
