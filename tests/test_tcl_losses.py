"""Tests for the TCL losses: `imc` and `tcl_ita` (vlalign.losses.intra), `lmi` (local_mi)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlalign import losses
from vlalign.losses import intra, local_mi
from vlalign.testing import loss_context, run_sharded_and_single

B, E, K, L = 8, 16, 16, 8
TEXT_LENGTHS = [8, 4, 3, 8, 2, 5, 7, 3]  # real tokens incl. CLS; the rest is padding


def _unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
  x = rng.normal(size=shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _inputs(seed: int = 0, side: int = 8, alpha: float = 0.3, tau: float = 0.07):
  rng = np.random.default_rng(seed)
  outputs = {
    "img/emb": _unit(rng, B, E),
    "txt/emb": _unit(rng, B, E),
    "img/tokens_emb": _unit(rng, B, side * side, E),
    "txt/tokens_emb": _unit(rng, B, L, E),
    "logit_scale": np.float32(math.log(1.0 / tau)),
  }
  teacher = {
    "img/emb": _unit(rng, B, E),
    "txt/emb": _unit(rng, B, E),
    "img/tokens_emb": _unit(rng, B, side * side, E),
    "txt/tokens_emb": _unit(rng, B, L, E),
    "queue/img": _unit(rng, K, E),
    "queue/txt": _unit(rng, K, E),
    "alpha": np.float32(alpha),
  }
  text_mask = (np.arange(L)[None, :] < np.array(TEXT_LENGTHS)[:, None]).astype(np.int32)
  batch = {
    "text_mask": text_mask,
    "text_ids": (rng.integers(5, 50, size=(B, L)) * text_mask).astype(np.int32),
    "image_id": np.arange(B, dtype=np.int32),
  }
  return outputs, teacher, batch


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  x = x - x.max()
  return x - np.log(np.exp(x).sum())


def _tau(outputs) -> float:
  return min(max(math.exp(-float(outputs["logit_scale"])), 0.001), 0.5)


def _ref_pool(tokens: np.ndarray, grid: int = 4) -> np.ndarray:
  """Loops over the grid cells of a row-major h x h patch layout."""
  batch, num, dim = tokens.shape
  side = int(round(math.sqrt(num)))
  kernel = side // grid
  grid_tokens = tokens.reshape(batch, side, side, dim)
  out = np.zeros((batch, grid * grid, dim))
  for r in range(grid):
    for c in range(grid):
      cell = grid_tokens[:, r * kernel : (r + 1) * kernel, c * kernel : (c + 1) * kernel]
      out[:, r * grid + c] = cell.reshape(batch, -1, dim).mean(axis=1)
  return out


def _ref_g2l_loops(locals_, globals_, tau, valid=None):
  """The equation, with explicit loops over anchors, locals and negatives."""
  locals_, globals_ = np.asarray(locals_, np.float64), np.asarray(globals_, np.float64)
  n_batch, n_locals, _ = locals_.shape
  valid = np.ones((n_batch, n_locals)) if valid is None else np.asarray(valid)
  per_sample = []
  for i in range(n_batch):
    negatives = [
      globals_[i] @ locals_[j, k] / tau
      for j in range(n_batch)
      for k in range(n_locals)
      if j != i and valid[j, k]
    ]
    terms = []
    for k in range(n_locals):
      if not valid[i, k]:
        continue
      positive = globals_[i] @ locals_[i, k] / tau
      terms.append(-_log_softmax(np.array([positive, *negatives]))[0])
    per_sample.append(np.sum(terms) / max(valid[i].sum(), 1))
  return float(np.mean(per_sample))


def _ref_g2l_tcl_port(loc, m, temp, attention_mask=None):
  """Array-level numpy port of TCL `in_batch_g2l_loss` (+-10000 masking constants)."""
  loc, m = np.asarray(loc, np.float64), np.asarray(m, np.float64)
  n, n_locals, _ = loc.shape
  u_p = np.einsum("ikd,id->ik", loc, m)[:, :, None] / temp
  if attention_mask is not None:
    mask = attention_mask[:, :, None].astype(np.float64)
    u_p = mask * u_p + 10000.0 * (1 - mask)
  u_n = np.einsum("id,jkd->ijk", m, loc) / temp
  eye = np.eye(n)[:, :, None]
  u_n = (1 - eye) * u_n - 10000.0 * eye
  if attention_mask is not None:
    mask = attention_mask[None, :, :].astype(np.float64)
    u_n = mask * u_n - 10000.0 * (1 - mask)
  u_n = np.broadcast_to(u_n.reshape(n, 1, n * n_locals), (n, n_locals, n * n_locals))
  logits = np.concatenate([u_p, u_n], axis=2)
  shifted = logits - logits.max(axis=2, keepdims=True)
  log_p = shifted - np.log(np.exp(shifted).sum(axis=2, keepdims=True))
  if attention_mask is not None:
    return float(np.mean(np.sum(-log_p[:, :, 0], axis=1) / attention_mask.sum(axis=1)))
  return float(-log_p[:, :, 0].mean())


def _ref_hard_ce(query, keys, tau):
  logits = np.asarray(query, np.float64) @ np.asarray(keys, np.float64).T / tau
  return float(np.mean([-_log_softmax(logits[i])[i] for i in range(query.shape[0])]))


def _ref_imc(outputs, teacher):
  tau = _tau(outputs)
  img_all = np.concatenate([teacher["img/emb"], teacher["queue/img"]])
  txt_all = np.concatenate([teacher["txt/emb"], teacher["queue/txt"]])
  return _ref_hard_ce(outputs["img/emb"], img_all, tau), _ref_hard_ce(
    outputs["txt/emb"], txt_all, tau
  )


def _ref_lmi(outputs, teacher, batch):
  tau = _tau(outputs)
  img = _ref_g2l_loops(_ref_pool(teacher["img/tokens_emb"]), outputs["img/emb"], tau)
  txt = _ref_g2l_loops(
    teacher["txt/tokens_emb"][:, 1:], outputs["txt/emb"], tau, batch["text_mask"][:, 1:]
  )
  return img, txt


def _ref_cma(outputs, teacher):
  tau, alpha = _tau(outputs), float(teacher["alpha"])
  result = []
  for q, tq, keys in [
    ("img/emb", "img/emb", np.concatenate([teacher["txt/emb"], teacher["queue/txt"]])),
    ("txt/emb", "txt/emb", np.concatenate([teacher["img/emb"], teacher["queue/img"]])),
  ]:
    per_row = []
    for i in range(B):
      logits = outputs[q][i].astype(np.float64) @ keys.T / tau
      target = alpha * np.exp(_log_softmax(teacher[tq][i].astype(np.float64) @ keys.T / tau))
      target[i] += 1 - alpha
      per_row.append(-np.sum(target * _log_softmax(logits)))
    result.append(np.mean(per_row))
  return result


@pytest.mark.parametrize("side", [8, 12, 16])
def test_pool_patches_matches_loop_reference(side):
  tokens = np.random.default_rng(side).normal(size=(2, side * side, 3)).astype(np.float32)
  pooled = local_mi.pool_patches(tokens)
  assert pooled.shape == (2, 16, 3)
  np.testing.assert_allclose(pooled, _ref_pool(tokens), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num", [60, 36])
def test_pool_patches_rejects_bad_grids(num):
  with pytest.raises(ValueError, match="grid"):
    local_mi.pool_patches(jnp.zeros((1, num, 2)))


def test_g2l_loss_matches_tcl_port_and_loop_reference():
  rng = np.random.default_rng(1)
  locals_, globals_ = _unit(rng, 6, 5, 4), _unit(rng, 6, 4)
  valid = (rng.random((6, 5)) < 0.6).astype(np.int32)
  valid[:, 0] = 1
  for v in [None, valid]:
    got = local_mi.in_batch_g2l_loss(locals_, globals_, 0.1, v)
    np.testing.assert_allclose(got, _ref_g2l_tcl_port(locals_, globals_, 0.1, v), rtol=1e-5)
    np.testing.assert_allclose(got, _ref_g2l_loops(locals_, globals_, 0.1, v), rtol=1e-5)


@pytest.mark.parametrize("side", [8, 12])
def test_lmi_matches_reference_at_two_resolutions(side):
  outputs, teacher, batch = _inputs(seed=side, side=side)
  loss, metrics = jax.jit(losses.get("lmi"))(outputs, loss_context(teacher, batch))
  img, txt = _ref_lmi(outputs, teacher, batch)
  np.testing.assert_allclose(metrics["img"], img, rtol=1e-5)
  np.testing.assert_allclose(metrics["txt"], txt, rtol=1e-5)
  np.testing.assert_allclose(loss, 0.5 * (img + txt), rtol=1e-5)


def test_lmi_padding_and_cls_features_change_nothing():
  outputs, teacher, batch = _inputs(seed=2)
  padded = batch["text_mask"] == 0
  changed = dict(teacher)
  tokens = teacher["txt/tokens_emb"].copy()
  # Padded tokens set to the student's own global feature (a huge positive if it were counted) and
  # the CLS token replaced: LMI uses neither.
  tokens[padded] = np.broadcast_to(outputs["txt/emb"][:, None], tokens.shape)[padded]
  tokens[:, 0] = _unit(np.random.default_rng(9), B, E)
  changed["txt/tokens_emb"] = tokens

  def txt_term_and_grad(o, t):
    return jax.value_and_grad(lambda o_: local_mi.lmi(o_, loss_context(t, batch))[1]["txt"])(o)

  (value, grad), (value_changed, grad_changed) = (
    txt_term_and_grad(outputs, teacher),
    txt_term_and_grad(outputs, changed),
  )
  np.testing.assert_allclose(value_changed, value, rtol=1e-6)
  np.testing.assert_allclose(grad_changed["txt/emb"], grad["txt/emb"], rtol=1e-5, atol=1e-7)


def test_lmi_padded_positives_excluded_and_per_text_normalised():
  outputs, teacher, batch = _inputs(seed=3)
  tau = _tau(outputs)
  got = local_mi.lmi(outputs, loss_context(teacher, batch))[1]["txt"]
  # Counting padded positions as positives (and negatives) would change the value.
  all_valid = _ref_g2l_loops(teacher["txt/tokens_emb"][:, 1:], outputs["txt/emb"], tau)
  assert abs(float(got) - all_valid) > 1e-3
  # Each text contributes the mean over its own real tokens after CLS, not over L - 1.
  expected = _ref_g2l_loops(
    teacher["txt/tokens_emb"][:, 1:], outputs["txt/emb"], tau, batch["text_mask"][:, 1:]
  )
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_imc_matches_reference_with_hard_targets():
  outputs, teacher, batch = _inputs(seed=4, alpha=0.9)
  loss, metrics = jax.jit(losses.get("imc"))(outputs, loss_context(teacher, batch))
  i2i, t2t = _ref_imc(outputs, teacher)
  np.testing.assert_allclose(metrics["i2i"], i2i, rtol=1e-5)
  np.testing.assert_allclose(metrics["t2t"], t2t, rtol=1e-5)
  np.testing.assert_allclose(loss, 0.5 * (i2i + t2t), rtol=1e-5)
  # alpha does not enter the intra-modal terms (the reference uses the hard sim_targets there).
  teacher_other_alpha = dict(teacher, alpha=np.float32(0.1))
  np.testing.assert_allclose(
    intra.imc(outputs, loss_context(teacher_other_alpha, batch))[0], loss, rtol=1e-6
  )


@pytest.mark.parametrize("tau", [0.07, 0.0001])
def test_tcl_ita_is_mean_of_six_reference_terms(tau):
  outputs, teacher, batch = _inputs(seed=5, alpha=0.35, tau=tau)
  loss, metrics = jax.jit(losses.get("tcl_ita"))(outputs, loss_context(teacher, batch))
  i2t, t2i = _ref_cma(outputs, teacher)
  i2i, t2t = _ref_imc(outputs, teacher)
  lmi_img, lmi_txt = _ref_lmi(outputs, teacher, batch)
  expected = dict(i2t=i2t, t2i=t2i, i2i=i2i, t2t=t2t, lmi_img=lmi_img, lmi_txt=lmi_txt)
  for key, value in expected.items():
    np.testing.assert_allclose(metrics[key], value, rtol=1e-4, err_msg=key)
  np.testing.assert_allclose(loss, np.mean(list(expected.values())), rtol=1e-4)
  np.testing.assert_allclose(metrics["temperature"], _tau(outputs), rtol=1e-6)


@pytest.mark.parametrize("name", ["imc", "lmi", "tcl_ita"])
def test_value_and_grad_same_on_8_devices(name):
  outputs, teacher, batch = _inputs(seed=6, side=8, alpha=0.4)
  loss_fn = losses.get(name)

  def value_and_grad(o, t, b):
    return jax.value_and_grad(lambda o_: loss_fn(o_, loss_context(t, b))[0])(o)

  (sharded_value, sharded_grad), (value, grad) = run_sharded_and_single(
    value_and_grad, outputs, teacher, batch
  )
  np.testing.assert_allclose(sharded_value, value, rtol=1e-5)
  for key in grad:
    np.testing.assert_allclose(sharded_grad[key], grad[key], rtol=1e-4, atol=1e-6, err_msg=key)
  assert np.abs(grad["img/emb"]).sum() > 0 and np.abs(grad["txt/emb"]).sum() > 0
