"""TCL local mutual-information maximisation (LMI): student global vs teacher locals.

Reference: uta-smile/TCL `models/model_pretrain.py`, `ALBEF.in_batch_g2l_loss`,
`ALBEF.patch_pooling` and the two calls in `ALBEF.forward` (`loss_i2i_inMod_l`, `loss_t2t_inMod_l`).

Equation. For a student global feature g_i `[E]` (`img/emb` or `txt/emb` of sample i) and
teacher local features l_{j,k} `[E]` (pooled image patches or text tokens of sample j) with
validity v_{j,k}:

    u_{i,j,k} = g_i . l_{j,k} / tau
    N_i       = { (j, k') : j != i, v_{j,k'} = 1 }                (in-batch negatives only)
    loss_{i,k} = -log( exp(u_{i,i,k}) / (exp(u_{i,i,k}) + sum_{(j,k') in N_i} exp(u_{i,j,k'})) )
    lmi_img   = mean_{i,k} loss_{i,k}                              (v = 1 everywhere)
    lmi_txt   = mean_i ( sum_k v_{i,k} loss_{i,k} / sum_k v_{i,k} )
    lmi       = (lmi_img + lmi_txt) / 2

* Image locals (`patch_pooling`): the teacher's normalised patch projections (no CLS) laid out on
  their h x h grid and average-pooled; pooled vectors are not re-normalised (as the reference).
* Text locals: the teacher's normalised projections of every token after CLS
  (`last_hidden_state[:, 1:]`), validity `text_mask[:, 1:]`. The reference pushes padded positives
  to +10000 and padded negatives / same-sample negatives to -10000 before the softmax; here padded
  positives are multiplied by zero and excluded negatives get a logit of -1e9, which gives the same
  values (exp underflows to exactly 0 in float32) and no gradient through padded features.
* tau is the clamped student temperature (`vlalign.losses.momentum.temperature`).

Decisions where the reference is silent or does not apply:

* Pooling grid. The reference computes kernel = int(sqrt(h)) and reshapes to kernel^2 locals, which
  gives the 4 x 4 grid only at h = 16 (256 px / patch 16) and fails elsewhere. We always pool to a
  `grid` x `grid` (default 4 x 4) output with kernel h / grid, so N must be a perfect square whose
  side is divisible by `grid`; at h = 16 this is the reference exactly.
* A text whose tokens after CLS are all padding (impossible with CLS + EOS) would divide by zero in
  the reference; we divide by max(count, 1), giving 0.
* The negative set N_i does not depend on k, so its log-sum-exp is computed once per anchor i;
  loss_{i,k} = softplus(lse(N_i) - u_{i,i,k}), equal to the reference's log-softmax of [pos | negs].
"""

import math

import jax
import jax.numpy as jnp

from vlalign.errors import ConfigError
from vlalign.losses import LossContext, Metrics, register, require
from vlalign.losses.momentum import teacher_array, temperature

_EXCLUDED_LOGIT = -1e9


def pool_patches(tokens: jax.Array, grid: int = 4) -> jax.Array:
  """Average-pools patch tokens on their square grid to `grid` x `grid` locals.

  Args:
    tokens: `[B, N, E]` patch features in row-major order, N = h * h, h divisible by `grid`.
    grid: output side (4 in TCL).

  Returns:
    `[B, grid * grid, E]` in row-major order of the pooled grid.
  """
  batch, num, dim = tokens.shape
  side = math.isqrt(num)
  if side * side != num or side % grid:
    raise ConfigError(
      f"{num} patch tokens: need a square h x h grid with h divisible by {grid} for LMI pooling"
    )
  kernel = side // grid
  x = tokens.reshape(batch, grid, kernel, grid, kernel, dim)
  return jnp.mean(x, axis=(2, 4)).reshape(batch, grid * grid, dim)


def in_batch_g2l_loss(
  local_feats: jax.Array,
  global_feats: jax.Array,
  tau: jax.Array,
  valid: jax.Array | None = None,
) -> jax.Array:
  """InfoNCE of each global feature against its own locals, negatives = other samples' locals.

  Args:
    local_feats: `[B, n, E]` teacher locals l_{j,k}.
    global_feats: `[B, E]` student globals g_i.
    tau: `[]` temperature.
    valid: `[B, n]` 1 on real locals, 0 on padding; None means all valid (image).

  Returns:
    `[]` float32 (see the module docstring).
  """
  batch, num_locals, _ = local_feats.shape
  local_feats = local_feats.astype(jnp.float32)
  global_feats = global_feats.astype(jnp.float32)
  scores = jnp.einsum("ie,jke->ijk", global_feats, local_feats) / tau  # [B, B, n]
  positive = jnp.einsum("ie,ike->ik", global_feats, local_feats) / tau  # [B, n]
  other_sample = ~jnp.eye(batch, dtype=bool)[:, :, None]  # [B, B, 1]
  if valid is None:
    valid = jnp.ones((batch, num_locals), jnp.float32)
  valid = valid.astype(jnp.float32)
  is_negative = other_sample & (valid[None, :, :] > 0)  # [B, B, n]
  negatives = jnp.where(is_negative, scores, _EXCLUDED_LOGIT).reshape(batch, batch * num_locals)
  negative_lse = jax.nn.logsumexp(negatives, axis=1)  # [B]
  per_local = jax.nn.softplus(negative_lse[:, None] - positive)  # [B, n]
  per_sample = jnp.sum(valid * per_local, axis=1) / jnp.maximum(jnp.sum(valid, axis=1), 1.0)
  return jnp.mean(per_sample)


def lmi_terms(
  outputs: dict[str, jax.Array], ctx: LossContext, grid: int = 4
) -> dict[str, jax.Array]:
  """`{"img", "txt"}`: the image and text LMI terms, each `[]`."""
  require(ctx, "lmi", teacher=("img/tokens_emb", "txt/tokens_emb"))
  tau = temperature(outputs)
  img_locals = pool_patches(teacher_array(ctx, "img/tokens_emb"), grid)
  txt_locals = teacher_array(ctx, "txt/tokens_emb")[:, 1:]
  txt_valid = ctx.batch["text_mask"][:, 1:]
  return {
    "img": in_batch_g2l_loss(img_locals, outputs["img/emb"], tau),
    "txt": in_batch_g2l_loss(txt_locals, outputs["txt/emb"], tau, txt_valid),
  }


@register("lmi")
def lmi(
  outputs: dict[str, jax.Array], ctx: LossContext, grid: int = 4
) -> tuple[jax.Array, Metrics]:
  """TCL local MI: student `img/emb`, `txt/emb` `[B, E]` vs `ctx.teacher` `img/tokens_emb`
  `[B, N, E]` (pooled to grid x grid) and `txt/tokens_emb` `[B, L, E]` (after CLS, padding
  masked by `ctx.batch["text_mask"]`).

  Returns:
    `((img + txt) / 2, {"img", "txt"})`.
  """
  terms = lmi_terms(outputs, ctx, grid)
  return 0.5 * (terms["img"] + terms["txt"]), terms
