"""ALBEF fusion encoder, ITM / MLM heads and `ALBEFModel`: numpy references for the cross-attention
block and the heads, masking, cross-modal influence, and parameters created by `init`."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlalign import pytrees
from vlalign.models import build_model, fusion, layers
from vlalign.models.bert import Bert
from vlalign.models.model import ALBEFModel

BATCH = 8
IMAGE = 16
MAX_LEN = 8
VOCAB = 20
EMBED = 12
IMAGE_WIDTH = 16
TEXT_WIDTH = 12
TWO_TOWER_KEYS = {"img/cls", "img/tokens", "txt/cls", "txt/tokens", "img/emb", "txt/emb"}
ALBEF_KEYS = TWO_TOWER_KEYS | {"logit_scale", "img/all_tokens", "img/tokens_emb", "txt/tokens_emb"}


def albef_config(**overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "albef"
  c.embed_dim = EMBED
  c.dtype = "float32"
  c.logit_scale_init = math.log(1 / 0.07)
  c.logit_bias_init = None
  c.proj_hidden = None
  c.remat = False
  c.fusion_depth = 1
  c.tie_mlm = True
  c.image = dict(
    kind="vit",
    image_size=IMAGE,
    patch_size=8,
    width=IMAGE_WIDTH,
    depth=1,
    num_heads=2,
    mlp_dim=32,
    dropout=0.0,
  )
  c.text = dict(
    kind="text_transformer",
    vocab_size=VOCAB,
    max_len=MAX_LEN,
    width=TEXT_WIDTH,
    depth=1,
    num_heads=2,
    mlp_dim=24,
    causal=False,
    pool="first",
    dropout=0.0,
  )
  c.update_from_flattened_dict(overrides)
  return c


def make_batch(seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, MAX_LEN + 1, size=BATCH)
  lengths[0] = MAX_LEN
  mask = (np.arange(MAX_LEN)[None] < lengths[:, None]).astype(np.int32)
  ids = rng.integers(1, VOCAB, size=(BATCH, MAX_LEN)).astype(np.int32) * mask
  images = rng.normal(size=(BATCH, IMAGE, IMAGE, 3)).astype(np.float32)
  return {"image": images, "text_ids": ids, "text_mask": mask}


@pytest.fixture(scope="module")
def albef():
  """(model, params, batch, outputs) of a tiny ALBEF model, shared by the tests below."""
  model = build_model(albef_config())
  batch = make_batch()
  params = model.init(jax.random.key(0), batch)
  return model, params, batch, model.apply(params, batch)


def np64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


# ---------------------------------------------------------------- numpy references


def np_layer_norm(x, p, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_gelu(x):
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def np_attention(xq, xkv, p, key_ok):
  """One example: xq `[Lq, D]`, xkv `[Lk, Dk]`, key_ok `[Lk]` bool; loops over heads."""
  q = np.einsum("ld,dhk->lhk", xq, p["query"]["kernel"]) + p["query"]["bias"]
  k = np.einsum("ld,dhk->lhk", xkv, p["key"]["kernel"]) + p["key"]["bias"]
  v = np.einsum("ld,dhk->lhk", xkv, p["value"]["kernel"]) + p["value"]["bias"]
  heads = []
  for h in range(q.shape[1]):
    scores = q[:, h] @ k[:, h].T / math.sqrt(q.shape[-1])
    scores = np.where(key_ok[None], scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    heads.append((weights / weights.sum(-1, keepdims=True)) @ v[:, h])
  return np.einsum("lhk,hkd->ld", np.stack(heads, 1), p["out"]["kernel"]) + p["out"]["bias"]


def np_cross_block(x, image, p, text_ok):
  y = np_layer_norm(x, p["ln_self"])
  x = x + np_attention(y, y, p["self_attn"], text_ok)
  y = np_layer_norm(x, p["ln_cross"])
  x = x + np_attention(y, image, p["cross_attn"], np.ones(len(image), bool))
  y = np_layer_norm(x, p["ln_mlp"])
  hidden = np_gelu(y @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"])
  return x + hidden @ p["mlp"]["fc2"]["kernel"] + p["mlp"]["fc2"]["bias"]


def np_normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ---------------------------------------------------------------- fusion encoder


def test_cross_attention_block_matches_numpy_reference():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 5, TEXT_WIDTH)).astype(np.float32)
  image = rng.normal(size=(3, 4, IMAGE_WIDTH)).astype(np.float32)
  mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], np.int32)
  self_mask = (jnp.asarray(mask) > 0)[:, None, None, :]
  block = fusion.CrossAttentionBlock(num_heads=2, mlp_dim=24)
  params = block.init(jax.random.key(0), x, image, self_mask)
  params = jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape).astype(np.float32), params)
  got = np.asarray(block.apply(params, x, image, self_mask))
  p = np64(params["params"])
  assert p["cross_attn"]["key"]["kernel"].shape == (IMAGE_WIDTH, 2, TEXT_WIDTH // 2)
  for b in range(3):
    want = np_cross_block(x[b].astype(np.float64), image[b].astype(np.float64), p, mask[b] > 0)
    np.testing.assert_allclose(got[b], want, atol=3e-5, rtol=1e-5)


def test_fusion_encoder_masks():
  """Padded text positions and masked image tokens do not reach the real text positions."""
  rng = np.random.default_rng(1)
  text = rng.normal(size=(BATCH, MAX_LEN, TEXT_WIDTH)).astype(np.float32)
  image = rng.normal(size=(BATCH, 5, IMAGE_WIDTH)).astype(np.float32)
  text_mask = make_batch()["text_mask"]
  image_mask = np.ones((BATCH, 5), np.int32)
  image_mask[:, 3:] = 0
  encoder = fusion.FusionEncoder(depth=2, num_heads=2, mlp_dim=24)
  params = encoder.init(jax.random.key(0), text, text_mask, image, image_mask)
  fuse = lambda t, i: np.asarray(encoder.apply(params, t, text_mask, i, image_mask))
  base = fuse(text, image)
  assert base.shape == (BATCH, MAX_LEN, TEXT_WIDTH)
  real = text_mask[..., None] > 0
  noisy_text = np.where(real, text, 5.0 * rng.normal(size=text.shape)).astype(np.float32)
  np.testing.assert_allclose(
    np.where(real, fuse(noisy_text, image), 0), np.where(real, base, 0), atol=1e-5
  )
  noisy_image = image.copy()
  noisy_image[:, 3:] += 5.0
  np.testing.assert_allclose(fuse(text, noisy_image), base, atol=1e-5)
  noisy_image[:, 0] += 5.0  # a valid image token: every real position changes
  changed = np.abs(fuse(text, noisy_image) - base).max(-1)
  assert (changed[text_mask > 0] > 1e-3).all()


@pytest.mark.parametrize(
  "style, scan_layers, depth",
  [("pre_ln", False, 2), ("post_ln", False, 2), ("pre_ln", True, 3), ("post_ln", True, 1)],
)
def test_fusion_encoder_rows_are_the_full_outputs_rows(style, scan_layers, depth):
  """`rows`: the last block computes only the asked positions (several per example, any order,
  padded and masked keys included); values and gradients equal the full output's rows there."""
  rng = np.random.default_rng(2)
  text = rng.normal(size=(BATCH, MAX_LEN, TEXT_WIDTH)).astype(np.float32)
  image = rng.normal(size=(BATCH, 5, IMAGE_WIDTH)).astype(np.float32)
  text_mask = make_batch()["text_mask"]
  image_mask = np.ones((BATCH, 5), np.int32)
  image_mask[::2, 3:] = 0
  encoder = fusion.FusionEncoder(
    depth=depth, num_heads=2, mlp_dim=24, style=style, scan_layers=scan_layers
  )
  params = encoder.init(jax.random.key(0), text, text_mask, image, image_mask)
  params = jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape).astype(np.float32), params)
  rows = jnp.asarray(rng.integers(0, MAX_LEN, size=(BATCH, 3)), jnp.int32)

  def fused_rows(p, picked):
    if picked:
      return encoder.apply(p, text, text_mask, image, image_mask, False, rows)
    return layers.take_rows(encoder.apply(p, text, text_mask, image, image_mask), rows)

  full, pruned = fused_rows(params, False), fused_rows(params, True)
  assert pruned.shape == (BATCH, 3, TEXT_WIDTH)
  np.testing.assert_allclose(pruned, full, atol=2e-6, rtol=1e-5)
  weights = jnp.asarray(rng.normal(size=full.shape), jnp.float32)
  grad = jax.jit(jax.grad(lambda p, picked: jnp.sum(jnp.sin(fused_rows(p, picked)) * weights)),
                 static_argnums=1)  # fmt: skip
  g_full, g_pruned = grad(params, False), grad(params, True)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_full))
  for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_pruned)):
    np.testing.assert_allclose(b, a, atol=2e-5 * scale)


@pytest.mark.parametrize(
  "style, scan_layers, rows", [("pre_ln", False, False), ("post_ln", True, True)]
)
def test_fusion_encoder_image_index_equals_fusing_the_gathered_images(style, scan_layers, rows):
  """`image_index`: each image's keys and values projected once and gathered equal fusing
  `image_tokens[image_index]` (and its mask): values, gradients (the image tokens' too) and,
  in training mode, the dropout draws; with `rows` as well."""
  rng = np.random.default_rng(5)
  images = rng.normal(size=(3, 5, IMAGE_WIDTH)).astype(np.float32)
  image_mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 1, 1, 0]], np.int32)
  index = jnp.asarray(rng.integers(0, 3, size=BATCH), jnp.int32)
  text = rng.normal(size=(BATCH, MAX_LEN, TEXT_WIDTH)).astype(np.float32)
  text_mask = make_batch()["text_mask"]
  encoder = fusion.FusionEncoder(
    depth=2, num_heads=2, mlp_dim=24, style=style, scan_layers=scan_layers, dropout=0.2,
    attention_dropout=0.2,
  )  # fmt: skip
  params = encoder.init(jax.random.key(0), text, text_mask, images[index], image_mask[index])
  picked = jnp.zeros((BATCH, 1), jnp.int32) if rows else None

  def fuse(p, image_tokens, gathered, train):
    rngs = {"dropout": jax.random.key(7)}
    if gathered:
      return encoder.apply(p, text, text_mask, image_tokens, image_mask, train, picked, index,
                           rngs=rngs)  # fmt: skip
    return encoder.apply(p, text, text_mask, image_tokens[index], image_mask[index], train,
                         picked, rngs=rngs)  # fmt: skip

  for train in (False, True):
    np.testing.assert_allclose(
      fuse(params, images, True, train), fuse(params, images, False, train), atol=2e-6, rtol=1e-5
    )
  weights = jnp.asarray(rng.normal(size=fuse(params, images, False, False).shape), jnp.float32)
  grad = jax.jit(
    jax.grad(lambda p, x, g: jnp.sum(jnp.sin(fuse(p, x, g, True)) * weights), argnums=(0, 1)),
    static_argnums=2,
  )
  g_full, g_gathered = grad(params, images, False), grad(params, images, True)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_full))
  for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_gathered)):
    np.testing.assert_allclose(b, a, atol=2e-5 * scale)


def test_fusion_encoder_rows_in_training_mode_draw_dropout_for_those_rows():
  """With dropout on, `rows` gives a finite `[B, K, D]` that changes with the dropout rng."""
  rng = np.random.default_rng(3)
  text = rng.normal(size=(BATCH, MAX_LEN, TEXT_WIDTH)).astype(np.float32)
  image = rng.normal(size=(BATCH, 5, IMAGE_WIDTH)).astype(np.float32)
  text_mask = make_batch()["text_mask"]
  encoder = fusion.FusionEncoder(depth=2, num_heads=2, mlp_dim=24, dropout=0.5)
  params = encoder.init(jax.random.key(0), text, text_mask, image)
  rows = jnp.zeros((BATCH, 1), jnp.int32)
  run = lambda seed: encoder.apply(
    params, text, text_mask, image, None, True, rows, rngs={"dropout": jax.random.key(seed)}
  )
  a, b = run(1), run(2)
  assert a.shape == (BATCH, 1, TEXT_WIDTH) and np.isfinite(a).all()
  assert float(jnp.max(jnp.abs(a - b))) > 1e-3


# ---------------------------------------------------------------- ALBEF model


def test_albef_init_creates_every_head(albef):
  model, params, _, _ = albef
  assert isinstance(model, ALBEFModel)
  p = params["params"]
  for name in ("image_encoder", "text_encoder", "image_proj", "text_proj", "fusion", "itm_head"):
    assert name in p, name
  assert p["fusion"]["block_0"]["cross_attn"]["key"]["kernel"].shape[0] == IMAGE_WIDTH
  assert p["itm_head"]["classifier"]["kernel"].shape == (TEXT_WIDTH, 2)
  assert set(p["mlm_head"]) == {"transform", "ln", "bias"}  # tied decoder: no own kernel
  assert p["mlm_head"]["bias"].shape == (VOCAB,)
  assert "logit_bias" not in p
  np.testing.assert_allclose(p["logit_scale"], math.log(1 / 0.07), rtol=1e-6)


def test_albef_outputs_and_token_embeddings(albef):
  _, params, _, out = albef
  assert set(out) == ALBEF_KEYS
  n = (IMAGE // 8) ** 2
  assert out["img/all_tokens"].shape == (BATCH, 1 + n, IMAGE_WIDTH)
  assert out["img/tokens_emb"].shape == (BATCH, n, EMBED)
  assert out["txt/tokens_emb"].shape == (BATCH, MAX_LEN, EMBED)
  np.testing.assert_array_equal(out["img/all_tokens"][:, 0], out["img/cls"])
  np.testing.assert_array_equal(out["img/all_tokens"][:, 1:], out["img/tokens"])
  p = np64(params["params"])
  for side, proj in (("img", "image_proj"), ("txt", "text_proj")):
    kernel, bias = p[proj]["out"]["kernel"], p[proj]["out"]["bias"]  # ALBEF projections have bias
    assert out[f"{side}/tokens_emb"].dtype == jnp.float32
    want = np_normalize(np.asarray(out[f"{side}/tokens"], np.float64) @ kernel + bias)
    np.testing.assert_allclose(out[f"{side}/tokens_emb"], want, atol=1e-5)
    want_emb = np_normalize(np.asarray(out[f"{side}/cls"], np.float64) @ kernel + bias)
    np.testing.assert_allclose(out[f"{side}/emb"], want_emb, atol=1e-5)
  image_only = albef[0].apply(params, albef[2]["image"], method=ALBEFModel.encode_image)
  np.testing.assert_allclose(image_only["img/all_tokens"], out["img/all_tokens"], atol=1e-6)


def test_albef_fuse_itm_mlm_against_references(albef):
  model, params, batch, out = albef
  mask = batch["text_mask"]
  fuse = lambda text, image: np.asarray(
    model.apply(params, text, mask, image, method=ALBEFModel.fuse)
  )
  fused = fuse(out["txt/tokens"], out["img/all_tokens"])
  assert fused.shape == (BATCH, MAX_LEN, TEXT_WIDTH)
  # Image tokens matter (cross-attention works): another image changes every real position.
  other = fuse(out["txt/tokens"], np.roll(np.asarray(out["img/all_tokens"]), 1, axis=0))
  assert (np.abs(other - fused).max(-1)[mask > 0] > 1e-4).all()

  p = np64(params["params"])
  itm = np.asarray(model.apply(params, fused, method=ALBEFModel.itm_logits))
  head = p["itm_head"]["classifier"]
  assert itm.shape == (BATCH, 2) and itm.dtype == np.float32
  np.testing.assert_allclose(itm, fused[:, 0] @ head["kernel"] + head["bias"], atol=1e-5)

  mlm = np.asarray(model.apply(params, fused, method=ALBEFModel.mlm_logits))
  assert mlm.shape == (BATCH, MAX_LEN, VOCAB) and mlm.dtype == np.float32
  h = p["mlm_head"]
  hidden = np_gelu(fused.astype(np.float64) @ h["transform"]["kernel"] + h["transform"]["bias"])
  table = p["text_encoder"]["token_embed"]["embedding"]
  want = np_layer_norm(hidden, h["ln"]) @ table.T + h["bias"]
  np.testing.assert_allclose(mlm, want, atol=1e-4)


def test_albef_itm_match_logits_compute_the_cls_row_only(albef):
  """ITM reads the fused CLS row alone: `itm_match_logits` equals the head on the full fusion's
  row 0, with the same gradients, and the fusion's last block does far less work."""
  model, params, batch, out = albef
  mask, text, image = batch["text_mask"], out["txt/tokens"], out["img/all_tokens"]

  def full(p):
    fused = model.apply(p, text, mask, image, method=ALBEFModel.fuse)
    return model.apply(p, fused, method=ALBEFModel.itm_logits)

  def pruned(p):
    return model.apply(p, text, mask, image, method=ALBEFModel.itm_match_logits)

  np.testing.assert_allclose(pruned(params), full(params), atol=2e-6, rtol=1e-5)
  weights = jnp.asarray(np.random.default_rng(4).normal(size=(BATCH, 2)), jnp.float32)
  grads = [
    jax.grad(lambda p, f=f: jnp.sum(jnp.sin(f(p)) * weights))(params) for f in (full, pruned)
  ]
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads[0]))
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(b, a, atol=2e-5 * scale)
  flops = [jax.jit(f).lower(params).compile().cost_analysis()["flops"] for f in (full, pruned)]
  # One fusion block on 1 of 8 text rows: the image keys/values and the text keys/values remain.
  assert flops[1] < 0.7 * flops[0], flops


def test_albef_itm_pairs_equal_the_full_fusion_of_each_pair(albef):
  """`itm_pairs` (the CLS row only, each image's keys and values projected once) gives the ITM
  head on the full fusion of the concatenated pairs, as ALBEF computes them, for less work."""
  model, params, batch, out = albef
  mask, text, image = batch["text_mask"], out["txt/tokens"], out["img/all_tokens"]
  neg_text = jnp.roll(jnp.arange(BATCH), 1)
  neg_image = jnp.roll(jnp.arange(BATCH), -2)

  def reference(p):
    fused = model.apply(
      p,
      jnp.concatenate([text, text, text[neg_text]]),
      jnp.concatenate([mask, mask, mask[neg_text]]),
      jnp.concatenate([image, image[neg_image], image]),
      method=ALBEFModel.fuse,
    )
    return model.apply(p, fused, method=ALBEFModel.itm_logits)

  def pairs(p):
    return model.apply(p, out, mask, neg_text, neg_image, method=ALBEFModel.itm_pairs)["itm/logits"]

  np.testing.assert_allclose(pairs(params), reference(params), atol=2e-6, rtol=1e-5)
  flops = [jax.jit(f).lower(params).compile().cost_analysis()["flops"] for f in (reference, pairs)]
  assert flops[1] < 0.6 * flops[0], flops


def test_albef_untied_mlm_and_bf16():
  config = albef_config(tie_mlm=False, dtype="bfloat16")
  model = build_model(config)
  batch = make_batch()
  params = model.init(jax.random.key(0), batch)
  assert params["params"]["mlm_head"]["decoder"]["kernel"].shape == (TEXT_WIDTH, VOCAB)
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}

  # Eager on purpose: `init` has just run the same bf16 ops, so they are compiled already.
  out = model.apply(params, batch)
  fused = model.apply(
    params, out["txt/tokens"], batch["text_mask"], out["img/all_tokens"], method=ALBEFModel.fuse
  )
  itm = model.apply(params, fused, method=ALBEFModel.itm_logits)
  mlm = model.apply(params, fused, method=ALBEFModel.mlm_logits)
  assert fused.dtype == jnp.bfloat16 and itm.dtype == jnp.float32 and mlm.dtype == jnp.float32
  assert mlm.shape == (BATCH, MAX_LEN, VOCAB)
  for value in (fused, itm, mlm):
    assert np.isfinite(np.asarray(value, np.float32)).all()


@pytest.mark.parametrize("style", fusion.STYLES)
def test_fresh_fusion_kernels_start_as_in_bert_for_post_ln(style):
  """`post_ln` blocks are BERT's layers: their kernels start from BERT's normal(0.02), so the
  cross-attention a BERT checkpoint does not hold starts as ALBEF's (`BertModel.init_weights`),
  with zero biases and unit LayerNorm scales. `pre_ln` blocks keep Flax's LeCun normal,
  std 1/sqrt(fan_in)."""
  width, image_width = 96, 128
  encoder = fusion.FusionEncoder(depth=1, num_heads=2, mlp_dim=192, style=style)
  text = jnp.zeros((1, 4, width))
  params = encoder.init(jax.random.key(0), text, jnp.ones((1, 4)), jnp.zeros((1, 3, image_width)))
  flat = {k: np.asarray(v) for k, v in pytrees.named_leaves(params["params"]).items()}
  kernels = {k: v for k, v in flat.items() if k.endswith("kernel")}
  fan_in = {"cross_attn/key": image_width, "cross_attn/value": image_width, "mlp/fc2": 192}
  assert len(kernels) == 10  # q, k, v, out of both attentions; fc1, fc2
  for name, kernel in kernels.items():
    fan = next((f for k, f in fan_in.items() if k in name), width)
    want = 0.02 if style == "post_ln" else 1 / math.sqrt(fan)
    assert abs(kernel.std() / want - 1) < 0.1, (name, kernel.std(), want)
    assert abs(kernel.mean()) < 0.1 * want, name
  assert all(not v.any() for k, v in flat.items() if k.endswith("bias"))
  assert all((v == 1).all() for k, v in flat.items() if k.endswith("scale"))


@pytest.mark.parametrize("lora", [None, dict(rank=2, targets=["query", "fc1"])])
def test_fresh_bert_tower_starts_as_bert(lora):
  """A `bert` tower trained from scratch starts as `BertModel.init_weights` starts it: every
  kernel and embedding normal(0.02), biases zero, LayerNorm scales one (the LoRA-capable path
  too, apart from the adapters)."""
  tower = Bert(
    vocab_size=100,
    max_len=16,
    width=96,
    depth=1,
    num_heads=2,
    mlp_dim=192,
    pool="pooler",
    lora=lora,
  )
  ids = jnp.ones((1, 4), jnp.int32)
  params = tower.init(jax.random.key(0), ids, jnp.ones((1, 4)))["params"]
  flat = {k: np.asarray(v) for k, v in pytrees.named_leaves(params).items()}
  weights = {
    k: v for k, v in flat.items() if k.endswith(("kernel", "embedding")) and "lora" not in k
  }
  assert len(weights) >= 10  # q, k, v, out, fc1, fc2, pooler, three embeddings
  for name, weight in weights.items():
    assert abs(weight.std() / 0.02 - 1) < 0.15, (name, weight.std())
  assert all(not v.any() for k, v in flat.items() if k.endswith("bias"))
  assert all((v == 1).all() for k, v in flat.items() if k.endswith("scale"))


@pytest.mark.parametrize("style", fusion.STYLES)
def test_albef_heads_start_as_the_reference_code_for_post_ln(style):
  """ALBEF's BERT-style model (`post_ln`) starts its fresh heads as ALBEF's code does:
  `vision_proj`, `text_proj` and `itm_head` as `torch.nn.Linear` (kernel and bias
  U(-1/sqrt(fan_in), 1/sqrt(fan_in))), the MLM transform as BERT's (normal(0.02), LayerNorm
  epsilon from `model.text`). `pre_ln` keeps Flax's (LeCun normal kernels, zero biases)."""
  width = 64
  config = albef_config(
    **{
      "fusion_style": style,
      "text.width": width,
      "text.mlp_dim": 2 * width,
      "text.layer_norm_eps": 1e-12,
      "embed_dim": 48,
    }
  )
  model = build_model(config)
  variables = model.init(jax.random.key(0), make_batch())
  params = jax.device_get(variables["params"])
  linears = {
    "image_proj": (params["image_proj"]["out"], IMAGE_WIDTH),
    "text_proj": (params["text_proj"]["out"], width),
    "itm_head": (params["itm_head"]["classifier"], width),
  }
  for name, (dense, fan_in) in linears.items():
    bound = 1 / math.sqrt(fan_in)
    kernel, bias = np.asarray(dense["kernel"]), np.asarray(dense["bias"])
    if style == "post_ln":
      assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound, name
      assert np.abs(kernel).max() > 0.9 * bound and bias.std() > 0.2 * bound, name
    else:
      assert np.abs(kernel).max() > bound and not bias.any(), name  # normal tails beyond it
  transform = np.asarray(params["mlm_head"]["transform"]["kernel"])
  want = 0.02 if style == "post_ln" else 1 / math.sqrt(width)
  assert abs(transform.std() / want - 1) < 0.1
  eps = model.bind(variables).mlm_head.layer_norm_eps
  assert eps == (1e-12 if style == "post_ln" else 1e-6)
