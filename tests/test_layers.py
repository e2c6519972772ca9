"""`vlalign/models/layers.py` against plain numpy references: the exact GELU (`layers.gelu`, the
erf form) and the attention (`layers.attention`: parameters, masks, dropout in training)."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlalign.errors import ConfigError
from vlalign.models import bert, layers


def test_gelu_is_exact():
  x = np.concatenate([np.linspace(-12, 12, 4001), [-30.0, -6.5, 0.0, 1e-4, 6.5, 30.0]])
  ref = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x])
  got = np.asarray(layers.gelu(jnp.asarray(x, jnp.float32)), np.float64)
  np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
  old = np.asarray(jax.nn.gelu(jnp.asarray(x, jnp.float32), approximate=False), np.float64)
  np.testing.assert_allclose(got, old, rtol=1e-6, atol=1e-6)
  assert layers.activation_fn("gelu") is layers.gelu
  grad = jax.vmap(jax.grad(layers.gelu))(jnp.asarray(x, jnp.float32))
  pdf = np.exp(-0.5 * x**2) / math.sqrt(2 * math.pi)
  cdf = np.array([0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x])
  np.testing.assert_allclose(np.asarray(grad, np.float64), cdf + x * pdf, rtol=1e-5, atol=1e-6)
  assert layers.gelu(jnp.ones(3, jnp.bfloat16)).dtype == jnp.bfloat16


def _attention_ref(params, xq, xk, mask, heads):
  p = {k: {n: np.asarray(v, np.float64) for n, v in d.items()} for k, d in params.items()}
  q = np.einsum("bld,dhk->blhk", xq, p["query"]["kernel"]) + p["query"]["bias"]
  k = np.einsum("bld,dhk->blhk", xk, p["key"]["kernel"]) + p["key"]["bias"]
  v = np.einsum("bld,dhk->blhk", xk, p["value"]["kernel"]) + p["value"]["bias"]
  logits = np.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(q.shape[-1])
  if mask is not None:
    logits = np.where(np.asarray(mask), logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  y = np.einsum("bhqs,bshk->bqhk", probs, v)
  return np.einsum("bqhk,hkd->bqd", y, p["out"]["kernel"]) + p["out"]["bias"]


@pytest.mark.parametrize("kind", ["none", "causal_padding", "cross_padding"])
def test_attention_matches_numpy(kind):
  rng = np.random.default_rng(1)
  batch, length, width, heads = 3, 6, 12, 3
  xq = rng.normal(size=(batch, length, width)).astype(np.float32)
  xk = xq if kind != "cross_padding" else rng.normal(size=(batch, 4, 8)).astype(np.float32)
  lengths = np.array([xk.shape[1], 3, 1])
  padding = layers.key_padding_mask(jnp.asarray(np.arange(xk.shape[1]) < lengths[:, None]))
  mask = None if kind == "none" else padding
  if kind == "causal_padding":
    mask = padding & layers.causal_mask(length)
  module = layers.attention(heads, 0.0, jnp.float32, False)
  args = (xq,) if kind != "cross_padding" else (xq, xk)
  variables = module.init(jax.random.PRNGKey(0), *args, mask=mask)
  # The parameters of Flax's module (checkpoints and the Hugging Face importer rely on them).
  flax_module = nn.MultiHeadDotProductAttention(num_heads=heads, force_fp32_for_softmax=True)
  flax_vars = flax_module.init(jax.random.PRNGKey(0), *args, mask=mask)
  assert jax.tree.map(np.shape, variables) == jax.tree.map(np.shape, flax_vars)
  got = module.apply(variables, *args, mask=mask)
  want = _attention_ref(variables["params"], xq, xk, mask, heads)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got, flax_module.apply(variables, *args, mask=mask), atol=1e-5)
  # Through jax.nn.dot_product_attention (the "xla" implementation; "cudnn" needs a GPU).
  fused = layers.attention(heads, 0.0, jnp.float32, False, "attn", _XLA_ATTENTION)
  np.testing.assert_allclose(fused.apply(variables, *args, mask=mask), want, rtol=1e-5, atol=1e-5)


_XLA_ATTENTION = layers.dot_product_attention_fn("xla")


def _vit(**overrides):
  from vlalign.models import vit  # noqa: PLC0415 - the tower registry imports layers

  sizes = dict(width=24, depth=2, num_heads=3, mlp_dim=48, patch_size=4, image_size=16)
  return vit.ViT(**{**sizes, **overrides})


def test_a_vit_through_jax_attention_equals_flax_attention_with_gradients():
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  flax_vit, xla_vit = _vit(), _vit(attention_implementation="xla")
  params = flax_vit.init(jax.random.PRNGKey(1), images)
  assert jax.tree.map(np.shape, xla_vit.init(jax.random.PRNGKey(1), images)) == jax.tree.map(
    np.shape, params
  )
  for tokens in (True, False):  # False: the last block computes the CLS row only
    want = flax_vit.apply(params, images, tokens=tokens)
    got = xla_vit.apply(params, images, tokens=tokens)
    for name in want:
      np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)

  weights = jax.random.normal(jax.random.PRNGKey(2), (2, 24))

  def loss(module, p):  # not sum(cls^2): after the final LayerNorm that is nearly constant
    out = module.apply(p, images, train=True)
    return jnp.sum(out["cls"] * weights) + jnp.sum(jnp.sin(out["tokens"]))

  want = jax.grad(functools.partial(loss, flax_vit))(params)
  got = jax.grad(functools.partial(loss, xla_vit))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, want)


def test_jax_attention_refuses_attention_dropout_and_unknown_names():
  images = jnp.zeros((1, 16, 16, 3))
  with pytest.raises(ConfigError, match="takes no attention dropout"):
    _vit(attention_implementation="xla", dropout=0.1).init(jax.random.PRNGKey(0), images)
  with pytest.raises(ConfigError, match="choose one of"):
    _vit(attention_implementation="flash").init(jax.random.PRNGKey(0), images)
  block = layers.EncoderBlock(
    num_heads=2, mlp_dim=8, attention_dropout=0.1, attention_implementation="xla"
  )
  x = jnp.zeros((1, 3, 4))
  variables = block.init(jax.random.PRNGKey(0), x)  # no dropout outside training
  with pytest.raises(ConfigError, match="no dropout on the attention probabilities"):
    block.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  assert layers.dot_product_attention_fn("flax") is None


def test_attention_dropout_in_training():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8))
  module = layers.attention(2, 0.5, jnp.float32, True)
  variables = module.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}, x)
  run = lambda seed: module.apply(variables, x, rngs={"dropout": jax.random.PRNGKey(seed)})
  np.testing.assert_array_equal(run(2), run(2))
  assert not np.allclose(run(2), run(3))
  evaluate = layers.attention(2, 0.5, jnp.float32, False).apply(variables, x)
  want = _attention_ref(variables["params"], np.asarray(x), np.asarray(x), None, 2)
  np.testing.assert_allclose(evaluate, want, rtol=1e-5, atol=1e-5)


# Self-attention modules with `nn.MultiHeadDotProductAttention`'s parameters, as
# `make(heads, rate, train)` -> (module, call(module, variables, x, rngs)).
ATTENTION_MODULES = {
  "layers.attention": lambda heads, rate, train: (
    layers.attention(heads, rate, jnp.float32, train),
    lambda module, variables, x, **kw: module.apply(variables, x, **kw),
  ),
  "bert.SelfAttention": lambda heads, rate, train: (
    bert.SelfAttention(heads, rate),
    lambda module, variables, x, **kw: module.apply(variables, x, None, train, **kw),
  ),
}


def _dropped_probabilities(kind: str, heads: int, batch: int, length: int, rate: float, train):
  """An attention module's probabilities after dropout, `[B, H, L, L]`, on B copies of one
  example: the tokens are one-hot (`x = I`, D = H * L) and every head's values are the tokens'
  first L features (v_k = e_k), so head h's output row q is its probability row.
  """
  x = jnp.broadcast_to(jnp.eye(length, heads * length), (batch, length, heads * length))
  module, call = ATTENTION_MODULES[kind](heads, rate, train)
  params = module.init(jax.random.key(0), x)["params"]
  value = np.zeros((heads * length, heads, length), np.float32)
  value[:length] = np.eye(length)[:, None, :]
  params = {
    **params,
    "value": {"kernel": value, "bias": np.zeros((heads, length), np.float32)},
    "out": {
      "kernel": np.eye(heads * length, dtype=np.float32).reshape(heads, length, heads * length),
      "bias": np.zeros(heads * length, np.float32),
    },
  }
  out = call(module, {"params": params}, x, rngs={"dropout": jax.random.key(3)})
  return np.asarray(out).reshape(batch, length, heads, length).transpose(0, 2, 1, 3)


@pytest.mark.parametrize("kind", sorted(ATTENTION_MODULES))
def test_attention_dropout_draws_each_example_and_head_on_its_own(kind):
  """PyTorch BERT drops `attention_probs` `[B, H, Lq, Lk]` element by element: identical
  examples and heads get different masks. (Flax's default shares one `[Lq, Lk]` mask across the
  batch and the heads.) Kept probabilities are scaled by 1 / (1 - rate)."""
  heads, batch, length, rate = 2, 6, 8, 0.5
  dropped = _dropped_probabilities(kind, heads, batch, length, rate, train=True)
  probs = _dropped_probabilities(kind, heads, batch, length, rate, train=False)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  masks = (dropped != 0).reshape(batch * heads, length * length)
  assert len({m.tobytes() for m in masks}) == batch * heads  # every (example, head) its own mask
  assert 0.4 < 1 - masks.mean() < 0.6  # 768 draws at rate 0.5
  kept = dropped != 0
  np.testing.assert_allclose(dropped[kept], probs[kept] / (1 - rate), rtol=1e-5)


@pytest.mark.parametrize("width,features", [(8, 24), (24, 8)])
def test_dense_dot_general_same_values_and_gradients_as_numpy(width, features):
  """Both branches of the transposed weight gradient (K <= N and K > N), on `[B, L, K]` inputs,
  against the float64 product and its gradients; and second derivatives as `lax.dot_general`'s."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 5, width)).astype(np.float32)
  w = rng.normal(size=(width, features)).astype(np.float32)
  g = rng.normal(size=(3, 5, features)).astype(np.float32)
  plain = (((2,), (0,)), ((), ()))

  def loss(dot_general, x, w):
    return jnp.sum(dot_general(x, w, plain) * g)

  value = layers.dense_dot_general(x, w, plain)
  dx, dw = jax.grad(functools.partial(loss, layers.dense_dot_general), argnums=(0, 1))(x, w)
  x64, w64, g64 = (a.astype(np.float64) for a in (x, w, g))
  np.testing.assert_allclose(value, x64 @ w64, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, g64 @ w64.T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    dw, x64.reshape(-1, width).T @ g64.reshape(-1, features), rtol=1e-5, atol=1e-5
  )

  def curvature(dot_general, w):  # reverse over reverse through the custom backward pass
    return jnp.sum(jax.grad(functools.partial(loss, dot_general), argnums=0)(x, w) ** 2)

  ours = jax.grad(functools.partial(curvature, layers.dense_dot_general))(w)
  np.testing.assert_allclose(
    ours, jax.grad(functools.partial(curvature, jax.lax.dot_general))(w), rtol=1e-5, atol=1e-4
  )


def test_mlp_weight_gradients_contract_no_operand_along_its_first_dimension():
  """On the CPU the MLP's weight gradients are `[K, M] @ [M, N]` products (YNNPACK's layout), not
  `x^T dy` with both operands contracted along dimension 0 (which XLA leaves to Eigen)."""
  mlp = layers.MlpBlock(mlp_dim=32)
  x = jnp.ones((4, 6, 16))
  params = mlp.init(jax.random.key(0), x)
  grad = jax.jit(jax.grad(lambda p: jnp.sum(mlp.apply(p, x) ** 2)))
  hlo = grad.lower(params).compile().as_text()
  dots = [line for line in hlo.splitlines() if " dot(" in line]
  assert len(dots) >= 5  # forward 2, backward 3 (the input's gradient is not asked for: 4)
  assert not any("lhs_contracting_dims={0}" in line for line in dots), "\n".join(dots)
