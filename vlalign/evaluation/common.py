"""What every evaluator builder shares: the registry, the build context, settings checks.

An evaluator type is a builder `(name, settings, ctx) -> Evaluator` registered with
`@EVALUATORS.register("<type>")` in a module of `vlalign.evaluation` (or of `config.imports`);
`config.evals` entries pick it by `type`. Every evaluator has `name`, `every_steps` and
`run(params) -> {metric: float}`.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from vlalign.errors import ConfigError
from vlalign.registry import Registry


class Evaluator(Protocol):
  name: str
  every_steps: int

  def run(self, params: Any, step: int | None = None) -> dict[str, float]:
    """`{metric: value}` of `params` (from train step `step`, for evaluators that write files)."""
    ...


@dataclasses.dataclass(frozen=True)
class EvalContext:
  """What every builder may need besides its own settings.

  Attributes:
    predict: the method's prediction functions by name (`Method.predict_fns`), host numpy in and
      out, e.g. `encode_image(params, images) -> [B, E]`, `encode_text(params, ids, mask)`.
    tokenizer: has `encode_batch(texts, max_len) -> (ids, mask)`.
    data_config: `config.data`, passed to `vlalign.data.pipeline`.
    default_batch_size: encode batch of evaluators that set no `batch_size`.
    check_only: builders validate their settings (fields, the prediction functions, whether the
      split can give meaningful metrics) and return None without loading data.
    output_dir: where evaluators may write files (plots), or None (they write none).
  """

  predict: Mapping[str, Callable[..., Any]]
  tokenizer: Any
  data_config: Any
  default_batch_size: int
  check_only: bool = False
  output_dir: Any = None

  def predict_fn(self, fn_name: str, evaluator: str, kind: str) -> Callable[..., Any]:
    """`predict[fn_name]`, or a clear error naming what the configured method provides."""
    if fn_name not in self.predict:
      raise ConfigError(
        f"evaluator {evaluator!r} of type {kind!r} needs the prediction function {fn_name!r}, "
        f"which the configured method/model does not provide (it provides {sorted(self.predict)})"
      )
    return self.predict[fn_name]


Builder = Callable[[str, dict, EvalContext], Evaluator]
EVALUATORS: Registry[Builder] = Registry("evaluator type", "vlalign.evaluation")

COMMON_OPTIONAL = {"every_steps", "batch_size"}


def check_keys(name: str, settings: dict, required: set[str], optional: set[str]) -> None:
  """Clear errors for missing and unknown fields of one evaluator's settings."""
  missing = required - settings.keys()
  unknown = settings.keys() - required - optional - COMMON_OPTIONAL - {"type"}
  if missing:
    raise ConfigError(f"evaluator {name!r} misses {sorted(missing)}")
  if unknown:
    raise ConfigError(
      f"evaluator {name!r} has unknown fields {sorted(unknown)}; "
      f"allowed: {sorted(required | optional | COMMON_OPTIONAL | {'type'})}"
    )


def check_recall_candidates(name: str, split: str, num_images: int, ks) -> None:
  """Recall@k over fewer than k candidates is 100 by construction: a ConfigError, not a metric."""
  too_large = [k for k in ks if k > num_images]
  if too_large:
    raise ConfigError(
      f"evaluator {name!r}: the {split!r} split has {num_images} images, fewer than "
      f"k={too_large}: those recalls would be 100 whatever the model; use a split of at least "
      f"{max(ks)} images (data.{split}_size)"
    )
