"""Evaluators built from `config.evals`.

`config.evals` maps an evaluator name to its settings, e.g.

    config.evals = dict(
      val=dict(type="retrieval", split="val", every_steps=500),
      zeroshot_color=dict(type="zeroshot", split="test", task="color", every_steps=0),
    )

`every_steps=0` runs an evaluator only at the end of training; `batch_size` overrides the default
encode batch. Every evaluator has `name`, `every_steps` and `run(params) -> {metric: float}`.

Adding an evaluator type: a builder `(name, settings, ctx) -> Evaluator` decorated with
`@EVALUATORS.register("<type>")` (`vlalign/evaluation/common.py`) in a module of this package; the
prediction functions it needs come from `ctx.predict_fn(...)` (the method's `predict_fns`).
"""

from collections.abc import Callable, Mapping
from typing import Any

from vlalign.errors import ConfigError
from vlalign.evaluation import lexical  # noqa: F401 - registers patchdis, lexical_words
from vlalign.evaluation.common import EVALUATORS, EvalContext, Evaluator
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


def _as_dict(settings: Any) -> dict:
  return settings.to_dict() if hasattr(settings, "to_dict") else dict(settings)


def build_evaluators(
  evals_config: Mapping[str, Any],
  *,
  predict: Mapping[str, Callable[..., Any]],
  tokenizer: Any,
  data_config: Any,
  default_batch_size: int,
  check_only: bool = False,
  output_dir: Any = None,
) -> dict[str, Evaluator]:
  """Builds one evaluator per entry of `evals_config` (a ConfigDict or dict), in its order.

  Args:
    evals_config: `{name: {type, split, every_steps?, batch_size?, ...}}`.
    predict: prediction functions by name, host numpy in and out (see `EvalContext`).
    tokenizer: has `encode_batch(texts, max_len) -> (ids, mask)`.
    data_config: `config.data`, passed to `vlalign.data.pipeline`.
    default_batch_size: encode batch of evaluators that set no `batch_size`.
    check_only: only validate every entry (no data is loaded); returns `{}`.
    output_dir: where evaluators may write files (plots); None: they write none.

  Returns:
    `{name: evaluator}`.
  """
  ctx = EvalContext(predict, tokenizer, data_config, default_batch_size, check_only, output_dir)
  evaluators = {}
  for name, settings in _as_dict(evals_config).items():
    settings = _as_dict(settings)
    kind = settings.get("type")
    if kind not in EVALUATORS.names():
      raise ConfigError(
        f"evaluator {name!r} has unknown type {kind!r}; known types: {EVALUATORS.names()}"
      )
    evaluator = EVALUATORS.get(kind)(name, settings, ctx)
    if not check_only:
      evaluators[name] = evaluator
  return evaluators
