"""The method interface, and the plain two-tower contrastive method (CLIP, SigLIP) that implements
it with nothing extra.

The generic train step (`vlalign/step.py`) runs, for every method:

    rng = fold_in(state.rng, state.step)
    ctx = method.before_gradient(state, batch, rng)          # teachers, masking, views, schedules
    grads of  sum_i w_i * loss_i(method.forward(params, ctx), ctx)   over the trainable params
    params = optimizer update (frozen sub-trees never change)
    extras = method.after_update(ctx, outputs, params)       # EMA statistics, enqueue, ...
    params = method.refresh_params(ctx, params, extras)      # e.g. re-initialise dead codes
    metrics += method.step_metrics(ctx, outputs, extras)     # e.g. codebook health

and the trainer asks it for the extra train state (`init_extras`), the sub-trees it keeps frozen
(`frozen_patterns`) and the prediction functions its evaluators need (`predict_fns`). A subclass
overrides only what it changes.
"""

from collections.abc import Callable
from typing import Any

import jax

from vlalign.errors import ConfigError
from vlalign.losses import LossContext
from vlalign.methods import register

Outputs = dict[str, jax.Array]
Batch = dict[str, jax.Array]

# Named streams of a step's rng (`ctx.rngs`), split in this order from `fold_in(rng, step)`.
RNG_STREAMS = ("dropout", "teacher", "mask", "sample")


def check_section(config: Any, section: str, required: set[str], optional: set[str]) -> dict:
  """`config[section]` as a dict, with a clear error for missing or unknown fields."""
  if config.get(section) is None:
    raise ConfigError(f"config.{section} is required by method {config.method!r}")
  fields = config[section]
  fields = dict(fields.to_dict() if hasattr(fields, "to_dict") else fields)
  missing, unknown = required - set(fields), set(fields) - required - optional
  if missing or unknown:
    raise ConfigError(
      f"config.{section}: missing {sorted(missing)}, unknown {sorted(unknown)}; fields of "
      f"method {config.method!r}: required {sorted(required)}, optional {sorted(optional)}"
    )
  return fields


@register("two_tower")
class Method:
  """Two towers trained with in-batch contrastive losses (`itc`, `siglip`): no teacher, no extra
  state, every parameter trains (unless `config.optim.frozen` says otherwise).

  Attributes:
    config_fields: top-level config sections this method reads besides the generic ones (a config
      holding a section no part of the run reads is an error, not a silent no-op).
    config, model, tokenizer: what the method was built for.
  """

  config_fields: tuple[str, ...] = ()
  # Whether this method's losses read the student's token outputs (`img/tokens`, `txt/tokens`).
  # When they do not, `forward` asks the model to leave them out, and the towers pooled from one
  # token compute their last block for that token only (`TwoTower.__call__`'s `tokens`): the same
  # pooled outputs for ~1/depth less work. A loss that reads them then fails with a KeyError
  # naming the key; a subclass whose losses need them sets this True.
  student_tokens: bool = False

  def __init__(self, config: Any, model: Any, tokenizer: Any):
    self.config = config
    self.model = model
    self.tokenizer = tokenizer
    self.validate()

  def validate(self) -> None:
    """Raises ValueError for a config this method cannot run. Called by `__init__`."""

  def frozen_patterns(self) -> tuple[str, ...]:
    """Parameter path patterns (regular expressions, as `config.optim.frozen`) this method never
    trains, on top of the config's."""
    return ()

  def init_extras(self, params: Any, rng: jax.Array) -> dict[str, Any]:
    """The method's state besides the parameters (`TrainState.extras`) for fresh `params`."""
    del params, rng
    return {}

  def split_rngs(self, rng: jax.Array) -> dict[str, jax.Array]:
    """`{stream: key}` for the streams of `RNG_STREAMS`, from the step's rng."""
    return dict(zip(RNG_STREAMS, jax.random.split(rng, len(RNG_STREAMS)), strict=True))

  def before_gradient(self, state: Any, batch: Batch, rng: jax.Array) -> LossContext:
    """The losses' context for this step: runs before the student's forward pass.

    Args:
      state: the `TrainState` before the update.
      batch: the global input batch.
      rng: `fold_in(state.rng, state.step)`.
    """
    return LossContext(step=state.step, batch=batch, extras=state.extras, rngs=self.split_rngs(rng))

  def forward(self, params: Any, ctx: LossContext) -> Outputs:
    """The student's outputs (with gradient) on `ctx.batch` (without the token outputs unless
    `student_tokens`)."""
    rngs = {"dropout": ctx.rngs["dropout"]}
    return self.model.apply(params, ctx.batch, train=True, rngs=rngs, **self.token_options())

  def token_options(self) -> dict[str, bool]:
    """The keyword arguments of the model's calls: `{"tokens": False}` unless `student_tokens`."""
    return {} if self.student_tokens else {"tokens": False}

  def after_update(self, ctx: LossContext, outputs: Outputs, params: Any) -> dict[str, Any]:
    """The new `TrainState.extras` after the optimizer update.

    Args:
      ctx: this step's context (`ctx.extras` as the losses saw it).
      outputs: the student's outputs of this step, without gradient.
      params: the updated parameters.
    """
    del outputs, params
    return ctx.extras

  def refresh_params(self, ctx: LossContext, params: Any, extras: dict[str, Any]) -> Any:
    """Parameters after the update and `after_update`, changed by a rule rather than a gradient
    (e.g. dead codebook entries re-initialised). Frozen leaves stay unchanged whatever this does."""
    del ctx, extras
    return params

  def step_metrics(
    self, ctx: LossContext, outputs: Outputs, extras: dict[str, Any]
  ) -> dict[str, jax.Array]:
    """Scalars to log as `train/<name>` besides the losses' (e.g. statistics kept in `extras`)."""
    del ctx, outputs, extras
    return {}

  def predict_fns(self) -> dict[str, Callable[..., Any]]:
    """Pure `(params, *arrays) -> arrays` functions the evaluators call by name (the trainer jits
    them on the mesh): `encode_image(params, images [B, H, W, 3]) -> [B, E]` and
    `encode_text(params, ids [B, L], mask [B, L]) -> [B, E]`, L2-normalised embeddings."""
    model, cls = self.model, type(self.model)
    options = self.token_options()

    def encode_image(params, images):
      return model.apply(params, images, **options, method=cls.encode_image)["img/emb"]

    def encode_text(params, ids, mask):
      return model.apply(params, ids, mask, **options, method=cls.encode_text)["txt/emb"]

    return {"encode_image": encode_image, "encode_text": encode_text}
