"""Tests for vlalign.losses.matching: ITM hard negatives and loss, MLM masking and loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlalign import losses
from vlalign.losses import matching
from vlalign.testing import loss_context, run_sharded_and_single

PAD, CLS, SEP, MASK = 0, 1, 2, 3
SPECIALS = (PAD, CLS)  # the reference never masks PAD and CLS


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  x = x - x.max()
  return x - np.log(np.exp(x).sum())


def _draw_negatives(sim_i2t, sim_t2i, image_id, num_draws: int, seed: int = 0):
  keys = jax.random.split(jax.random.key(seed), num_draws)
  draw = jax.jit(jax.vmap(lambda k: matching.sample_hard_negatives(sim_i2t, sim_t2i, image_id, k)))
  neg_text, neg_image = draw(keys)
  return np.asarray(neg_text), np.asarray(neg_image)  # [num_draws, B] each


def test_hard_negatives_never_pick_positive_or_same_image():
  rng = np.random.default_rng(0)
  image_id = np.array([0, 1, 1, 2, 3, 3, 3, 4], np.int32)
  # Make the forbidden pairs the most similar ones: a wrong sampler would pick them often.
  same = image_id[:, None] == image_id[None, :]
  sim_i2t = (rng.normal(size=(8, 8)) + 10.0 * same).astype(np.float32)
  sim_t2i = (rng.normal(size=(8, 8)) + 10.0 * same).astype(np.float32)
  neg_text, neg_image = _draw_negatives(sim_i2t, sim_t2i, image_id, 2000)
  rows = np.arange(8)[None, :]
  for neg in (neg_text, neg_image):
    assert np.all(neg != rows)
    assert np.all(image_id[neg] != image_id[rows])
    assert np.all((neg >= 0) & (neg < 8))


def test_hard_negatives_follow_softmax_weights():
  sim_i2t = np.array(
    [[5.0, 1.0, 0.0, -1.0], [0.5, 3.0, 0.5, 2.0], [2.0, 2.0, 9.0, 1.0], [0.0, 0.0, 0.0, 0.0]],
    np.float32,
  )
  sim_t2i = sim_i2t.T.copy()
  image_id = np.arange(4, dtype=np.int32)
  num_draws = 6000
  neg_text, neg_image = _draw_negatives(sim_i2t, sim_t2i, image_id, num_draws, seed=1)
  for sim, draws in [(sim_i2t, neg_text), (sim_t2i, neg_image)]:
    for i in range(4):
      # Reference weights: softmax of the row, diagonal zeroed, renormalised (torch.multinomial).
      weights = np.exp(_log_softmax(sim[i]))
      weights[i] = 0.0
      expected = weights / weights.sum()
      observed = np.bincount(draws[:, i], minlength=4) / num_draws
      tolerance = 4.0 * np.sqrt(expected * (1 - expected) / num_draws) + 1e-9
      assert np.all(np.abs(observed - expected) <= tolerance), (i, observed, expected)


def test_hard_negatives_fall_back_to_uniform_non_self_when_all_share_an_image():
  image_id = np.zeros(4, np.int32)
  sim = np.random.default_rng(2).normal(size=(4, 4)).astype(np.float32)
  neg_text, neg_image = _draw_negatives(sim, sim, image_id, 3000, seed=2)
  for draws in (neg_text, neg_image):
    assert np.all(draws != np.arange(4)[None, :])
    for i in range(4):
      observed = np.bincount(draws[:, i], minlength=4) / 3000
      others = [j for j in range(4) if j != i]
      np.testing.assert_allclose(observed[others], 1 / 3, atol=0.04)


def test_itm_loss_matches_numpy_cross_entropy():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(12, 2)).astype(np.float32) * 2
  labels = np.asarray(matching.itm_labels(4))
  np.testing.assert_array_equal(labels, [1] * 4 + [0] * 8)
  expected = np.mean([-_log_softmax(logits[i])[labels[i]] for i in range(12)])
  np.testing.assert_allclose(matching.itm_loss(logits, labels), expected, rtol=1e-6)


def _text_batch(batch: int, length: int, vocab: int, seed: int):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, length + 1, size=batch)
  mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
  ids = rng.integers(4, vocab, size=(batch, length)).astype(np.int32)
  ids[:, 0] = CLS
  ids[np.arange(batch), lengths - 1] = SEP
  ids = np.where(mask == 1, ids, PAD).astype(np.int32)
  return ids, mask


def test_mask_tokens_proportions_and_specials_never_masked():
  vocab = 1000
  ids, mask = _text_batch(128, 64, vocab, seed=4)
  fn = jax.jit(
    lambda i, m, k: matching.mask_tokens(
      i, m, k, vocab_size=vocab, mask_id=MASK, special_ids=SPECIALS, prob=0.15
    )
  )
  input_ids, labels = (np.asarray(a) for a in fn(ids, mask, jax.random.key(5)))
  chosen = labels != -100
  maskable = (mask == 1) & (ids != PAD) & (ids != CLS)
  # Specials and padding are never chosen, and nothing outside the chosen set changes.
  assert not np.any(chosen & ~maskable)
  np.testing.assert_array_equal(input_ids[~chosen], ids[~chosen])
  np.testing.assert_array_equal(labels[chosen], ids[chosen])
  # Chosen fraction ~ 0.15 of the maskable tokens; then 80% [MASK], 10% random, 10% unchanged.
  n_maskable, n_chosen = maskable.sum(), chosen.sum()
  assert abs(n_chosen / n_maskable - 0.15) < 4 * np.sqrt(0.15 * 0.85 / n_maskable)
  to_mask = np.mean(input_ids[chosen] == MASK)
  unchanged = np.mean(input_ids[chosen] == ids[chosen])
  randomised = 1.0 - to_mask - unchanged
  sigma = np.sqrt(0.25 / n_chosen)
  assert abs(to_mask - 0.8) < 4 * sigma
  assert abs(unchanged - 0.1) < 4 * sigma
  assert abs(randomised - 0.1) < 4 * sigma
  assert np.all((input_ids >= 0) & (input_ids < vocab))


def test_mask_tokens_with_sep_special_never_masks_sep():
  ids, mask = _text_batch(32, 16, 50, seed=6)
  input_ids, labels = matching.mask_tokens(
    ids, mask, jax.random.key(7), vocab_size=50, mask_id=MASK, special_ids=(PAD, CLS, SEP), prob=0.9
  )
  specials = np.isin(ids, [PAD, CLS, SEP]) | (mask == 0)
  assert np.all(np.asarray(labels)[specials] == -100)
  np.testing.assert_array_equal(np.asarray(input_ids)[specials], ids[specials])
  assert np.mean(np.asarray(labels)[~specials] != -100) > 0.8


def _ref_mlm(logits, labels, teacher_logits, alpha):
  hard, soft = [], []
  for b in range(labels.shape[0]):
    for t in range(labels.shape[1]):
      if labels[b, t] == -100:
        continue
      log_p = _log_softmax(logits[b, t])
      hard.append(-log_p[labels[b, t]])
      if teacher_logits is not None:
        q = np.exp(_log_softmax(teacher_logits[b, t]))
        soft.append(-np.sum(q * log_p))
  if teacher_logits is None:
    return np.mean(hard)
  return (1 - alpha) * np.mean(hard) + alpha * np.mean(soft)


def test_mlm_loss_matches_loop_reference():
  rng = np.random.default_rng(8)
  logits = rng.normal(size=(8, 6, 11)).astype(np.float32) * 2
  teacher_logits = rng.normal(size=(8, 6, 11)).astype(np.float32) * 2
  labels = np.where(rng.random((8, 6)) < 0.3, rng.integers(0, 11, (8, 6)), -100).astype(np.int32)
  labels[0, 0] = 4  # at least one masked token
  for teacher, alpha in [(teacher_logits, 0.4), (None, 0.4), (teacher_logits, 0.0)]:
    got = matching.mlm_loss(logits, labels, teacher, alpha)
    np.testing.assert_allclose(got, _ref_mlm(logits, labels, teacher, alpha), rtol=1e-5)
  no_masked = np.full((8, 6), -100, np.int32)
  assert float(matching.mlm_loss(logits, no_masked, teacher_logits, 0.4)) == 0.0


def _ref_mlm_published(logits, labels, teacher_logits, text_mask, alpha):
  """The pre-fix reference, `log_softmax(prediction_scores, dim=1)` on the batch padded to its
  longest text (`padding='longest'`), written as loops over b, t (= l), v in float64."""
  batch, length, vocab = logits.shape
  longest = max(t + 1 for b in range(batch) for t in range(length) if text_mask[b, t])
  hard, soft = [], []
  for b in range(batch):
    for t in range(length):
      if labels[b, t] == -100:
        continue
      hard.append(-_log_softmax(logits[b, t])[labels[b, t]])
      q = np.exp(_log_softmax(teacher_logits[b, t]))  # soft_labels = softmax(logits_m, dim=-1)
      term = 0.0
      for v in range(vocab):
        column = np.array([logits[b, k, v] for k in range(longest)], np.float64)
        log_p = float(logits[b, t, v]) - np.log(np.sum(np.exp(column)))
        term -= q[v] * log_p
      soft.append(term)
  return (1 - alpha) * np.mean(hard) + alpha * np.mean(soft)


def _published_case(seed: int, max_len: int, batch: int = 6, length: int = 9, vocab: int = 7):
  """Logits, labels on real non-CLS tokens, and masks whose longest text is `max_len` <= L."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, max_len + 1, size=batch)
  lengths[1] = max_len
  mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
  logits = rng.normal(size=(batch, length, vocab)).astype(np.float32) * 2
  teacher_logits = rng.normal(size=(batch, length, vocab)).astype(np.float32) * 2
  chosen = (rng.random((batch, length)) < 0.4) & (mask == 1)
  chosen[:, 0] = False  # CLS
  chosen[1, max_len - 1] = True  # a masked token at the longest text's last position
  labels = np.where(chosen, rng.integers(0, vocab, (batch, length)), -100).astype(np.int32)
  return logits, labels, teacher_logits, mask


@pytest.mark.parametrize("max_len", [5, 9])  # longest text shorter than L, and exactly L
def test_mlm_loss_published_form_matches_loop_reference(max_len):
  logits, labels, teacher_logits, mask = _published_case(10 + max_len, max_len)
  for alpha in (0.4, 1.0, 0.0):
    got = matching.mlm_loss(
      logits, labels, teacher_logits, alpha, distill_form="published", text_mask=mask
    )
    want = _ref_mlm_published(logits, labels, teacher_logits, mask, alpha)
    np.testing.assert_allclose(got, want, rtol=1e-5)
  # Not the fixed form: the log-softmax runs over positions, not ids.
  fixed = matching.mlm_loss(logits, labels, teacher_logits, 1.0)
  published = matching.mlm_loss(
    logits, labels, teacher_logits, 1.0, distill_form="published", text_mask=mask
  )
  assert abs(float(fixed) - float(published)) > 1e-2
  # Without a teacher there is no distillation term: both forms are the hard CE.
  no_teacher = matching.mlm_loss(
    logits, labels, None, 0.4, distill_form="published", text_mask=mask
  )
  assert float(no_teacher) == float(matching.mlm_loss(logits, labels, None, 0.4))


def test_mlm_loss_published_form_ignores_columns_past_the_longest_text():
  """As with `padding='longest'`: the batch padded to L gives the value and gradients of the same
  batch cut at its longest text, whatever the logits past it, and no gradient reaches them."""
  logits, labels, teacher_logits, mask = _published_case(20, max_len=5)
  junk = logits.copy()
  junk[:, 5:] = 50.0 + 10.0 * np.random.default_rng(21).normal(size=junk[:, 5:].shape)

  def loss(lg, lb, tl, m):
    return matching.mlm_loss(lg, lb, tl, 0.4, distill_form="published", text_mask=m)

  grad_fn = jax.jit(jax.value_and_grad(loss))
  value, grad = grad_fn(junk, labels, teacher_logits, mask)
  cut_value, cut_grad = grad_fn(logits[:, :5], labels[:, :5], teacher_logits[:, :5], mask[:, :5])
  np.testing.assert_allclose(value, cut_value, rtol=1e-6)
  np.testing.assert_allclose(grad[:, :5], cut_grad, rtol=1e-5, atol=1e-8)
  assert np.all(np.asarray(grad[:, 5:]) == 0.0)
  assert np.all(np.isfinite(np.asarray(grad)))


def test_mlm_loss_fixed_form_is_the_default():
  logits, labels, teacher_logits, mask = _published_case(30, max_len=5)
  default = np.asarray(matching.mlm_loss(logits, labels, teacher_logits, 0.4))
  fixed = matching.mlm_loss(
    logits, labels, teacher_logits, 0.4, distill_form="fixed", text_mask=mask
  )
  np.testing.assert_array_equal(default, np.asarray(fixed))
  np.testing.assert_allclose(default, _ref_mlm(logits, labels, teacher_logits, 0.4), rtol=1e-5)
  with pytest.raises(ValueError, match="distill_form='vocab'"):
    matching.mlm_loss(logits, labels, teacher_logits, 0.4, distill_form="vocab")
  with pytest.raises(ValueError, match="needs text_mask"):
    matching.mlm_loss(logits, labels, teacher_logits, 0.4, distill_form="published")


def test_registered_mlm_takes_distill_form_from_a_config_entry():
  logits, labels, teacher_logits, mask = _published_case(40, max_len=6)
  outputs = {"mlm/logits": logits}
  ctx = loss_context(
    {"mlm/logits": teacher_logits, "alpha": jnp.float32(0.4), "mlm_labels": labels},
    batch={"text_mask": mask},
  )
  want = {
    "fixed": _ref_mlm(logits, labels, teacher_logits, 0.4),
    "published": _ref_mlm_published(logits, labels, teacher_logits, mask, 0.4),
  }
  for form, expected in want.items():
    entries = losses.parse_entries({"mlm": {"weight": 1.0, "distill_form": form}})
    assert entries[0].kwargs == {"distill_form": form}
    total, metrics = losses.sum_losses(entries, outputs, ctx)
    np.testing.assert_allclose(metrics["mlm"], expected, rtol=1e-5)
    np.testing.assert_allclose(total, expected, rtol=1e-5)
  default = losses.sum_losses(losses.parse_entries({"mlm": {"weight": 1.0}}), outputs, ctx)[0]
  np.testing.assert_allclose(default, want["fixed"], rtol=1e-5)
  with pytest.raises(ValueError, match="config.losses.mlm"):
    losses.parse_entries({"mlm": {"weight": 1.0, "distil_form": "published"}})
  bad = losses.parse_entries({"mlm": {"weight": 1.0, "distill_form": "dim1"}})
  with pytest.raises(ValueError, match="expected one of"):
    losses.sum_losses(bad, outputs, ctx)
  with pytest.raises(ValueError, match="needs distill"):
    matching.mlm(outputs, ctx, distill=False, distill_form="published")
  with pytest.raises(ValueError, match=r"ctx.batch\['text_mask'\]"):
    matching.mlm(
      outputs,
      loss_context({"mlm/logits": teacher_logits, "alpha": 0.4, "mlm_labels": labels}),
      distill_form="published",
    )


def test_mlm_and_itm_losses_same_on_8_devices():
  rng = np.random.default_rng(9)
  logits = rng.normal(size=(8, 6, 11)).astype(np.float32)
  teacher_logits = rng.normal(size=(8, 6, 11)).astype(np.float32)
  labels = np.where(rng.random((8, 6)) < 0.4, rng.integers(0, 11, (8, 6)), -100).astype(np.int32)
  text_mask = (np.arange(6)[None, :] < rng.integers(2, 5, size=(8, 1))).astype(np.int32)
  published_labels = np.where(text_mask == 1, labels, -100).astype(np.int32)
  itm_logits = rng.normal(size=(24, 2)).astype(np.float32)

  def value_and_grads(lg, tl, lb, plb, tm, il):
    mlm = jax.value_and_grad(lambda x: matching.mlm_loss(x, lb, tl, jnp.float32(0.4)))(lg)
    published = jax.value_and_grad(
      lambda x: matching.mlm_loss(
        x, plb, tl, jnp.float32(0.4), distill_form="published", text_mask=tm
      )
    )(lg)
    itm = jax.value_and_grad(lambda x: matching.itm_loss(x, matching.itm_labels(8)))(il)
    return mlm, published, itm

  sharded, single = run_sharded_and_single(
    value_and_grads, logits, teacher_logits, labels, published_labels, text_mask, itm_logits
  )
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
