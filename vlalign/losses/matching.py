"""ALBEF/TCL fusion-encoder losses: ITM hard-negative sampling and loss, MLM masking and loss.

The registered losses `itm` and `mlm` read what the fusion passes of `ALBEFModel` put in the
outputs (`itm/logits` `[3B, 2]`, `mlm/logits` `[B, L, V]`); the momentum-distillation method
(`vlalign/methods/momentum.py`) masks the text (`mask_tokens`, into `ctx.inputs`) and samples the
hard negatives (`sample_hard_negatives`) from the student's and the teacher's embeddings.

Reference: uta-smile/TCL `models/model_pretrain.py` (`ALBEF.forward`, `ALBEF.mask`),
`models/model_retrieval.py` (`ALBEF.forward`: image-id mask), `models/xbert.py`
(`BertForMaskedLM.forward`: MLM loss with `soft_labels`).

Equations:

* Hard negatives (`ALBEF.forward`): w_i2t = softmax(sim_i2t[:, :B]), w_t2i = softmax(sim_t2i[:, :B])
  with the excluded pairs set to 0, then `torch.multinomial` (which renormalises). So for image i,
  P(text j) = exp(sim_i2t[i, j]) / sum_{j' allowed} exp(sim_i2t[i, j']), and likewise for texts.
  In the reference `sim_i2t = student_img . [teacher_txt | queue] / tau`; its first B columns
  (student image vs teacher text) are what the step should pass in.
* ITM (`ALBEF.forward`): pairs [(t_b, v_b)]_b (label 1), then [(t_b, v_{neg_image[b]})]_b and
  [(t_{neg_text[b]}, v_b)]_b (label 0); loss = mean over the 3B pairs of CE(itm_head(fusion CLS)).
* Masking (`ALBEF.mask`): each token is chosen with probability p = 0.15 (`mlm_probability`);
  chosen tokens become [MASK] with probability 0.8, else a uniformly random id in [0, vocab) with
  probability 0.5, else stay; labels are the original id on chosen tokens and -100 elsewhere.
* MLM (`BertForMaskedLM.forward`), with q[b, l] = softmax(teacher_logits[b, l], over v) (the
  reference's `soft_labels = F.softmax(logits_m, dim=-1)`, `model_pretrain.py`):
  loss = (1 - alpha) * mean_{masked (b, l)} CE(logits[b, l], label[b, l])
         + alpha * mean_{masked (b, l)} -sum_v q[b, l, v] * S[b, l, v],
  where S is the student's log-softmax, in one of two forms (`mlm(distill_form=...)`):
  - "fixed" (default; the reference after the upstream fix, `log_softmax(dim=-1)`): over the
    vocabulary, S[b, l, v] = logits[b, l, v] - logsumexp_{v'} logits[b, l, v'], so the term is
    the cross-entropy of the student's token distribution to the teacher's.
  - "published" (before the fix, `log_softmax(prediction_scores, dim=1)` on `[B, L, V]`): over
    the sequence positions, S[b, l, v] = logits[b, l, v] - logsumexp_{l' < L*} logits[b, l', v],
    where L* is the length of the longest text in the batch the loss is given (the reference
    tokenizes with `padding='longest'`, so its L is the longest caption of the per-GPU batch and
    its pad positions below L* take part in the normalisation; our batches are padded to a fixed
    L, so the columns l >= L* are left out). This is not a cross-entropy over the vocabulary.
  The published ALBEF and TCL numbers were trained with the "published" form: ALBEF's release
  (2021-07-15) had `dim=1` until salesforce/ALBEF b726f8e (2022-03-01), TCL's until
  uta-smile/TCL 74a3e4f (2022-08-04, "fix a bug in loss_distill calculation").
  The teacher (momentum) model sees the same masked ids and the teacher's image features.

Decisions where the reference is silent or differs:

* Excluded pairs: ALBEF pre-training zeroes only the diagonal, retrieval fine-tuning zeroes equal
  image ids; `sample_hard_negatives` excludes both for the ids it is given (the `momentum` method
  passes `arange(B)` for the pre-training rule, `itm.exclude_same_image = False`).
  If a row has no allowed pair (every sample shares the image), the reference's
  `multinomial` raises and its fallback draws uniformly among j != i; we do the same.
* Sampling is done in log space (`jax.random.categorical`), so rows whose softmax would underflow
  to zero (tau near 0.001) still sample in proportion to the weights instead of falling back.
* Special tokens: the reference never masks PAD and CLS (by id) but may mask SEP/EOS. We never mask
  `special_ids` nor positions with `mask == 0`; pass `special_ids=(cls_id, pad_id)` to reproduce the
  reference exactly. Random replacement ids are drawn from the whole vocabulary (specials
  included), as the reference.
* A batch with no masked token makes the reference's means NaN; we divide by max(count, 1) (loss 0).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from vlalign.errors import ConfigError
from vlalign.losses import LossContext, Metrics, register, require, require_output

IGNORE_LABEL = -100
DISTILL_FORMS = ("fixed", "published")
MASK_PROB_REPLACE = 0.8
MASK_PROB_RANDOM_OF_REST = 0.5


def negative_mask(image_id: jax.Array) -> jax.Array:
  """`[B, B]` True where pair (i, j) may not be a negative: i == j or the same image id."""
  same_image = image_id[:, None] == image_id[None, :]
  return same_image | jnp.eye(image_id.shape[0], dtype=bool)


def _sample_rows(rng: jax.Array, sim: jax.Array, excluded: jax.Array) -> jax.Array:
  """One column per row, P(j) proportional to exp(sim[i, j]) over the allowed j; `[B]` int32."""
  batch = sim.shape[0]
  logits = jnp.where(excluded, -jnp.inf, sim.astype(jnp.float32))
  not_self = jnp.where(jnp.eye(batch, dtype=bool), -jnp.inf, 0.0)
  has_allowed = jnp.any(~excluded, axis=1, keepdims=True)
  logits = jnp.where(has_allowed, logits, not_self)
  return jax.random.categorical(rng, logits, axis=1).astype(jnp.int32)


def sample_hard_negatives(
  sim_i2t: jax.Array, sim_t2i: jax.Array, image_id: jax.Array, rng: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Samples one hard negative text per image and one hard negative image per text.

  Args:
    sim_i2t: `[B, B]` image i vs text j logits (already divided by the temperature).
    sim_t2i: `[B, B]` text i vs image j logits.
    image_id: `[B]` int image ids; pairs with equal ids (and the diagonal) are never drawn.
    rng: PRNG key.

  Returns:
    `(neg_text_idx [B], neg_image_idx [B])` int32: `neg_text_idx[i]` is the text paired with image i
    as a negative, `neg_image_idx[i]` the image paired with text i.
  """
  text_rng, image_rng = jax.random.split(rng)
  excluded = negative_mask(image_id)
  sim_i2t, sim_t2i = jax.lax.stop_gradient((sim_i2t, sim_t2i))
  neg_text_idx = _sample_rows(text_rng, sim_i2t, excluded)
  neg_image_idx = _sample_rows(image_rng, sim_t2i, excluded)
  return neg_text_idx, neg_image_idx


def itm_labels(batch_size: int) -> jax.Array:
  """`[3B]` int32: B ones (positive pairs) then 2B zeros (the two sets of hard negatives)."""
  return jnp.concatenate([jnp.ones(batch_size, jnp.int32), jnp.zeros(2 * batch_size, jnp.int32)])


def itm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross-entropy of the ITM head.

  Args:
    logits: `[3B, 2]` ITM head outputs (class 1 = matched).
    labels: `[3B]` int, see `itm_labels`.

  Returns:
    `[]` float32.
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
  return -jnp.mean(picked)


def mask_tokens(
  ids: jax.Array,
  mask: jax.Array,
  rng: jax.Array,
  *,
  vocab_size: int,
  mask_id: int,
  special_ids: Sequence[int],
  prob: float = 0.15,
) -> tuple[jax.Array, jax.Array]:
  """BERT masking (80% [MASK], 10% random id, 10% unchanged) of the chosen tokens.

  Args:
    ids: `[B, L]` int token ids.
    mask: `[B, L]` 1 on real tokens, 0 on padding (never chosen).
    rng: PRNG key.
    vocab_size: random replacements are drawn from [0, vocab_size).
    mask_id: id of [MASK].
    special_ids: ids never chosen (the reference: CLS and PAD).
    prob: probability that a token is chosen.

  Returns:
    `(input_ids [B, L], labels [B, L])`: labels hold the original id where chosen, -100 elsewhere.
  """
  choose_rng, replace_rng, random_rng, word_rng = jax.random.split(rng, 4)
  shape = ids.shape
  maskable = (mask > 0) & ~jnp.isin(ids, jnp.asarray(list(special_ids), ids.dtype))
  chosen = jax.random.bernoulli(choose_rng, prob, shape) & maskable
  replaced = jax.random.bernoulli(replace_rng, MASK_PROB_REPLACE, shape) & chosen
  randomised = jax.random.bernoulli(random_rng, MASK_PROB_RANDOM_OF_REST, shape)
  randomised = randomised & chosen & ~replaced
  random_words = jax.random.randint(word_rng, shape, 0, vocab_size, dtype=ids.dtype)
  input_ids = jnp.where(replaced, jnp.asarray(mask_id, ids.dtype), ids)
  input_ids = jnp.where(randomised, random_words, input_ids)
  labels = jnp.where(chosen, ids, IGNORE_LABEL).astype(jnp.int32)
  return input_ids, labels


def _check_distill_form(distill_form: str) -> None:
  if distill_form not in DISTILL_FORMS:
    raise ConfigError(f"mlm distill_form={distill_form!r}: expected one of {list(DISTILL_FORMS)}")


def published_log_probs(logits: jax.Array, text_mask: jax.Array) -> jax.Array:
  """The pre-fix reference's `log_softmax(prediction_scores, dim=1)`: over positions, not ids.

  Args:
    logits: `[B, L, V]` float32 student MLM logits.
    text_mask: `[B, L]` 1 on real tokens, 0 on padding.

  Returns:
    `[B, L, V]` float32: `logits[b, l, v] - logsumexp_{l' < L*} logits[b, l', v]` for l < L*, where
    L* is the longest text of the batch (the last position any row's mask covers, plus one); 0 for
    l >= L* (positions that `padding='longest'` would not have made).
  """
  positions = jnp.arange(logits.shape[1])
  longest = jnp.max(jnp.where(text_mask > 0, positions[None, :] + 1, 0))
  in_batch = (positions < longest)[None, :, None]
  log_probs = jax.nn.log_softmax(jnp.where(in_batch, logits, -jnp.inf), axis=1)
  return jnp.where(in_batch, log_probs, 0.0)


def mlm_loss(
  logits: jax.Array,
  labels: jax.Array,
  teacher_logits: jax.Array | None,
  alpha: float | jax.Array,
  *,
  distill_form: str = "fixed",
  text_mask: jax.Array | None = None,
) -> jax.Array:
  """(1 - alpha) * CE(labels) + alpha * distillation term, each a mean over masked tokens.

  The distillation term is -sum_v softmax(teacher_logits)_v * S_v, S the student's log-softmax over
  the vocabulary (`distill_form="fixed"`) or over the positions below the batch's longest text
  (`"published"`, see `published_log_probs` and the module docstring).

  Args:
    logits: `[B, L, V]` student MLM logits.
    labels: `[B, L]` int original ids at masked positions, -100 elsewhere.
    teacher_logits: `[B, L, V]` momentum-model logits on the same input, or None (plain MLM).
    alpha: `[]` distillation weight.
    distill_form: "fixed" or "published".
    text_mask: `[B, L]` 1 on real tokens; required by `distill_form="published"`.

  Returns:
    `[]` float32.
  """
  _check_distill_form(distill_form)
  is_masked = labels != IGNORE_LABEL
  count = jnp.maximum(jnp.sum(is_masked), 1).astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  safe_labels = jnp.where(is_masked, labels, 0).astype(jnp.int32)
  label_log_prob = jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
  hard = -jnp.sum(jnp.where(is_masked, label_log_prob, 0.0)) / count
  if teacher_logits is None:
    return hard
  if distill_form == "published":
    if text_mask is None or text_mask.shape != labels.shape:
      shape = None if text_mask is None else text_mask.shape
      raise ValueError(f"distill_form='published' needs text_mask {labels.shape}, got {shape}")
    log_probs = published_log_probs(logits.astype(jnp.float32), text_mask)
  soft_labels = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32), axis=-1)
  distill_per_token = -jnp.sum(soft_labels * log_probs, axis=-1)
  distill = jnp.sum(jnp.where(is_masked, distill_per_token, 0.0)) / count
  return (1.0 - alpha) * hard + alpha * distill


@register("itm")
def itm(outputs: dict[str, jax.Array], ctx: LossContext) -> tuple[jax.Array, Metrics]:
  """Image-text matching on positives + hard negatives: `itm_loss(outputs["itm/logits"])`.

  Returns:
    `(loss, {"accuracy"})`, accuracy over the 3B pairs.
  """
  del ctx
  hint = "use model.name='albef' with method 'momentum' and a config.itm section"
  logits = require_output(outputs, "itm/logits", "itm", hint)
  labels = itm_labels(logits.shape[0] // 3)
  accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
  return itm_loss(logits, labels), {"accuracy": accuracy}


@register("mlm")
def mlm(
  outputs: dict[str, jax.Array],
  ctx: LossContext,
  distill: bool = True,
  distill_form: str = "fixed",
) -> tuple[jax.Array, Metrics]:
  """Masked language modelling conditioned on the image, momentum-distilled when `distill`.

  Reads `outputs["mlm/logits"]` `[B, L, V]`, `ctx.inputs["mlm_labels"]` `[B, L]` and, with
  `distill`, `ctx.teacher["mlm/logits"]` and `ctx.schedules["alpha"]`; with
  `distill_form="published"` also `ctx.batch["text_mask"]` `[B, L]`.

  Args:
    outputs: the student's outputs.
    ctx: the loss context.
    distill: add the momentum-distillation term.
    distill_form: "fixed" (default): the student's log-softmax over the vocabulary, the reference
      after its fix. "published": over the positions below the longest text of the batch this
      loss is given, the reference before the fix, which the ALBEF / TCL papers' numbers used.
      Only meaningful with `distill`.

  Returns:
    `(mlm_loss(...), {"accuracy"})`, accuracy of the student's argmax on the masked tokens.
  """
  _check_distill_form(distill_form)
  hint = "use model.name='albef' with method 'momentum' and a config.mlm section (masking)"
  logits = require_output(outputs, "mlm/logits", "mlm", hint)
  require(ctx, "mlm", inputs=("mlm_labels",))
  labels = ctx.inputs["mlm_labels"]
  teacher_logits, alpha, text_mask = None, 0.0, None
  if distill:
    require(ctx, "mlm(distill=True)", teacher=("mlm/logits",), schedules=("alpha",))
    teacher_logits, alpha = ctx.teacher["mlm/logits"], ctx.schedules["alpha"]
  elif distill_form != "fixed":
    raise ConfigError(
      f"mlm distill_form={distill_form!r} shapes the distillation term: needs distill"
    )
  if distill and distill_form == "published":
    if "text_mask" not in ctx.batch:
      raise ConfigError("loss 'mlm' with distill_form='published' needs ctx.batch['text_mask']")
    text_mask = ctx.batch["text_mask"]
  is_masked = labels != IGNORE_LABEL
  hits = jnp.sum((jnp.argmax(logits, axis=-1) == labels) & is_masked)
  accuracy = hits / jnp.maximum(jnp.sum(is_masked), 1)
  loss = mlm_loss(
    logits, labels, teacher_logits, alpha, distill_form=distill_form, text_mask=text_mask
  )
  return loss, {"accuracy": accuracy}
