"""CODIS (Duan et al., CVPR 2022): ALBEF's momentum distillation + a representation codebook.

Image and text are two views of one entity, encoded into a joint space spanned by K learnable
cluster centres (`model.codebook_size`, the model's `codebook` output). Everything of the
`momentum` method stays (EMA teachers, queues, alpha, ITM, MLM; TCL's second image view for the
teacher), and before the gradient this method adds the teachers' balanced assignments of
[teacher batch | queue] to the centres (Sinkhorn-Knopp), which the codebook losses
(`vlalign/losses/codebook.py`) use as targets:

    ctx.teacher["img/codes"], ctx.teacher["txt/codes"]   [B, K], rows sum to 1 (the batch)
    ctx.teacher["queue"]["img/codes"], ["txt/codes"]      [Q, K], the queue rows (sinkhorn_queue:
                                                          assigned in one Sinkhorn with the batch)

It also keeps `extras["codes/last_used"]` `[K]` (the last step a code was some teacher sample's
argmax), logs `codes/used` and `codes/dead` over the last `usage_window` steps, and can
re-initialise dead centres to teacher embeddings of the batch (`reinit_dead`).

Config section `codis` (all optional): epsilon (0.05), sinkhorn_iterations (3), sinkhorn_queue
(True: assign the queue rows too, which also gives `code_contrast` its negatives),
target_codebook ("student": the current centres without gradient; "teacher": the teacher's EMA
centres), usage_window (100 steps), reinit_dead (False). Equations and sources: docs/methods.md.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from vlalign.errors import ConfigError
from vlalign.losses import LossContext
from vlalign.losses.codebook import sinkhorn
from vlalign.methods import register
from vlalign.methods.base import Batch, Outputs, check_section
from vlalign.methods.momentum import MomentumDistillation

DEFAULTS = dict(
  epsilon=0.05,
  sinkhorn_iterations=3,
  sinkhorn_queue=True,
  target_codebook="student",
  usage_window=100,
  reinit_dead=False,
)
NEVER = -(2**30)  # `codes/last_used` of a code no teacher sample has picked yet
CODE_PARAMS = ("codebook", "centres")  # the Codebook module's parameter path below `params`


def codes_last_used(last_used: jax.Array, codes: jax.Array, step: jax.Array) -> jax.Array:
  """`last_used` `[K]` with `step` where some row of `codes` `[N, K]` has its argmax."""
  picked = jnp.zeros(last_used.shape, bool).at[jnp.argmax(codes, axis=-1)].set(True)
  return jnp.where(picked, step, last_used)


def recently_used(last_used: jax.Array, step: jax.Array, window: int) -> jax.Array:
  """`[K]` bool: picked within the last `window` steps (up to and including `step`)."""
  return step - last_used < window


@register("codis")
class Codis(MomentumDistillation):
  """Momentum distillation with a representation codebook; see the module docstring."""

  config_fields = (*MomentumDistillation.config_fields, "codis")

  def validate(self) -> None:
    super().validate()
    size = int(self.config.model.get("codebook_size") or 0)
    if size <= 0:
      raise ConfigError("method 'codis' needs a codebook: set config.model.codebook_size > 0")
    fields = {}
    if self.config.get("codis") is not None:
      fields = check_section(self.config, "codis", set(), set(DEFAULTS))
    self.codis = {**DEFAULTS, **fields}
    if float(self.codis["epsilon"]) <= 0 or int(self.codis["sinkhorn_iterations"]) < 1:
      raise ConfigError("config.codis needs epsilon > 0 and sinkhorn_iterations >= 1")
    if self.codis["target_codebook"] not in ("student", "teacher"):
      raise ConfigError("config.codis.target_codebook must be 'student' or 'teacher'")
    if int(self.codis["usage_window"]) < 1:
      raise ConfigError("config.codis.usage_window must be >= 1")
    self.codebook_size = size

  def init_extras(self, params: Any, rng: jax.Array) -> dict[str, Any]:
    extras = super().init_extras(params, rng)
    extras["codes/last_used"] = jnp.full((self.codebook_size,), NEVER, jnp.int32)
    return extras

  def codebook(self, params: Any) -> jax.Array:
    """`[K, E]` unit centres of `params`."""
    return self.model.apply(params, method=lambda module: module.codebook())

  def assign(self, feats: jax.Array, codebook: jax.Array) -> jax.Array:
    """Balanced codes `[N, K]` of teacher features `[N, E]` (no gradient)."""
    scores = jax.lax.stop_gradient(feats) @ jax.lax.stop_gradient(codebook).T
    return sinkhorn(scores, float(self.codis["epsilon"]), int(self.codis["sinkhorn_iterations"]))

  def before_gradient(self, state: Any, batch: Batch, rng: jax.Array) -> LossContext:
    ctx = super().before_gradient(state, batch, rng)
    if self.codis["target_codebook"] == "teacher":
      codebook = ctx.teacher["codebook"]
    else:
      codebook = self.codebook(state.params)
    teacher, queue_codes = dict(ctx.teacher), {}
    for modality, queue in (("img", "queue/img"), ("txt", "queue/txt")):
      feats = ctx.teacher[f"{modality}/emb"]
      batch_size = feats.shape[0]
      if self.codis["sinkhorn_queue"]:
        feats = jnp.concatenate([feats, ctx.extras[queue].astype(feats.dtype)])
      codes = self.assign(feats, codebook)
      teacher[f"{modality}/codes"] = codes[:batch_size]
      if self.codis["sinkhorn_queue"]:
        queue_codes[f"{modality}/codes"] = codes[batch_size:]
    if queue_codes:
      teacher["queue"] = queue_codes
    return ctx.replace(teacher=teacher)

  def after_update(self, ctx: LossContext, outputs: Outputs, params: Any) -> dict[str, Any]:
    extras = super().after_update(ctx, outputs, params)
    last_used = extras["codes/last_used"]
    for modality in ("img", "txt"):
      codes = ctx.teacher[f"{modality}/codes"]
      last_used = codes_last_used(last_used, codes, ctx.step)
    if self.codis["reinit_dead"]:
      window = int(self.codis["usage_window"])
      dead = ~recently_used(last_used, ctx.step, window) & (ctx.step >= window)
      extras["codes/reinit"] = dead
      last_used = jnp.where(dead, ctx.step, last_used)  # a re-initialised code starts afresh
    extras["codes/last_used"] = last_used
    return extras

  def refresh_params(self, ctx: LossContext, params: Any, extras: dict[str, Any]) -> Any:
    """With `reinit_dead`: each dead centre becomes the teacher embedding of a random sample of
    the batch (image or text), so that it starts where the data is."""
    if not self.codis["reinit_dead"]:
      return params
    feats = jnp.concatenate([ctx.teacher["img/emb"], ctx.teacher["txt/emb"]])
    rng = jax.random.fold_in(ctx.rngs["sample"], 1)
    picks = jax.random.randint(rng, (self.codebook_size,), 0, feats.shape[0])
    node = params["params"]
    for key in CODE_PARAMS[:-1]:
      node = node[key]
    centres = node[CODE_PARAMS[-1]]
    new = jnp.where(extras["codes/reinit"][:, None], feats[picks].astype(centres.dtype), centres)
    codebook = {**params["params"][CODE_PARAMS[0]], CODE_PARAMS[1]: new}
    return {**params, "params": {**params["params"], CODE_PARAMS[0]: codebook}}

  def step_metrics(
    self, ctx: LossContext, outputs: Outputs, extras: dict[str, Any]
  ) -> dict[str, jax.Array]:
    used = recently_used(extras["codes/last_used"], ctx.step, int(self.codis["usage_window"]))
    metrics = {"codes/used": jnp.sum(used), "codes/dead": self.codebook_size - jnp.sum(used)}
    if "codes/reinit" in extras:
      metrics["codes/reinitialised"] = jnp.sum(extras["codes/reinit"])
    return {k: v.astype(jnp.float32) for k, v in metrics.items()}

  def predict_fns(self) -> dict[str, Callable[..., Any]]:
    """The `momentum` method's, plus `codebook(params) -> [K, E]` for the `codebook` evaluator
    and the codebook report."""
    return {**super().predict_fns(), "codebook": self.codebook}
