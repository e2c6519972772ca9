"""Tests for vlalign.losses.momentum: EMA, alpha ramp, queues, soft targets and the `cma` loss."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlalign import losses
from vlalign.losses import momentum
from vlalign.methods import momentum as momentum_method
from vlalign.testing import loss_context, run_sharded_and_single

B, E, K = 8, 16, 16


def _unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
  x = rng.normal(size=shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _inputs(seed: int = 0, alpha: float = 0.3, tau: float = 0.07):
  rng = np.random.default_rng(seed)
  outputs = {
    "img/emb": _unit(rng, B, E),
    "txt/emb": _unit(rng, B, E),
    "logit_scale": np.float32(math.log(1.0 / tau)),
  }
  teacher = {
    "img/emb": _unit(rng, B, E),
    "txt/emb": _unit(rng, B, E),
    "queue/img": _unit(rng, K, E),
    "queue/txt": _unit(rng, K, E),
    "queue/image_id": rng.integers(0, 6, size=K).astype(np.int32),
    "alpha": np.float32(alpha),
  }
  batch = {"image_id": rng.integers(0, 6, size=B).astype(np.int32)}
  return outputs, teacher, batch


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = x - x.max()
  return x - np.log(np.exp(x).sum())


def _softmax(x: np.ndarray) -> np.ndarray:
  return np.exp(_log_softmax(x))


def _ref_direction(query, teacher_query, keys, positives, tau, alpha):
  """Loop reference of one ALBEF direction (e.g. i2t): mean_i soft CE, float64."""
  query, teacher_query, keys = (np.asarray(a, np.float64) for a in (query, teacher_query, keys))
  losses_ = []
  for i in range(query.shape[0]):
    logits = np.array([query[i] @ keys[j] / tau for j in range(keys.shape[0])])
    teacher_logits = np.array([teacher_query[i] @ keys[j] / tau for j in range(keys.shape[0])])
    target = alpha * _softmax(teacher_logits) + (1 - alpha) * positives[i]
    losses_.append(-np.sum(target * _log_softmax(logits)))
  return float(np.mean(losses_))


def _ref_cma(outputs, teacher, batch, match_image_id=False):
  tau = min(max(math.exp(-float(outputs["logit_scale"])), 0.001), 0.5)
  alpha = float(teacher["alpha"])
  txt_all = np.concatenate([teacher["txt/emb"], teacher["queue/txt"]])
  img_all = np.concatenate([teacher["img/emb"], teacher["queue/img"]])
  positives = np.zeros((B, B + K))
  for i in range(B):
    if match_image_id:
      ids = np.concatenate([batch["image_id"], teacher["queue/image_id"]])
      positives[i] = (ids == batch["image_id"][i]) / np.sum(ids == batch["image_id"][i])
    else:
      positives[i, i] = 1.0
  i2t = _ref_direction(outputs["img/emb"], teacher["img/emb"], txt_all, positives, tau, alpha)
  t2i = _ref_direction(outputs["txt/emb"], teacher["txt/emb"], img_all, positives, tau, alpha)
  return i2t, t2i, tau


def test_ema_update_matches_rule_and_keeps_dtype():
  rng = np.random.default_rng(0)
  teacher = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": np.zeros(4, jnp.bfloat16)}
  student = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": np.ones(4, np.float32)}
  new = jax.jit(momentum_method.ema_update)(teacher, student, 0.995)
  np.testing.assert_allclose(new["w"], 0.995 * teacher["w"] + 0.005 * student["w"], rtol=1e-6)
  assert new["b"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(new["b"], np.float32), 0.005, rtol=1e-2)
  same = momentum_method.ema_update(student, student, 0.9)  # teacher == student is a fixed point
  np.testing.assert_allclose(same["w"], student["w"], rtol=1e-6)


def test_alpha_ramps_linearly_over_first_epoch_then_stays():
  steps_per_epoch = 100
  for step in [0, 1, 37, 99, 100, 101, 5000]:
    # The reference: alpha * min(1, i / len(loader)) in epoch 0, alpha afterwards.
    epoch, i = divmod(step, steps_per_epoch)
    expected = 0.4 if epoch > 0 else 0.4 * min(1.0, i / steps_per_epoch)
    got = momentum_method.alpha_at(step, steps_per_epoch)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
  traced = jax.jit(lambda s: momentum_method.alpha_at(s, 10, 0.2))(jnp.int32(5))
  np.testing.assert_allclose(traced, 0.1, rtol=1e-6)
  with pytest.raises(ValueError):
    momentum_method.alpha_at(0, 0)


def test_enqueue_ring_buffer_wraps_after_three_batches():
  queue = np.zeros((2 * 4, 3), np.float32)  # K = 2B with B = 4
  batches = [np.full((4, 3), v, np.float32) for v in (1.0, 2.0, 3.0)]
  step = jax.jit(momentum_method.enqueue)
  q, ptr = jnp.asarray(queue), jnp.int32(0)
  expected_ptrs = [4, 0, 4]
  for feats, expected_ptr in zip(batches, expected_ptrs):
    q, ptr = step(q, ptr, feats)
    assert int(ptr) == expected_ptr
  # The third batch overwrote the first slot; the second batch is still in the second slot.
  np.testing.assert_array_equal(q[:4], 3.0)
  np.testing.assert_array_equal(q[4:], 2.0)


def test_enqueue_pointer_past_end_wraps_and_matches_reference():
  rng = np.random.default_rng(1)
  queue = rng.normal(size=(12, 2)).astype(np.float32)
  feats = rng.normal(size=(4, 2)).astype(np.float32)
  for ptr in [0, 4, 8, 12, 20]:
    expected = queue.copy()
    start = ptr % 12
    expected[start : start + 4] = feats
    q, new_ptr = momentum_method.enqueue(queue, jnp.int32(ptr), feats)
    np.testing.assert_array_equal(q, expected)
    assert int(new_ptr) == (start + 4) % 12


def test_enqueue_rejects_queue_not_multiple_of_batch():
  with pytest.raises(ValueError, match="multiple"):
    momentum_method.enqueue(jnp.zeros((10, 3)), jnp.int32(0), jnp.zeros((4, 3)))
  with pytest.raises(ValueError, match="multiple"):
    jax.jit(momentum_method.enqueue)(jnp.zeros((10, 3)), jnp.int32(0), jnp.zeros((4, 3)))


def test_soft_targets_and_soft_cross_entropy_match_numpy():
  rng = np.random.default_rng(2)
  sim = rng.normal(size=(5, 7)).astype(np.float32) * 3
  logits = rng.normal(size=(5, 7)).astype(np.float32) * 3
  positives = np.eye(5, 7, dtype=np.float32)
  positives[0] = [0.5, 0, 0, 0.5, 0, 0, 0]  # multi-hot, normalised
  targets = momentum.soft_targets(sim, positives, 0.25)
  ce = momentum.soft_cross_entropy(logits, targets)
  for i in range(5):
    expected_t = 0.25 * _softmax(sim[i].astype(np.float64)) + 0.75 * positives[i]
    np.testing.assert_allclose(targets[i], expected_t, rtol=1e-5, atol=1e-7)
    expected_ce = -np.sum(expected_t * _log_softmax(logits[i].astype(np.float64)))
    np.testing.assert_allclose(ce[i], expected_ce, rtol=1e-5)
  np.testing.assert_allclose(np.sum(targets, axis=1), 1.0, rtol=1e-6)


def test_temperature_is_clamped_like_tcl():
  for tau, expected in [(0.07, 0.07), (2.0, 0.5), (1e-5, 0.001), (0.5, 0.5)]:
    got = momentum.clamped_temperature(jnp.float32(math.log(1.0 / tau)))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("tau", [0.07, 2.0])
def test_cma_matches_loop_reference(tau):
  outputs, teacher, batch = _inputs(seed=3, alpha=0.3, tau=tau)
  loss, metrics = jax.jit(losses.get("cma"))(outputs, loss_context(teacher, batch))
  i2t, t2i, ref_tau = _ref_cma(outputs, teacher, batch)
  np.testing.assert_allclose(metrics["i2t"], i2t, rtol=1e-5)
  np.testing.assert_allclose(metrics["t2i"], t2i, rtol=1e-5)
  np.testing.assert_allclose(metrics["temperature"], ref_tau, rtol=1e-6)
  np.testing.assert_allclose(loss, 0.5 * (i2t + t2i), rtol=1e-5)


def test_cma_with_image_id_positives_matches_reference():
  outputs, teacher, batch = _inputs(seed=4, alpha=0.6)
  loss, metrics = momentum.cma(outputs, loss_context(teacher, batch), match_image_id=True)
  i2t, t2i, _ = _ref_cma(outputs, teacher, batch, match_image_id=True)
  np.testing.assert_allclose(metrics["i2t"], i2t, rtol=1e-5)
  np.testing.assert_allclose(metrics["t2i"], t2i, rtol=1e-5)


def test_cma_gets_no_gradient_through_teacher_and_alpha_zero_is_infonce():
  outputs, teacher, batch = _inputs(seed=5, alpha=0.0)
  grads = jax.grad(lambda t: momentum.cma(outputs, loss_context(t, batch))[0])(
    {k: jnp.asarray(v, jnp.float32) for k, v in teacher.items() if k != "queue/image_id"}
  )
  for value in jax.tree.leaves(grads):
    np.testing.assert_array_equal(value, 0.0)
  # alpha = 0: plain InfoNCE of the student against [teacher | queue] with one-hot targets.
  tau = 0.07
  logits = outputs["img/emb"] @ np.concatenate([teacher["txt/emb"], teacher["queue/txt"]]).T / tau
  expected = np.mean([-_log_softmax(logits[i].astype(np.float64))[i] for i in range(B)])
  np.testing.assert_allclose(
    momentum.cma(outputs, loss_context(teacher, batch))[1]["i2t"], expected, rtol=1e-5
  )


def test_cma_requires_teacher():
  outputs, _, batch = _inputs()
  with pytest.raises(ValueError, match="teacher"):
    momentum.cma(outputs, loss_context(None, batch))


def test_cma_value_and_grad_same_on_8_devices():
  outputs, teacher, batch = _inputs(seed=6, alpha=0.4)

  def value_and_grad(o, t, b):
    return jax.value_and_grad(lambda o_: momentum.cma(o_, loss_context(t, b))[0])(o)

  (sharded_value, sharded_grad), (value, grad) = run_sharded_and_single(
    value_and_grad, outputs, teacher, batch
  )
  np.testing.assert_allclose(sharded_value, value, rtol=1e-5)
  for key in grad:
    np.testing.assert_allclose(sharded_grad[key], grad[key], rtol=1e-4, atol=1e-6)
  assert np.abs(grad["img/emb"]).sum() > 0 and np.abs(grad["logit_scale"]) > 0
