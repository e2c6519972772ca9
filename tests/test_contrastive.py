"""CLIP and SigLIP losses against slow numpy references, and on 8 simulated devices."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlalign import losses, testing
from vlalign.losses import contrastive

CLIP_INIT_SCALE = math.log(1 / 0.07)
CTX = losses.context()  # in-batch losses read nothing from the context


def _outputs(batch_size=16, dim=8, seed=0, logit_scale=CLIP_INIT_SCALE, bias=None):
  rng = np.random.default_rng(seed)
  img = rng.normal(size=(batch_size, dim)).astype(np.float32)
  txt = (img + rng.normal(size=(batch_size, dim))).astype(np.float32)
  img /= np.linalg.norm(img, axis=1, keepdims=True)
  txt /= np.linalg.norm(txt, axis=1, keepdims=True)
  out = {"img/emb": img, "txt/emb": txt, "logit_scale": np.float32(logit_scale)}
  if bias is not None:
    out["logit_bias"] = np.float32(bias)
  return out


def _itc_reference(out, max_scale=contrastive.CLIP_MAX_LOGIT_SCALE):
  img, txt = out["img/emb"].astype(np.float64), out["txt/emb"].astype(np.float64)
  scale = math.exp(min(float(out["logit_scale"]), max_scale))
  n = len(img)
  total = 0.0
  for i in range(n):  # image i against every text
    row = [scale * img[i] @ txt[j] for j in range(n)]
    total += -(row[i] - math.log(sum(math.exp(v) for v in row)))
  for j in range(n):  # text j against every image
    col = [scale * img[i] @ txt[j] for i in range(n)]
    total += -(col[j] - math.log(sum(math.exp(v) for v in col)))
  return total / (2 * n)


def _siglip_reference(out):
  img, txt = out["img/emb"].astype(np.float64), out["txt/emb"].astype(np.float64)
  scale, bias = math.exp(float(out["logit_scale"])), float(out["logit_bias"])
  n = len(img)
  total = 0.0
  for i in range(n):
    for j in range(n):
      z = 1.0 if i == j else -1.0
      logit = scale * img[i] @ txt[j] + bias
      total += math.log1p(math.exp(-z * logit))
  return total / n


def test_registry_lists_both_and_rejects_unknown():
  assert {"itc", "siglip"} <= set(losses.names())
  with pytest.raises(ValueError, match="unknown loss 'nope'"):
    losses.get("nope")


@pytest.mark.parametrize("logit_scale", [CLIP_INIT_SCALE, 6.0])  # 6.0 exercises the clamp
def test_itc_matches_reference(logit_scale):
  out = _outputs(logit_scale=logit_scale)
  value, metrics = contrastive.itc(out, CTX)
  np.testing.assert_allclose(value, _itc_reference(out), rtol=1e-5)
  expected_temp = 1 / math.exp(min(logit_scale, math.log(100)))
  np.testing.assert_allclose(metrics["temperature"], expected_temp, rtol=1e-5)


def test_itc_accuracy_is_one_for_identical_embeddings():
  out = _outputs()
  out["txt/emb"] = out["img/emb"]
  _, metrics = contrastive.itc(out, CTX)
  assert metrics["acc_i2t"] == 1.0 and metrics["acc_t2i"] == 1.0


def test_siglip_matches_reference():
  out = _outputs(logit_scale=math.log(10.0), bias=-10.0)
  value, _ = contrastive.siglip(out, CTX)
  np.testing.assert_allclose(value, _siglip_reference(out), rtol=1e-5)


def test_siglip_without_bias_is_a_clear_error():
  with pytest.raises(ValueError, match="logit_bias_init"):
    contrastive.siglip(_outputs(), CTX)


@pytest.mark.parametrize("name,bias", [("itc", None), ("siglip", -10.0)])
def test_loss_and_grads_on_8_devices_equal_single_device(name, bias):
  out = _outputs(batch_size=16, bias=bias, logit_scale=math.log(10.0))
  fn = losses.get(name)

  def loss_and_grads(o):
    return jax.value_and_grad(lambda o: fn(o, CTX)[0])(o)

  (v8, g8), (v1, g1) = testing.run_sharded_and_single(loss_and_grads, out)
  np.testing.assert_allclose(v8, v1, rtol=1e-6)
  for key in g1:
    np.testing.assert_allclose(g8[key], g1[key], rtol=1e-5, atol=1e-7)
  assert np.abs(np.asarray(g1["img/emb"])).sum() > 0


def test_gradients_match_finite_differences():
  out = _outputs(batch_size=4, dim=3)
  grad = jax.grad(lambda s: contrastive.itc({**out, "logit_scale": s}, CTX)[0])
  s0, eps = jnp.float32(2.0), 1e-2
  fd = (
    contrastive.itc({**out, "logit_scale": s0 + eps}, CTX)[0]
    - contrastive.itc({**out, "logit_scale": s0 - eps}, CTX)[0]
  ) / (2 * eps)
  np.testing.assert_allclose(grad(s0), fd, rtol=1e-2)
