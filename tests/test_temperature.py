"""The temperature as tau (`model.temperature="tau"`, ALBEF / TCL's `self.temp`) against the default
`logit_scale`: parameters, the clamped forward value and its straight-through gradient, the losses
reading it, and one AdamW step (with `optim.clamp` and decay on `temp`) against the official torch
AdamW rule computed by hand."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vlalign import losses, optim
from vlalign.errors import ConfigError
from vlalign.losses import momentum
from vlalign.models import build_model
from vlalign.models.model import TEMPERATURE_RANGE, clip_straight_through
from vlalign.testing import loss_context

BATCH, IMAGE, MAX_LEN, VOCAB, EMBED = 4, 16, 6, 20, 8
TAU0 = 0.07
DEFAULT_KEYS = {
  "img/cls",
  "img/tokens",
  "txt/cls",
  "txt/tokens",
  "img/emb",
  "txt/emb",
  "logit_scale",
}
# ALBEF / TCL `configs/Pretrain.yaml` and torch.optim.AdamW defaults.
LR, WD, B1, B2, EPS = 1e-4, 0.02, 0.9, 0.999, 1e-8


def model_config(name="two_tower", **overrides) -> ml_collections.ConfigDict:
  tower = dict(width=16, depth=1, num_heads=2, mlp_dim=32, dropout=0.0)
  c = ml_collections.ConfigDict(
    dict(
      name=name,
      embed_dim=EMBED,
      dtype="float32",
      logit_scale_init=math.log(1 / TAU0),
      logit_bias_init=None,
      proj_hidden=None,
      remat=False,
      image=dict(kind="vit", image_size=IMAGE, patch_size=8, **tower),
      text=dict(
        kind="text_transformer",
        vocab_size=VOCAB,
        max_len=MAX_LEN,
        causal=False,
        pool="first",
        **tower,
      ),
    )
  )
  if name == "albef":
    c.fusion_depth = 1
  c.update(overrides)
  return c


def make_batch(seed=0):
  rng = np.random.default_rng(seed)
  mask = np.ones((BATCH, MAX_LEN), np.int32)
  mask[1:, 4:] = 0
  return {
    "image": rng.normal(size=(BATCH, IMAGE, IMAGE, 3)).astype(np.float32),
    "text_ids": (rng.integers(1, VOCAB, size=(BATCH, MAX_LEN)) * mask).astype(np.int32),
    "text_mask": mask,
  }


def init(config, batch):
  model = build_model(config)
  return model, model.init(jax.random.key(0), batch)


def with_temp(params, value):
  """`params` with the tau-mode parameter `temp` set to `value`."""
  inner = dict(params["params"])
  inner["temp"] = jnp.float32(value)
  return {**params, "params": inner}


def infonce_i2t(outputs):
  """A loss through the ALBEF temperature: image-to-text InfoNCE at `momentum.temperature`."""
  logits = outputs["img/emb"] @ outputs["txt/emb"].T / momentum.temperature(outputs)
  return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=1)))


def optim_config(**overrides):
  fields = dict(
    lr=LR, warmup_steps=0, min_lr_ratio=0.1, weight_decay=WD, b1=B1, b2=B2, eps=EPS, grad_clip=0.0
  )
  return ml_collections.ConfigDict({**fields, **overrides})


def tau_optim_config(**overrides):
  """The reference's treatment of `temp`: decayed (timm decays a 0-d parameter) and clamped in
  place to [0.001, 0.5]."""
  return optim_config(
    decay=(*optim.DEFAULT_DECAY, "temp"), clamp=(("temp", *TEMPERATURE_RANGE),), **overrides
  )


def one_step(tx, params, grads):
  @jax.jit
  def step(params, grads):
    updates, _ = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, updates)

  return step(params, grads)


def torch_adamw_first_step(p, g, lr=LR, wd=WD):
  """torch.optim.AdamW step 1, float64: decoupled decay, then the bias-corrected Adam step."""
  p = p * (1 - lr * wd)
  exp_avg, exp_avg_sq = (1 - B1) * g, (1 - B2) * g * g
  bias_correction1, bias_correction2 = 1 - B1, 1 - B2
  denom = math.sqrt(exp_avg_sq) / math.sqrt(bias_correction2) + EPS
  return p - lr / bias_correction1 * exp_avg / denom


# ------------------------------------------------------------------------- the default is unchanged


def test_default_mode_is_logit_scale_with_todays_outputs():
  batch = make_batch()
  model, params = init(model_config(), batch)
  assert "logit_scale" in params["params"] and "temp" not in params["params"]
  out = model.apply(params, batch)
  assert set(out) == DEFAULT_KEYS
  np.testing.assert_array_equal(out["logit_scale"], params["params"]["logit_scale"])
  np.testing.assert_allclose(momentum.temperature(out), TAU0, rtol=1e-6)
  np.testing.assert_array_equal(
    momentum.temperature(out), momentum.clamped_temperature(out["logit_scale"])
  )


def test_tau_mode_parameter_and_outputs():
  batch = make_batch()
  model, params = init(model_config(temperature="tau"), batch)
  default_model, default_params = init(model_config(), batch)
  assert "temp" in params["params"] and "logit_scale" not in params["params"]
  temp = params["params"]["temp"]
  assert temp.shape == () and temp.dtype == jnp.float32
  np.testing.assert_allclose(temp, TAU0, rtol=1e-7)
  out = model.apply(params, batch)
  default_out = default_model.apply(default_params, batch)
  assert set(out) == DEFAULT_KEYS | {"temperature"}
  np.testing.assert_allclose(out["temperature"], TAU0, rtol=1e-7)
  np.testing.assert_allclose(out["logit_scale"], math.log(1 / TAU0), rtol=1e-6)
  for key in DEFAULT_KEYS - {"logit_scale"}:  # Same initialisation of everything else.
    np.testing.assert_array_equal(out[key], default_out[key])
  # The forward values of the two modes agree: same loss at the same tau.
  np.testing.assert_allclose(infonce_i2t(out), infonce_i2t(default_out), rtol=1e-6)


def test_tau_mode_in_the_albef_model():
  batch = make_batch()
  model, params = init(model_config("albef", temperature="tau"), batch)
  assert "temp" in params["params"] and "logit_scale" not in params["params"]
  out = model.apply(params, batch)
  np.testing.assert_allclose(out["temperature"], TAU0, rtol=1e-7)
  assert "img/all_tokens" in out


@pytest.mark.parametrize(
  "overrides, message",
  [
    (dict(temperature="inverse"), "config.model.temperature"),
    (dict(temperature_range=(0.001, 0.5)), "temperature='tau' only"),
    (dict(temperature="tau", temperature_range=(0.5, 0.001)), "0 < lo < hi"),
    (dict(temperature="tau", temperature_range=0.5), "must be"),
  ],
)
def test_temperature_config_errors(overrides, message):
  with pytest.raises(ConfigError, match=message):
    init(model_config(**overrides), make_batch())


# ---------------------------------------------------------------------- the clamp in the forward


@pytest.mark.parametrize("raw, clamped", [(0.7, 0.5), (1e-4, 0.001), (0.2, 0.2), (0.5, 0.5)])
def test_forward_value_is_clamped_with_gradient_one(raw, clamped):
  batch = make_batch()
  model, params = init(model_config(temperature="tau"), batch)

  def scalars(t):
    return model.apply(with_temp(params, t), method=model.scalars)

  out = scalars(jnp.float32(raw))
  np.testing.assert_allclose(out["temperature"], clamped, rtol=1e-6)
  np.testing.assert_allclose(out["logit_scale"], -math.log(clamped), rtol=1e-6)
  # As the in-place clamp: d(loss)/d(temp) is the gradient at the clamped value, even outside.
  grad = jax.grad(lambda t: scalars(t)["temperature"])(jnp.float32(raw))
  assert float(grad) == 1.0
  grad_scale = jax.grad(lambda t: scalars(t)["logit_scale"])(jnp.float32(raw))
  np.testing.assert_allclose(grad_scale, -1.0 / clamped, rtol=1e-6)


def test_clip_straight_through_under_jit_and_vmap():
  x = jnp.float32([-1.0, 0.0005, 0.3, 0.9])
  value, grad = jax.jit(
    jax.vmap(jax.value_and_grad(lambda v: clip_straight_through(v, 0.001, 0.5)))
  )(x)
  np.testing.assert_allclose(value, [0.001, 0.001, 0.3, 0.5], rtol=1e-6)
  np.testing.assert_array_equal(grad, np.ones(4, np.float32))


def test_no_forward_clamp_with_temperature_range_none():
  # The reference's retrieval model (`models/model_retrieval.py`) never clamps `temp`.
  batch = make_batch()
  model, params = init(model_config(temperature="tau", temperature_range=None), batch)
  out = model.apply(with_temp(params, 0.7), method=model.scalars)
  np.testing.assert_allclose(out["temperature"], 0.7, rtol=1e-7)
  np.testing.assert_allclose(momentum.temperature(out), 0.7, rtol=1e-7)


# -------------------------------------------------------------------- the losses read `temperature`


def _unit(rng, *shape):
  x = rng.normal(size=shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _loss_inputs(seed=0, b=8, e=16, k=16, length=8, side=8):
  rng = np.random.default_rng(seed)
  outputs = {
    "img/emb": _unit(rng, b, e),
    "txt/emb": _unit(rng, b, e),
    "logit_scale": np.float32(math.log(1 / TAU0)),
  }
  flat = {
    "img/emb": _unit(rng, b, e),
    "txt/emb": _unit(rng, b, e),
    "img/tokens_emb": _unit(rng, b, side * side, e),
    "txt/tokens_emb": _unit(rng, b, length, e),
    "queue/img": _unit(rng, k, e),
    "queue/txt": _unit(rng, k, e),
    "alpha": np.float32(0.4),
  }
  mask = (np.arange(length)[None] < rng.integers(2, length + 1, size=b)[:, None]).astype(np.int32)
  batch = {"text_mask": mask, "image_id": np.arange(b, dtype=np.int32)}
  return outputs, loss_context(flat, batch)


@pytest.mark.parametrize("name", ["cma", "imc", "lmi", "tcl_ita"])
def test_albef_losses_read_the_temperature_output(name):
  outputs, ctx = _loss_inputs()
  # tau mode: `temperature` 0.2 wins over a `logit_scale` that says 0.07 (in a real model the two
  # agree; they differ here so that the test sees which one is read).
  tau_mode = {**outputs, "temperature": np.float32(0.2)}
  as_logit_scale = {**outputs, "logit_scale": np.float32(math.log(1 / 0.2))}
  loss_fn = losses.get(name)
  loss, metrics = loss_fn(tau_mode, ctx)
  expected, expected_metrics = loss_fn(as_logit_scale, ctx)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  if "temperature" in metrics:
    np.testing.assert_allclose(metrics["temperature"], 0.2, rtol=1e-7)
  grad = jax.grad(lambda t: loss_fn({**tau_mode, "temperature": t}, ctx)[0])(jnp.float32(0.2))
  assert np.isfinite(grad) and grad != 0


# ----------------------------------------------------------------------- one optimizer step


def test_one_adamw_step_moves_tau_as_the_official_optimiser():
  batch = make_batch()
  model, params = init(model_config(temperature="tau"), batch)
  grads = jax.jit(jax.grad(lambda p: infonce_i2t(model.apply(p, batch))))(params)
  g = float(grads["params"]["temp"])
  assert abs(g) > 1e-3
  tx, _ = optim.make_optimizer(tau_optim_config(), total_steps=10)
  new = one_step(tx, params, grads)
  tau0 = float(params["params"]["temp"])
  expected = torch_adamw_first_step(tau0, g)
  got = float(new["params"]["temp"])
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  np.testing.assert_allclose(got - tau0, expected - tau0, rtol=1e-3)
  # About lr per step, as Adam moves every parameter: here tau itself.
  assert 0.9 * LR < abs(got - tau0) < 1.1 * LR

  # The same model, loss and optimizer with logit_scale = log(1 / tau): the same forward value and
  # a gradient of the same sign through tau, but Adam moves log(1 / tau) by about lr, so tau only
  # by about lr * tau.
  ls_model, ls_params = init(model_config(), batch)
  ls_grads = jax.jit(jax.grad(lambda p: infonce_i2t(ls_model.apply(p, batch))))(ls_params)
  g_ls = float(ls_grads["params"]["logit_scale"])
  np.testing.assert_allclose(g_ls, -tau0 * g, rtol=1e-4)  # chain rule: dtau/dlogit_scale = -tau
  ls_tx, _ = optim.make_optimizer(optim_config(), total_steps=10)
  ls_new = one_step(ls_tx, ls_params, ls_grads)
  logit_scale0 = float(ls_params["params"]["logit_scale"])
  expected_ls = torch_adamw_first_step(logit_scale0, g_ls, wd=0.0)  # not in the default decay
  np.testing.assert_allclose(ls_new["params"]["logit_scale"], expected_ls, rtol=1e-6)
  tau_ls = math.exp(-float(ls_new["params"]["logit_scale"]))
  assert 0.9 * LR * tau0 < abs(tau_ls - tau0) < 1.1 * LR * tau0
  assert abs(tau_ls - got) > 0.5 * LR
  assert np.sign(tau_ls - tau0) == np.sign(got - tau0)


def test_temp_is_decayed_when_named_in_optim_decay():
  params = {"params": {"temp": jnp.float32(TAU0), "kernel": jnp.ones((2, 2))}}
  zero = jax.tree.map(jnp.zeros_like, params)
  decayed, _ = optim.make_optimizer(tau_optim_config(), total_steps=10)
  plain, _ = optim.make_optimizer(optim_config(), total_steps=10)
  # With a zero gradient Adam's term is 0: what is left is AdamW's -lr * wd * p.
  updates, _ = decayed.update(zero, decayed.init(params), params)
  np.testing.assert_allclose(updates["params"]["temp"], -LR * WD * TAU0, rtol=1e-6)
  updates, _ = plain.update(zero, plain.init(params), params)
  assert float(updates["params"]["temp"]) == 0.0


@pytest.mark.parametrize("start, sign, bound", [(0.4999, -1.0, 0.5), (0.0015, 1.0, None)])
def test_a_step_past_the_range_leaves_tau_at_the_bound(start, sign, bound):
  batch = make_batch()
  model, params = init(model_config(temperature="tau"), batch)
  params = with_temp(params, start)

  def loss(p):  # d(loss)/d(temp) = sign: Adam moves temp by -sign * lr, out of the range.
    return sign * model.apply(p, method=model.scalars)["temperature"]

  grads = jax.grad(loss)(params)
  assert float(grads["params"]["temp"]) == sign
  config = tau_optim_config(lr=1e-3)
  unclamped, _ = optim.make_optimizer(
    optim_config(lr=1e-3, decay=(*optim.DEFAULT_DECAY, "temp")), total_steps=10
  )
  free = float(one_step(unclamped, params, grads)["params"]["temp"])
  tx, _ = optim.make_optimizer(config, total_steps=10)
  new = one_step(tx, params, grads)
  got = np.float32(new["params"]["temp"])
  lo, hi = (np.float32(b) for b in TEMPERATURE_RANGE)
  assert free > hi or free < lo  # Without the clamp the stored tau leaves the range...
  assert lo <= got <= hi  # ...with it, it stays inside,
  if bound is not None:
    assert got == np.float32(bound)  # exactly at 0.5 (a float32 sum can land on it),
  else:  # and next to 0.001 (0.0015 + u lands on a coarser grid than 0.001's own).
    assert got - lo <= np.spacing(np.float32(start))
  out = model.apply(new, method=model.scalars)
  np.testing.assert_allclose(out["temperature"], got, rtol=1e-7)
