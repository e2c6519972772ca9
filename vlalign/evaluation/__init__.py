"""Evaluators built from `config.evals`.

`config.evals` maps an evaluator name to its settings, e.g.

    config.evals = dict(
      val=dict(type="retrieval", split="val", every_steps=500),
      zeroshot_color=dict(type="zeroshot", split="test", task="color", every_steps=0),
    )

`every_steps=0` runs an evaluator only at the end of training; `batch_size` overrides the default
encode batch. Every evaluator has `name`, `every_steps` and `run(params) -> {metric: float}`.

Adding an evaluator: write a builder `(name, settings, context) -> Evaluator` and add one line to
`EVALUATORS`.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from vlalign.evaluation.rerank import build_retrieval_itm
from vlalign.evaluation.retrieval import RetrievalEvaluator, retrieval_metrics
from vlalign.evaluation.zeroshot import ZeroShotEvaluator, class_embeddings

__all__ = [
  "EVALUATORS",
  "EvalContext",
  "Evaluator",
  "RetrievalEvaluator",
  "ZeroShotEvaluator",
  "build_evaluators",
  "class_embeddings",
  "retrieval_metrics",
]


class Evaluator(Protocol):
  name: str
  every_steps: int

  def run(self, params: Any) -> dict[str, float]: ...


@dataclasses.dataclass(frozen=True)
class EvalContext:
  """What every builder may need besides its own settings."""

  encode_image_fn: Callable[[Any, np.ndarray], Any]
  encode_text_fn: Callable[[Any, np.ndarray, np.ndarray], Any]
  tokenizer: Any
  data_config: Any
  default_batch_size: int
  # Models with an ITM head (see `rerank.CONTEXT_FIELDS`); None for two-tower models.
  encode_image_tokens_fn: Callable[..., Any] | None = None
  encode_text_tokens_fn: Callable[..., Any] | None = None
  itm_score_fn: Callable[..., Any] | None = None


def _check_keys(name: str, settings: dict, required: set[str], optional: set[str]) -> None:
  missing = required - settings.keys()
  unknown = settings.keys() - required - optional - {"type"}
  if missing:
    raise ValueError(f"evaluator {name!r} misses {sorted(missing)}")
  if unknown:
    raise ValueError(
      f"evaluator {name!r} has unknown fields {sorted(unknown)}; "
      f"allowed: {sorted(required | optional | {'type'})}"
    )


_COMMON_OPTIONAL = {"every_steps", "batch_size"}


def _build_retrieval(name: str, settings: dict, ctx: EvalContext) -> RetrievalEvaluator:
  _check_keys(name, settings, {"split"}, _COMMON_OPTIONAL | {"ties"})
  from vlalign.data import pipeline  # Imported here: evaluators need no data code until built.

  return RetrievalEvaluator(
    name,
    ctx.encode_image_fn,
    ctx.encode_text_fn,
    pipeline.make_eval_data(ctx.data_config, ctx.tokenizer, settings["split"]),
    batch_size=settings.get("batch_size", ctx.default_batch_size),
    every_steps=settings.get("every_steps", 0),
    ties=settings.get("ties", "pessimistic"),
  )


def _build_zeroshot(name: str, settings: dict, ctx: EvalContext) -> ZeroShotEvaluator:
  _check_keys(name, settings, {"split", "task"}, _COMMON_OPTIONAL | {"max_len"})
  from vlalign.data import pipeline

  return ZeroShotEvaluator(
    name,
    ctx.encode_image_fn,
    ctx.encode_text_fn,
    ctx.tokenizer,
    pipeline.make_zeroshot_data(ctx.data_config, settings["split"], settings["task"]),
    batch_size=settings.get("batch_size", ctx.default_batch_size),
    every_steps=settings.get("every_steps", 0),
    max_len=settings["max_len"] if "max_len" in settings else ctx.data_config["max_len"],
  )


EVALUATORS: dict[str, Callable[[str, dict, EvalContext], Evaluator]] = {
  "retrieval": _build_retrieval,
  "retrieval_itm": build_retrieval_itm,
  "zeroshot": _build_zeroshot,
}


def _as_dict(settings: Any) -> dict:
  return settings.to_dict() if hasattr(settings, "to_dict") else dict(settings)


def build_evaluators(
  evals_config: Mapping[str, Any],
  *,
  encode_image_fn: Callable[[Any, np.ndarray], Any],
  encode_text_fn: Callable[[Any, np.ndarray, np.ndarray], Any],
  tokenizer: Any,
  data_config: Any,
  default_batch_size: int,
  encode_image_tokens_fn: Callable[..., Any] | None = None,
  encode_text_tokens_fn: Callable[..., Any] | None = None,
  itm_score_fn: Callable[..., Any] | None = None,
) -> dict[str, Evaluator]:
  """Builds one evaluator per entry of `evals_config` (a ConfigDict or dict), in its order.

  Args:
    evals_config: `{name: {type, split, every_steps?, batch_size?, ...}}`.
    encode_image_fn: `(params, images [B, H, W, 3]) -> [B, E]`, host numpy in and out.
    encode_text_fn: `(params, ids [B, L], mask [B, L]) -> [B, E]`, host numpy in and out.
    tokenizer: has `encode_batch(texts, max_len) -> (ids, mask)`.
    data_config: `config.data`, passed to `vlalign.data.pipeline`.
    default_batch_size: encode batch of evaluators that set no `batch_size`.
    encode_image_tokens_fn, encode_text_tokens_fn, itm_score_fn: the model functions of the
      `retrieval_itm` evaluator (see `rerank.RerankRetrievalEvaluator`); None without an ITM head.

  Returns:
    `{name: evaluator}`.
  """
  ctx = EvalContext(
    encode_image_fn,
    encode_text_fn,
    tokenizer,
    data_config,
    default_batch_size,
    encode_image_tokens_fn,
    encode_text_tokens_fn,
    itm_score_fn,
  )
  evaluators = {}
  for name, settings in _as_dict(evals_config).items():
    settings = _as_dict(settings)
    kind = settings.get("type")
    if kind not in EVALUATORS:
      raise ValueError(
        f"evaluator {name!r} has unknown type {kind!r}; known types: {sorted(EVALUATORS)}"
      )
    evaluators[name] = EVALUATORS[kind](name, settings, ctx)
  return evaluators
