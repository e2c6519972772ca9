"""CLIP and SigLIP losses against slow numpy references, and on 8 simulated devices; their chunked
(ring) forms against the dense ones: values, metrics and gradients, on 8 devices and on 1."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlalign import losses, sharding, testing
from vlalign.errors import ConfigError
from vlalign.losses import chunked, contrastive

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


# --- Chunked (ring) forms -----------------------------------------------------------------------


def _value_metrics_grads(name, out, **kwargs):
  """`((loss, metrics), grads)` of loss `name` w.r.t. every output, under jit."""
  fn = losses.get(name)
  return jax.jit(jax.value_and_grad(lambda o: fn(o, CTX, **kwargs), has_aux=True))(out)


def _on_mesh(fn, out, mesh):
  """`fn(out)` with `out` split over `mesh`'s batch axes and `mesh` set (the trainer's setting)."""
  with jax.set_mesh(mesh):
    return jax.device_get(fn(testing.shard_leading(out, mesh)))


def _assert_same(chunked_result, dense_result):
  (value, metrics), grads = chunked_result
  (dense_value, dense_metrics), dense_grads = dense_result
  np.testing.assert_allclose(value, dense_value, rtol=1e-5)
  assert set(metrics) == set(dense_metrics)
  for key in dense_metrics:
    np.testing.assert_allclose(metrics[key], dense_metrics[key], rtol=1e-5, err_msg=key)
  assert set(grads) == set(dense_grads)
  for key in dense_grads:
    # Entries that cancel (softmax minus one-hot at scale 100) hold float32 digits of the largest.
    atol = 1e-6 * max(1.0, float(np.abs(dense_grads[key]).max()))
    np.testing.assert_allclose(grads[key], dense_grads[key], rtol=1e-5, atol=atol, err_msg=key)


CLIP_SCALE, CLAMPED = math.log(10.0), 6.0  # 6.0 > log(100): CLIP's clamp, no scale gradient.


@pytest.mark.parametrize(
  "name,logit_scale,bias,mesh_shape,chunk_size",
  [
    ("itc", CLIP_SCALE, None, (8, 1), 1024),  # one block per device
    ("itc", CLIP_SCALE, None, (2, 4), 3),  # both batch axes; blocks of 2 (largest divisor of 4)
    ("itc", CLAMPED, None, (4, 2), 1),
    ("siglip", CLIP_SCALE, -2.0, (8, 1), 1024),
    ("siglip", CLIP_SCALE, -2.0, (4, 2), 2),
  ],
)
def test_chunked_equals_dense_on_8_devices(name, logit_scale, bias, mesh_shape, chunk_size):
  out = _outputs(batch_size=32, dim=8, logit_scale=logit_scale, bias=bias)
  dense = _value_metrics_grads(name, out)
  mesh = sharding.make_mesh(dict(zip(("data", "fsdp"), mesh_shape, strict=True)))
  fn = lambda o: _value_metrics_grads(name, o, chunked=True, chunk_size=chunk_size)
  result = _on_mesh(fn, out, mesh)
  _assert_same(result, dense)
  grads = result[1]
  assert np.abs(grads["img/emb"]).sum() > 0 and np.abs(grads["txt/emb"]).sum() > 0
  assert (np.abs(grads["logit_scale"]) > 0) == (logit_scale < contrastive.CLIP_MAX_LOGIT_SCALE)
  if bias is not None:
    assert np.abs(grads["logit_bias"]) > 0


@pytest.mark.parametrize(
  "name,logit_scale,bias,mesh",
  [
    ("itc", CLIP_SCALE, None, None),
    ("itc", CLAMPED, None, None),
    ("siglip", CLIP_SCALE, -2.0, None),
    ("itc", CLIP_SCALE, None, 1),  # a one-device mesh: no shard_map, the same loop
  ],
)
def test_chunked_equals_dense_on_one_device(name, logit_scale, bias, mesh):
  out = _outputs(batch_size=16, dim=8, logit_scale=logit_scale, bias=bias)
  dense = _value_metrics_grads(name, out)
  fn = lambda o: _value_metrics_grads(name, o, chunked=True, chunk_size=4)  # 4 blocks of 4 texts
  if mesh is None:
    result = jax.device_get(fn(out))
  else:
    result = _on_mesh(fn, out, testing.data_mesh(mesh))
  _assert_same(result, dense)


@pytest.mark.parametrize("name,bias", [("itc", None), ("siglip", -2.0)])
def test_chunked_accuracy_breaks_ties_like_argmax(name, bias):
  out = _outputs(batch_size=32, dim=8, bias=bias)
  # Image 20's best texts are 3 and 20 (devices 0 and 5), text 17's best images 5 and 17 (devices
  # 1 and 4): argmax takes the lower index, so both pairs count as misses (ties to the higher
  # index would change both accuracies). The ring meets the higher index first.
  out["txt/emb"][[3, 20]] = out["img/emb"][20]
  out["img/emb"][[5, 17]] = out["txt/emb"][17]
  mesh = testing.data_mesh()
  fn = lambda o: _value_metrics_grads(name, o, chunked=True, chunk_size=2)
  (_, metrics), _ = _on_mesh(fn, out, mesh)
  (_, dense_metrics), _ = _value_metrics_grads(name, out)
  for key in ("acc_i2t", "acc_t2i"):
    assert metrics[key] == dense_metrics[key], key


def test_chunked_keeps_the_embedding_dtype_of_the_gradients():
  out = _outputs(batch_size=16, dim=8)
  out = {**out, "img/emb": jnp.bfloat16(out["img/emb"]), "txt/emb": jnp.bfloat16(out["txt/emb"])}
  dense = _value_metrics_grads("itc", out)
  result = _on_mesh(
    lambda o: _value_metrics_grads("itc", o, chunked=True), out, testing.data_mesh()
  )
  for key in ("img/emb", "txt/emb"):
    assert result[1][key].dtype == jnp.bfloat16
    np.testing.assert_allclose(
      np.float32(result[1][key]), np.float32(dense[1][key]), rtol=1e-2, atol=1e-3
    )


@pytest.mark.parametrize("name,bias", [("itc", None), ("siglip", -2.0)])
def test_chunked_under_loss_groups_equals_dense_groups(name, bias):
  out = _outputs(batch_size=32, dim=8, bias=bias)
  ctx = losses.context(batch={"image_id": np.arange(32, dtype=np.int32)})

  def run(o, **kwargs):
    entries = losses.parse_entries({name: dict(weight=1.0, **kwargs)})
    loss = lambda o: losses.sum_losses(entries, o, ctx, group_size=16)
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(o)

  result = _on_mesh(lambda o: run(o, chunked=True, chunk_size=1), out, testing.data_mesh())
  _assert_same(result, jax.device_get(run(out)))


def test_chunked_loss_groups_smaller_than_the_mesh_is_a_clear_error():
  out = _outputs(batch_size=32, dim=8)
  ctx = losses.context(batch={"image_id": np.arange(32, dtype=np.int32)})
  entries = losses.parse_entries({"itc": dict(weight=1.0, chunked=True)})
  loss = lambda o: losses.sum_losses(entries, o, ctx, group_size=4)  # 4 examples, 8 devices
  with pytest.raises(ConfigError, match="loss_group_size.*multiple of 8, or chunked=False"):
    _on_mesh(jax.jit(loss), out, testing.data_mesh())


def test_chunk_size_must_be_positive():
  with pytest.raises(ConfigError, match="chunk_size=0"):
    contrastive.itc(_outputs(), CTX, chunked=True, chunk_size=0)


def test_ring_layout_reads_the_batch_axes_of_the_current_mesh():
  assert chunked.ring_layout(64, chunk_size=5) == chunked.Ring((), 1, 64, 4)
  with jax.set_mesh(sharding.make_mesh({"data": 4, "fsdp": 2})):
    assert chunked.ring_layout(64) == chunked.Ring(("data", "fsdp"), 8, 8, 8)
  with jax.set_mesh(testing.data_mesh(1)):
    assert chunked.ring_layout(64, chunk_size=16) == chunked.Ring((), 1, 64, 16)


def _temp_bytes(name, batch_size, mesh, **kwargs):
  """Per-device temporary bytes of the compiled loss and gradient on `[batch_size, 16]` inputs."""
  out = _outputs(batch_size=batch_size, dim=16, bias=-2.0 if name == "siglip" else None)
  fn = jax.jit(lambda o: jax.value_and_grad(lambda o: losses.get(name)(o, CTX, **kwargs)[0])(o))
  with jax.set_mesh(mesh):
    compiled = fn.lower(testing.shard_leading(out, mesh)).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("name", ["itc", "siglip"])
def test_chunked_memory_does_not_grow_with_the_global_batch(name):
  # 128 examples per device on 4 and on 8 devices: the dense [B/D, B] rows double, the ring's
  # [B/D, chunk] blocks do not.
  small, large = testing.data_mesh(4), testing.data_mesh(8)
  dense = [_temp_bytes(name, 128 * m.size, m) for m in (small, large)]
  ring = [_temp_bytes(name, 128 * m.size, m, chunked=True, chunk_size=32) for m in (small, large)]
  assert dense[1] > 1.5 * dense[0]
  assert ring[1] <= ring[0] * 1.05
  assert ring[1] < dense[1] / 4
