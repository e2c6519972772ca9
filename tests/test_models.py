"""Encoders, heads and the two-tower model: shapes, masks, pooling, dtypes, dropout, errors, and the
pre-LN block and position-embedding interpolation against slow numpy references."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlalign.models import build_model, build_tower, layers, text, vit
from vlalign.models.heads import Projection, l2_normalize
from vlalign.models.model import TwoTower

BATCH = 8
IMAGE = 16
MAX_LEN = 8
VOCAB = 20
EMBED = 12
OUTPUT_KEYS = {
  "img/cls",
  "img/tokens",
  "txt/cls",
  "txt/tokens",
  "img/emb",
  "txt/emb",
  "logit_scale",
}


def model_config(**overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "two_tower"
  c.embed_dim = EMBED
  c.dtype = "float32"
  c.logit_scale_init = math.log(1 / 0.07)
  c.logit_bias_init = None
  c.proj_hidden = None
  c.remat = False
  c.image = dict(
    kind="vit",
    image_size=IMAGE,
    patch_size=8,
    width=16,
    depth=1,
    num_heads=2,
    mlp_dim=32,
    dropout=0.0,
  )
  c.text = dict(
    kind="text_transformer",
    vocab_size=VOCAB,
    max_len=MAX_LEN,
    width=16,
    depth=1,
    num_heads=2,
    mlp_dim=32,
    causal=False,
    pool="first",
    dropout=0.0,
  )
  c.update_from_flattened_dict(overrides)
  return c


def make_batch(seed=0, batch=BATCH, image=IMAGE, length=MAX_LEN):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, length + 1, size=batch)
  lengths[0] = length  # one row without padding
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  ids = rng.integers(1, VOCAB, size=(batch, length)).astype(np.int32) * mask
  images = rng.normal(size=(batch, image, image, 3)).astype(np.float32)
  return {"image": images, "text_ids": ids, "text_mask": mask}


def init_and_apply(config, batch, train=False, rng=1):
  model = build_model(config)
  params = model.init(jax.random.key(0), batch)
  out = model.apply(params, batch, train=train, rngs={"dropout": jax.random.key(rng)})
  return model, params, out


def text_tower(**overrides):
  return build_tower({**dict(model_config().text), **overrides}, "model.text")


def apply_text(module, ids, mask, params=None):
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)
  if params is None:
    params = module.init(jax.random.key(0), ids, mask)
  return params, jax.tree.map(np.asarray, module.apply(params, ids, mask))


# ---------------------------------------------------------------- numpy references


def np_layer_norm(x, p, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_gelu(x):
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def np_attention(xq, xkv, p, allowed):
  """One example: xq `[Lq, D]`, xkv `[Lk, Dk]`, allowed `[Lq, Lk]` bool; loops over heads."""
  q = np.einsum("ld,dhk->lhk", xq, p["query"]["kernel"]) + p["query"]["bias"]
  k = np.einsum("ld,dhk->lhk", xkv, p["key"]["kernel"]) + p["key"]["bias"]
  v = np.einsum("ld,dhk->lhk", xkv, p["value"]["kernel"]) + p["value"]["bias"]
  heads = []
  for h in range(q.shape[1]):
    scores = q[:, h] @ k[:, h].T / math.sqrt(q.shape[-1])
    scores = np.where(allowed, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    heads.append((weights / weights.sum(-1, keepdims=True)) @ v[:, h])
  return np.einsum("lhk,hkd->ld", np.stack(heads, 1), p["out"]["kernel"]) + p["out"]["bias"]


def np_mlp(x, p):
  h = np_gelu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
  return h @ p["fc2"]["kernel"] + p["fc2"]["bias"]


def np_encoder_block(x, p, allowed):
  x = x + np_attention(
    np_layer_norm(x, p["ln_attn"]), np_layer_norm(x, p["ln_attn"]), p["attn"], allowed
  )
  return x + np_mlp(np_layer_norm(x, p["ln_mlp"]), p["mlp"])


def np_bilinear(grid, rows, cols):
  """Half-pixel-centred bilinear upsampling of `[R, C, D]` with edge clamping, by plain loops."""
  in_rows, in_cols, _ = grid.shape

  def taps(i, n_in, n_out):
    pos = min(max((i + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n_in - 1)
    return lo, hi, pos - lo

  out = np.zeros((rows, cols, grid.shape[-1]))
  for r in range(rows):
    r0, r1, fr = taps(r, in_rows, rows)
    for c in range(cols):
      c0, c1, fc = taps(c, in_cols, cols)
      top = (1 - fc) * grid[r0, c0] + fc * grid[r0, c1]
      bottom = (1 - fc) * grid[r1, c0] + fc * grid[r1, c1]
      out[r, c] = (1 - fr) * top + fr * bottom
  return out


# ---------------------------------------------------------------- layers


@pytest.mark.parametrize("causal", [False, True])
def test_encoder_block_matches_numpy_reference(causal):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 5, 8)).astype(np.float32)
  mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], np.int32)
  attn_mask = text.text_attention_mask(jnp.asarray(mask), causal)
  block = layers.EncoderBlock(num_heads=2, mlp_dim=16)
  params = block.init(jax.random.key(0), x, attn_mask)
  # Non-trivial LayerNorm parameters, so that a mix-up of scale and bias would show.
  params = jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape).astype(np.float32), params)
  got = np.asarray(block.apply(params, x, attn_mask))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  for b in range(3):
    allowed = np.broadcast_to(mask[b][None, :] > 0, (5, 5))
    if causal:
      allowed = allowed & np.tri(5, dtype=bool)
    want = np_encoder_block(x[b].astype(np.float64), p, allowed)
    np.testing.assert_allclose(got[b], want, atol=2e-5, rtol=1e-5)


def test_encoder_remat_same_params_values_and_grads():
  x = np.random.default_rng(0).normal(size=(3, 5, 8)).astype(np.float32)
  plain = layers.Encoder(depth=1, num_heads=2, mlp_dim=16)
  remat = layers.Encoder(depth=1, num_heads=2, mlp_dim=16, remat=True)
  params = plain.init(jax.random.key(0), x)
  remat_params = jax.eval_shape(remat.init, jax.random.key(0), x)
  assert jax.tree.structure(params) == jax.tree.structure(remat_params)

  def value_and_grad(module):
    loss = lambda p: jnp.sum(module.apply(p, x, None, True) ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)

  (value, grads), (remat_value, remat_grads) = value_and_grad(plain), value_and_grad(remat)
  np.testing.assert_allclose(remat_value, value, rtol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads, remat_grads
  )


# ---------------------------------------------------------------- heads


def test_l2_normalize_matches_numpy_and_handles_zero():
  x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
  x[1] = 0.0
  want = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)
  np.testing.assert_allclose(np.asarray(l2_normalize(x)), want, rtol=1e-6, atol=1e-7)
  assert l2_normalize(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(l2_normalize(x))[1], 0.0)


@pytest.mark.parametrize("hidden", [None, 10])
def test_projection_linear_or_mlp(hidden):
  x = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
  head = Projection(embed_dim=5, hidden=hidden)
  params = head.init(jax.random.key(0), x)
  got = np.asarray(head.apply(params, x))
  p = params["params"]
  if hidden is None:
    assert set(p) == {"out"}
    want = x @ np.asarray(p["out"]["kernel"])
  else:
    assert p["hidden"]["kernel"].shape == (8, hidden)
    want = np_gelu(x @ np.asarray(p["hidden"]["kernel"], np.float64)) @ np.asarray(
      p["out"]["kernel"]
    )
  assert got.shape == (3, 5)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- ViT


def test_vit_shapes_and_bad_patch_size():
  model = vit.ViT(width=16, depth=1, num_heads=2, mlp_dim=32, patch_size=8, image_size=IMAGE)
  images = make_batch()["image"]
  params = model.init(jax.random.key(0), images)
  out = model.apply(params, images)
  assert out["cls"].shape == (BATCH, 16)
  assert out["tokens"].shape == (BATCH, 4, 16)
  with pytest.raises(ValueError, match="multiple of the patch size 8"):
    model.apply(params, np.zeros((BATCH, 20, IMAGE, 3), np.float32))


def test_vit_trained_grid_runs_on_larger_images_with_interpolated_positions():
  model = vit.ViT(width=16, depth=1, num_heads=2, mlp_dim=32, patch_size=8, image_size=IMAGE)
  params = model.init(jax.random.key(0), make_batch()["image"])
  big = np.random.default_rng(0).normal(size=(BATCH, 24, 32, 3)).astype(np.float32)
  out = model.apply(params, big)
  assert out["tokens"].shape == (BATCH, 3 * 4, 16)
  assert np.isfinite(np.asarray(out["tokens"])).all()
  grid = np.asarray(params["params"]["pos_embedding"], np.float64)
  got = np.asarray(vit.resize_position_embedding(jnp.asarray(grid, jnp.float32), 3, 4))
  np.testing.assert_allclose(got, np_bilinear(grid, 3, 4), atol=1e-6)
  assert vit.resize_position_embedding(grid, 2, 2) is grid  # the trained grid is used as is


# ---------------------------------------------------------------- text


def test_text_too_long_raises():
  module = text_tower()
  ids = np.ones((BATCH, MAX_LEN + 1), np.int32)
  with pytest.raises(ValueError, match="exceeds model.text.max_len=8"):
    module.init(jax.random.key(0), ids, np.ones_like(ids))


def test_unknown_pool_raises():
  with pytest.raises(ValueError, match="unknown text pool 'max'"):
    apply_text(text_tower(pool="max"), np.ones((1, 4), np.int32), np.ones((1, 4), np.int32))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pool", ["first", "eos", "mean"])
def test_text_padding_invariance(causal, pool):
  batch = make_batch()
  ids, mask = batch["text_ids"], batch["text_mask"]
  module = text_tower(causal=causal, pool=pool)
  params, out = apply_text(module, ids, mask)
  noisy = np.where(mask > 0, ids, (ids + 7) % VOCAB + 1)  # other ids at padded positions only
  _, out_noisy = apply_text(module, noisy, mask, params)
  real = mask[..., None] > 0
  np.testing.assert_allclose(out_noisy["cls"], out["cls"], atol=1e-6)
  np.testing.assert_allclose(
    np.where(real, out_noisy["tokens"], 0), np.where(real, out["tokens"], 0), atol=1e-6
  )
  # Sanity: changing a real token does change the output.
  changed = ids.copy()
  changed[:, 1] = changed[:, 1] % (VOCAB - 1) + 1
  _, out_changed = apply_text(module, changed, mask, params)
  assert np.abs(out_changed["tokens"][:, 1] - out["tokens"][:, 1]).max() > 1e-3


@pytest.mark.parametrize("causal", [False, True])
def test_causal_position_does_not_see_later_tokens(causal):
  rng = np.random.default_rng(0)
  ids = rng.integers(1, VOCAB, size=(BATCH, MAX_LEN)).astype(np.int32)
  mask = np.ones_like(ids)
  module = text_tower(causal=causal)
  params, out = apply_text(module, ids, mask)
  for i in range(MAX_LEN - 1):
    later = ids.copy()
    later[:, i + 1 :] = later[:, i + 1 :] % (VOCAB - 1) + 1
    _, out_later = apply_text(module, later, mask, params)
    diff_upto_i = np.abs(out_later["tokens"][:, : i + 1] - out["tokens"][:, : i + 1]).max()
    if causal:
      assert diff_upto_i < 1e-6, i
    else:
      assert diff_upto_i > 1e-3, i  # bidirectional attention does see later tokens


@pytest.mark.parametrize("pool", ["first", "eos", "mean"])
def test_text_pooling_against_loops(pool):
  batch = make_batch()
  ids, mask = batch["text_ids"], batch["text_mask"]
  _, out = apply_text(text_tower(pool=pool), ids, mask)
  tokens = out["tokens"]
  for b in range(BATCH):
    n = int(mask[b].sum())
    if pool == "first":
      want = tokens[b, 0]
    elif pool == "eos":
      want = tokens[b, n - 1]
    else:
      want = sum(tokens[b, i] for i in range(n)) / n
    np.testing.assert_allclose(out["cls"][b], want, atol=1e-6)


# ---------------------------------------------------------------- two-tower model


def test_two_tower_outputs_keys_shapes_dtypes_and_unit_norm():
  batch = make_batch()
  _, params, out = init_and_apply(model_config(), batch)
  assert set(out) == OUTPUT_KEYS
  shapes = {
    "img/cls": (BATCH, 16),
    "img/tokens": (BATCH, 4, 16),
    "txt/cls": (BATCH, 16),
    "txt/tokens": (BATCH, MAX_LEN, 16),
    "img/emb": (BATCH, EMBED),
    "txt/emb": (BATCH, EMBED),
    "logit_scale": (),
  }
  assert {k: v.shape for k, v in out.items()} == shapes
  for key in ("img/emb", "txt/emb"):
    assert out[key].dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out[key]), axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(out["logit_scale"], math.log(1 / 0.07), rtol=1e-6)
  assert "logit_bias" not in params["params"]


def test_logit_bias_only_when_configured():
  batch = make_batch()
  config = model_config(logit_scale_init=math.log(10.0), logit_bias_init=-10.0)
  _, params, out = init_and_apply(config, batch)
  assert set(out) == OUTPUT_KEYS | {"logit_bias"}
  assert float(out["logit_bias"]) == -10.0
  assert float(params["params"]["logit_bias"]) == -10.0
  np.testing.assert_allclose(out["logit_scale"], math.log(10.0), rtol=1e-6)


def test_encode_methods_use_params_from_init_and_match_call():
  batch = make_batch()
  model, params, out = init_and_apply(model_config(proj_hidden=24), batch)
  img = model.apply(params, batch["image"], method=TwoTower.encode_image)
  txt = model.apply(params, batch["text_ids"], batch["text_mask"], method=TwoTower.encode_text)
  assert set(img) == {"img/cls", "img/tokens", "img/emb"}
  assert set(txt) == {"txt/cls", "txt/tokens", "txt/emb"}
  for key, value in {**img, **txt}.items():
    np.testing.assert_allclose(value, out[key], atol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_finite_outputs():
  batch = make_batch()
  _, params, out = init_and_apply(model_config(dtype="bfloat16"), batch)
  dtypes = {leaf.dtype for leaf in jax.tree.leaves(params)}
  assert dtypes == {jnp.dtype(jnp.float32)}
  assert out["img/tokens"].dtype == jnp.bfloat16
  assert out["txt/tokens"].dtype == jnp.bfloat16
  assert out["img/emb"].dtype == jnp.float32 and out["txt/emb"].dtype == jnp.float32
  for value in out.values():
    assert np.isfinite(np.asarray(value, np.float32)).all()


def test_dropout_only_in_train_mode():
  batch = make_batch()
  model = build_model(model_config(**{"image.dropout": 0.3, "text.dropout": 0.3}))
  params = model.init(jax.random.key(0), batch)
  # Eval mode runs eagerly (its ops are the ones `init` just compiled); train mode is jitted once,
  # with "rbg" keys, whose random bits compile faster than threefry's.
  key = lambda seed: jax.random.key(seed, impl="rbg")
  evaluate = lambda seed: model.apply(params, batch, rngs={"dropout": key(seed)})
  train = jax.jit(lambda rng: model.apply(params, batch, train=True, rngs={"dropout": rng}))
  eval_a, eval_b = evaluate(1), evaluate(2)
  train_a, train_b = train(key(1)), train(key(2))
  for key in ("img/emb", "txt/emb", "img/tokens", "txt/tokens"):
    np.testing.assert_array_equal(eval_a[key], eval_b[key])
    assert np.abs(np.asarray(train_a[key]) - np.asarray(train_b[key])).max() > 1e-3
    assert np.abs(np.asarray(train_a[key]) - np.asarray(eval_a[key])).max() > 1e-3
  # With zero rates (the default config), train mode is eval mode.
  model, params, zero_eval = init_and_apply(model_config(), batch, train=False)
  zero_train = model.apply(params, batch, train=True, rngs={"dropout": jax.random.key(3)})
  np.testing.assert_allclose(zero_train["img/emb"], zero_eval["img/emb"], atol=1e-6)


def test_model_remat_flag_reaches_the_blocks():
  batch = make_batch()
  plain, remat = build_model(model_config()), build_model(model_config(remat=True))
  params = jax.eval_shape(plain.init, jax.random.key(0), batch)
  assert jax.tree.structure(params) == jax.tree.structure(
    jax.eval_shape(remat.init, jax.random.key(0), batch)
  )
  jaxpr = lambda model: str(jax.make_jaxpr(lambda p: model.apply(p, batch, train=True))(params))
  assert "checkpoint" in jaxpr(remat) or "remat" in jaxpr(remat)
  assert "checkpoint" not in jaxpr(plain) and "remat" not in jaxpr(plain)


def test_unknown_model_name_and_tower_kind_and_tower_field_raise():
  with pytest.raises(
    ValueError, match=r"unknown model 'clip2'; registered: \['albef', 'lexvla', 'two_tower'\]"
  ):
    build_model(model_config(name="clip2"))
  batch = make_batch()
  with pytest.raises(ValueError, match="unknown tower 'convnet'"):
    build_model(model_config(**{"image.kind": "convnet"})).init(jax.random.key(0), batch)
  config = model_config()
  config.text.widht = 16
  with pytest.raises(ValueError, match=r"model.text has fields \['widht'\]"):
    build_model(config).init(jax.random.key(0), batch)


def test_a_tower_registered_elsewhere_is_used_without_changing_the_composite_model():
  """A new image tower kind (here: mean-pooled patch embedding) needs only its registration."""
  import flax.linen as nn

  from vlalign.models import TOWERS

  @TOWERS.register("test_mean_patches")
  class MeanPatches(nn.Module):
    width: int
    patch_size: int
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, images, train=False):
      p = self.patch_size
      x = nn.Conv(self.width, (p, p), strides=(p, p), dtype=self.dtype)(images)
      tokens = x.reshape(x.shape[0], -1, self.width)
      return {"cls": tokens.mean(axis=1), "tokens": tokens}

  config = model_config()
  config.image = dict(kind="test_mean_patches", width=12, patch_size=8)
  model = build_model(config)
  params = model.init(jax.random.key(0), make_batch())
  out = model.apply(params, make_batch())
  assert out["img/tokens"].shape == (BATCH, (IMAGE // 8) ** 2, 12)
  assert out["img/emb"].shape == (BATCH, EMBED)
