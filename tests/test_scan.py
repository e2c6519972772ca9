"""Scanned layers (`model.scan_layers`) and remat policies (`model.remat_policy`): scanned towers
compute the unrolled ones' function (outputs and gradients, parameters converted with
`scan.stack_layers`), the conversions, the config checks, and what the compiled program holds."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlalign.errors import ConfigError
from vlalign.models import TOWERS, build_model, build_tower, fusion, scan

BATCH = 4
IMAGE = 16
LENGTH = 8
VOCAB = 24
DEPTH = 2

VIT = dict(
  kind="vit", image_size=IMAGE, patch_size=8, width=16, depth=DEPTH, num_heads=2, mlp_dim=32
)
TEXT = dict(
  kind="text_transformer",
  vocab_size=VOCAB,
  max_len=LENGTH,
  width=16,
  depth=DEPTH,
  num_heads=2,
  mlp_dim=32,
  causal=True,
  pool="eos",
)
BERT = dict(
  kind="bert",
  vocab_size=VOCAB,
  max_len=LENGTH,
  width=16,
  depth=DEPTH,
  num_heads=2,
  mlp_dim=32,
  pool="pooler",
)
LLAMA = dict(
  kind="llama",
  vocab_size=VOCAB,
  width=16,
  depth=DEPTH,
  num_heads=4,
  num_kv_heads=2,
  mlp_dim=24,
  max_len=LENGTH,
)
LORA = dict(rank=2, alpha=4, targets=["query", "value", "fc1"])
TOWER_CASES = {
  "vit_layer_scale": {**VIT, "layer_scale": True, "layer_scale_init": 0.5},
  "text_transformer": TEXT,
  "bert": BERT,
  "bert_lora": {**BERT, "lora": LORA},
  "llama_lora": {**LLAMA, "lora": dict(rank=2, targets=["query", "gate"])},
}


def batch(seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, LENGTH + 1, size=BATCH)
  lengths[0] = LENGTH
  mask = (np.arange(LENGTH)[None] < lengths[:, None]).astype(np.int32)
  ids = rng.integers(1, VOCAB, size=(BATCH, LENGTH)).astype(np.int32) * mask
  images = rng.normal(size=(BATCH, IMAGE, IMAGE, 3)).astype(np.float32)
  return {"image": images, "text_ids": ids, "text_mask": mask}


def tower_inputs(config, data):
  if config["kind"] == "vit":
    return (data["image"],)
  return data["text_ids"], data["text_mask"]


def random_params(module, *inputs, seed=1):
  """Parameters of `module` for `inputs`, every leaf drawn from a normal distribution (LoRA's zero
  `b` and LayerScale's constants included), so that no block is the identity and the layers
  differ; numpy draws on the abstract tree, so nothing is compiled."""
  abstract = jax.eval_shape(module.init, jax.random.key(0), *inputs)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: 0.3 * rng.standard_normal(x.shape).astype(x.dtype), abstract)


def loss_of(outputs):
  """A scalar that depends on every output."""
  return sum(jnp.sum(jnp.sin(x.astype(jnp.float32))) for x in jax.tree.leaves(outputs))


def assert_trees_close(actual, expected, rtol=2e-5, atol=2e-6):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol),
    actual,
    expected,
  )


def check_equivalent(unrolled, scanned, params, *inputs, method=None):
  """`scanned` with `stack_layers(params)` gives `unrolled`'s outputs and (stacked) gradients."""
  stacked = scan.stack_layers(params)

  def value_and_grad(module, variables):
    value = lambda p: module.apply(p, *inputs, method=method)
    return jax.jit(lambda p: (value(p), jax.grad(lambda q: loss_of(value(q)))(p)))(variables)

  outputs, grads = value_and_grad(unrolled, params)
  scanned_outputs, scanned_grads = value_and_grad(scanned, stacked)
  assert_trees_close(scanned_outputs, outputs)
  assert_trees_close(scanned_grads, scan.stack_layers(grads), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
  "case,remat,policy",
  [(case, False, "full") for case in sorted(TOWER_CASES)] + [("bert", True, "dots_saveable")],
)
def test_scanned_tower_matches_unrolled(case, remat, policy):
  config = ml_collections.ConfigDict(TOWER_CASES[case])
  unrolled = build_tower(config, "model.text", remat=remat, remat_policy=policy)
  scanned = build_tower(config, "model.text", remat=remat, remat_policy=policy, scan_layers=True)
  inputs = tower_inputs(config, batch())
  params = random_params(unrolled, *inputs)
  # The scanned tower creates exactly the stacked parameters (names, shapes, dtypes).
  abstract = jax.eval_shape(scanned.init, jax.random.key(0), *inputs)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract) == jax.tree.map(
    lambda x: (x.shape, x.dtype), scan.stack_layers(params)
  )
  check_equivalent(unrolled, scanned, params, *inputs)


def albef_config(**overrides):
  c = ml_collections.ConfigDict()
  c.name = "albef"
  c.embed_dim = 12
  c.dtype = "float32"
  c.logit_scale_init = math.log(1 / 0.07)
  c.logit_bias_init = None
  c.proj_hidden = None
  c.remat = False
  c.fusion_depth = 2
  c.tie_mlm = True
  c.image = dict(VIT)
  c.text = dict(BERT, depth=2, pool="first")
  c.fusion_style = "post_ln"
  c.update_from_flattened_dict(overrides)
  return c


@pytest.mark.parametrize(
  "style,remat,policy", [("pre_ln", False, "full"), ("post_ln", True, "full")]
)
def test_scanned_fusion_encoder_matches_unrolled(style, remat, policy):
  kwargs = dict(depth=3, num_heads=2, mlp_dim=24, style=style, remat=remat)
  unrolled = fusion.FusionEncoder(**kwargs, remat_policy=policy)
  scanned = fusion.FusionEncoder(**kwargs, remat_policy=policy, scan_layers=True)
  rng = np.random.default_rng(0)
  text = rng.normal(size=(BATCH, LENGTH, 12)).astype(np.float32)
  image = rng.normal(size=(BATCH, 5, 16)).astype(np.float32)  # Di != D: projected keys/values
  text_mask = batch()["text_mask"]
  image_mask = (rng.random((BATCH, 5)) > 0.3).astype(np.int32)
  image_mask[:, 0] = 1
  inputs = (text, text_mask, image, image_mask)
  params = random_params(unrolled, *inputs)
  check_equivalent(unrolled, scanned, params, *inputs)


def test_scanned_albef_model_matches_unrolled_in_every_pass():
  """ViT + BERT + post-LN fusion (ALBEF / TCL's towers): `__call__`, ITM on pairs and MLM; the
  gradients reach every tower, the image one also through the fusion's cross-attention."""
  unrolled = build_model(albef_config())
  scanned = build_model(albef_config(scan_layers=True))
  data = batch()
  params = random_params(unrolled, data)
  negatives = (np.arange(BATCH) + 1) % BATCH
  mlm_ids = np.where(np.arange(LENGTH) % 3 == 1, 1, data["text_ids"]).astype(np.int32)

  def passes(model):
    out = model(data)
    return {
      **out,
      **model.itm_pairs(out, data["text_mask"], negatives, negatives[::-1]),
      **model.masked_lm(out, mlm_ids, data["text_mask"]),
    }

  check_equivalent(unrolled, scanned, params, method=passes)


def test_scanned_dropout_depends_on_the_rng_and_is_off_in_eval():
  config = ml_collections.ConfigDict(dict(BERT, dropout=0.3, attention_dropout=0.3))
  tower = build_tower(config, "model.text", scan_layers=True)
  inputs = tower_inputs(config, batch())
  params = tower.init(jax.random.key(0), *inputs)
  run = jax.jit(
    lambda seed: tower.apply(params, *inputs, train=True, rngs={"dropout": jax.random.key(seed)})[
      "tokens"
    ]
  )
  np.testing.assert_array_equal(run(1), run(1))
  assert not np.allclose(run(1), run(2))
  assert not np.allclose(run(1), tower.apply(params, *inputs)["tokens"])


class _AddDropoutNoise(nn.Module):
  """`x + Dropout(0.5)(ones)`: the layer's dropout mask (0 or 2 per element) added to x."""

  @nn.compact
  def __call__(self, x, train):
    return x + nn.Dropout(0.5)(jnp.ones_like(x), deterministic=not train)


class _NoiseStack(nn.Module):
  remat: bool = False

  @nn.compact
  def __call__(self, x, train):
    block = _AddDropoutNoise(name=scan.STACKED)
    return scan.scan_blocks(block, x, depth=2, train=train, remat=self.remat)


@pytest.mark.parametrize("remat", [False, True])
def test_each_scanned_layer_draws_its_own_dropout_mask(remat):
  """Two layers adding their masks give 0, 2 or 4; the same mask twice would never give 2."""
  x = jnp.zeros((64, 64))
  out = np.asarray(_NoiseStack(remat).apply({}, x, True, rngs={"dropout": jax.random.key(0)}))
  assert set(np.unique(out)) == {0.0, 2.0, 4.0}
  np.testing.assert_array_equal(_NoiseStack(remat).apply({}, x, False), 2 * np.ones((64, 64)))


def test_scanned_init_is_per_layer():
  """A fresh scanned tower's layers are initialised independently (split `params` rngs)."""
  config = ml_collections.ConfigDict(VIT)
  tower = build_tower(config, "model.image", scan_layers=True)
  params = tower.init(jax.random.key(0), batch()["image"])["params"]
  kernel = np.asarray(params["encoder"][scan.STACKED]["mlp"]["fc1"]["kernel"])
  assert kernel.shape[0] == DEPTH
  assert not np.allclose(kernel[0], kernel[1])


def test_stack_and_unstack_layers_round_trip_any_nesting():
  layer = lambda i: {"attn": {"kernel": np.full((2, 3), i, np.float32)}, "ln": {"scale": i}}
  tree = {
    "params": {
      "image_encoder": {"encoder": {**{f"block_{i}": layer(i) for i in range(3)}, "ln_final": 1}},
      "fusion": {f"block_{i}": layer(10 + i) for i in range(2)},
      "logit_scale": np.float32(2.0),
    }
  }
  stacked = scan.stack_layers(tree)
  encoder = stacked["params"]["image_encoder"]["encoder"]
  assert set(encoder) == {scan.STACKED, "ln_final"}
  assert encoder[scan.STACKED]["attn"]["kernel"].shape == (3, 2, 3)
  np.testing.assert_array_equal(encoder[scan.STACKED]["ln"]["scale"], [0, 1, 2])
  assert stacked["params"]["fusion"][scan.STACKED]["attn"]["kernel"].shape == (2, 2, 3)
  assert scan.has_stacked_layers(stacked) and not scan.has_stacked_layers(tree)
  back = scan.unstack_layers(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(tree)
  jax.tree.map(np.testing.assert_array_equal, back, tree)
  # Abstract trees and None leaves (a loader's "no value") convert too.
  abstract = {
    f"block_{i}": {"k": jax.ShapeDtypeStruct((4,), jnp.float32), "b": None} for i in (0, 1)
  }
  stacked = scan.stack_layers(abstract)
  assert stacked[scan.STACKED]["k"].shape == (2, 4) and stacked[scan.STACKED]["b"] is None
  assert scan.unstack_layers(stacked)["block_1"]["k"].shape == (4,)
  assert scan.unrolled_names("encoder/blocks/mlp/fc1/kernel", 2) == [
    "encoder/block_0/mlp/fc1/kernel",
    "encoder/block_1/mlp/fc1/kernel",
  ]
  assert scan.unrolled_names("encoder/ln_final/scale", 2) is None


def test_stack_layers_refuses_gaps_and_different_blocks():
  with pytest.raises(ValueError, match="0..n-1"):
    scan.stack_layers({"block_0": {"k": np.zeros(2)}, "block_2": {"k": np.zeros(2)}})
  with pytest.raises(ValueError, match="other parameters"):
    scan.stack_layers({"block_0": {"k": np.zeros(2)}, "block_1": {"j": np.zeros(2)}})
  with pytest.raises(ValueError, match="some layers"):
    scan.stack_layers({"block_0": {"k": np.zeros(2)}, "block_1": {"k": None}})


def test_remat_policy_and_scan_config_errors():
  with pytest.raises(ConfigError, match="unknown model.remat_policy"):
    build_model(albef_config(remat=True, remat_policy="most")).init(jax.random.key(0), batch())
  with pytest.raises(ConfigError, match="no effect without model.remat=True"):
    build_model(albef_config(remat_policy="dots_saveable")).init(jax.random.key(0), batch())
  assert scan.layer_options(ml_collections.ConfigDict()) == dict(
    remat=False, remat_policy="full", scan_layers=False
  )


def test_a_tower_without_scanned_layers_is_refused_only_when_asked_to_scan():
  @TOWERS.register("test_scan_plain_tower")
  class Plain(nn.Module):
    width: int = 4
    remat: bool = False

    @nn.compact
    def __call__(self, images, train=False):
      return {"cls": nn.Dense(self.width)(images.mean((1, 2))), "tokens": images}

  config = ml_collections.ConfigDict(dict(kind="test_scan_plain_tower"))
  assert build_tower(config, "model.image", remat=True, scan_layers=False, remat_policy="full")
  with pytest.raises(ConfigError, match=r"\['scan_layers'\].*test_scan_plain_tower"):
    build_tower(config, "model.image", scan_layers=True)
  with pytest.raises(ConfigError, match="remat_policy"):
    build_tower(config, "model.image", remat=True, remat_policy="dots_saveable")


def _jaxpr(model, data):
  params = jax.eval_shape(model.init, jax.random.key(0), data)
  return str(jax.make_jaxpr(model.apply)(params, data))


def test_the_program_holds_one_scan_per_tower_and_the_remat_policy():
  data = batch()
  unrolled = _jaxpr(build_model(albef_config()), data)
  scanned = _jaxpr(build_model(albef_config(scan_layers=True)), data)
  assert "scan[" not in unrolled and scanned.count("scan[") == 2  # image and text towers
  full = _jaxpr(build_model(albef_config(scan_layers=True, remat=True)), data)
  dots = _jaxpr(
    build_model(albef_config(scan_layers=True, remat=True, remat_policy="dots_saveable")), data
  )
  unrolled_remat = _jaxpr(build_model(albef_config(remat=True)), data)
  assert "remat2[" not in scanned
  for program in (full, dots, unrolled_remat):
    assert "remat2[" in program
  assert "policy=None" in full and "DotsSaveable" not in full
  assert "DotsSaveable" in dots and "policy=None" not in dots
  assert "scan[" not in unrolled_remat


def test_a_scanned_step_counts_the_flops_of_every_layer():
  """XLA's cost analysis counts a loop's body once; `trainer.step_flops` adds the other layers'
  FLOPs, from lowerings, to within ~1% of the unrolled step's compiled count."""
  from configs import clip
  from vlalign import perf, trainer

  counts = {}
  for scan_layers in (False, True):
    config = clip.get_config("tiny")
    config.model.update(scan_layers=scan_layers, image=dict(config.model.image, depth=3))
    setup = trainer.build(config, data=False)
    lowered = trainer.lower_step(setup)
    compiled = lowered.compile()
    counts[scan_layers] = trainer.step_flops(setup, lowered, compiled), perf.step_flops(compiled)
  (unrolled, _), (scanned, raw) = counts[False], counts[True]
  assert raw < 0.9 * unrolled  # the loop's body counted once
  assert scanned == pytest.approx(unrolled, rel=0.02)  # lowered vs compiled counts: ~1%
