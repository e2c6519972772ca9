"""LoRA adapters on the `llama` and `bert` text towers: forward, merge, hf import and export."""

import json
import math
import pathlib
import shutil
from collections.abc import Mapping

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from vlalign import pytrees
from vlalign.errors import ConfigError
from vlalign.models import build_tower
from vlalign.models.bert import BERT_LORA_TARGETS
from vlalign.models.llama import LLAMA_LORA_TARGETS
from vlalign.models.lora import (
  LORA_PARAM_PATTERN,
  LoRA,
  check_lora,
  is_lora_path,
  merge_lora,
)
from vlalign.weights import apply_init, hf

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
LLAMA = dict(
  kind="llama",
  vocab_size=99,
  width=32,
  depth=2,
  num_heads=4,
  num_kv_heads=2,
  mlp_dim=48,
  max_len=64,
  rope_theta=500.0,
  norm_eps=1e-5,
)
BERT = dict(
  kind="bert", vocab_size=99, width=32, depth=2, num_heads=4, mlp_dim=37, max_len=40, pool="pooler"
)
TOWERS = {"llama": (LLAMA, LLAMA_LORA_TARGETS), "bert": (BERT, BERT_LORA_TARGETS)}
HF_DIRS = {"llama": FIXTURES / "tiny_llama", "bert": FIXTURES / "tiny_bert"}


def _inputs():
  ids = np.random.default_rng(0).integers(1, 99, (2, 8)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 5:] = 0
  return ids, mask


def _lora_tower(name, **lora):
  tower, targets = TOWERS[name]
  return {**tower, "lora": {"rank": 4, "alpha": 8.0, "targets": list(targets), **lora}}


def _init(tower, key=0):
  return build_tower(tower, "test").init(jax.random.key(key), *_inputs())["params"]


def _apply(tower, params, train=False, rng=None):
  rngs = {"dropout": rng} if rng is not None else None
  return build_tower(tower, "test").apply({"params": params}, *_inputs(), train, rngs=rngs)


def _without_adapters(tree):
  if not isinstance(tree, Mapping):
    return tree
  return {k: _without_adapters(v) for k, v in tree.items() if not k.endswith("_lora")}


def _randomize_b(params, key=1, std=0.3):
  """Adapters with random non-zero B (A keeps its random init)."""
  leaves = pytrees.named_leaves(params)
  keys = dict(zip(leaves, jax.random.split(jax.random.key(key), len(leaves)), strict=True))

  def fill(path, leaf):
    name = pytrees.path_name(path)
    if is_lora_path(name) and name.endswith("/b"):
      return std * jax.random.normal(keys[name], leaf.shape, leaf.dtype)
    return leaf

  return jax.tree.map_with_path(fill, params)


def _adapters(params):
  return {k: v for k, v in pytrees.named_leaves(params).items() if is_lora_path(k)}


@pytest.mark.parametrize("name", sorted(TOWERS))
def test_fresh_adapters_leave_the_tower_exactly_unchanged(name):
  tower = _lora_tower(name)
  params = _init(tower)
  adapters = _adapters(params)
  # One (a, b) per target per block, B zero, named `<proj>_lora` beside `<proj>`.
  targets = TOWERS[name][1]
  assert len(adapters) == 2 * len(targets) * tower["depth"]
  assert all(not np.any(v) for k, v in adapters.items() if k.endswith("/b"))
  assert all(np.any(v) for k, v in adapters.items() if k.endswith("/a"))
  where = {"llama": "block_1/gate_lora/a", "bert": "block_1/mlp/fc1_lora/a"}[name]
  assert where in adapters and "block_0/attn/query_lora/b" in adapters
  # The base parameters are those of the same tower without lora (same key), bit for bit.
  plain_tower = TOWERS[name][0]
  plain = _init(plain_tower)
  base = _without_adapters(params)
  assert pytrees.named_leaves(base).keys() == pytrees.named_leaves(plain).keys()
  for k, v in pytrees.named_leaves(plain).items():
    np.testing.assert_array_equal(v, pytrees.named_leaves(base)[k], err_msg=k)
  with_lora, without = _apply(tower, params), _apply(plain_tower, base)
  for key in ("cls", "tokens"):
    np.testing.assert_array_equal(with_lora[key], without[key])


@pytest.mark.parametrize("name", sorted(TOWERS))
def test_merged_adapters_give_the_lora_towers_outputs(name):
  tower = _lora_tower(name)
  params = _randomize_b(_init(tower))
  lora_out = _apply(tower, params)
  merged = merge_lora(params, tower["lora"])
  assert not _adapters(merged)
  plain_tower = TOWERS[name][0]
  merged_out = _apply(plain_tower, merged)
  base_out = _apply(plain_tower, _without_adapters(params))
  for key in ("cls", "tokens"):
    np.testing.assert_allclose(merged_out[key], lora_out[key], rtol=1e-5, atol=1e-5)
    assert np.abs(base_out[key] - lora_out[key]).max() > 1e-2  # the adapters do change it
  # Only the adapted kernels changed: biases, norms and embeddings are the base's.
  before, after = pytrees.named_leaves(params), pytrees.named_leaves(merged)
  for k, v in after.items():
    if not k.endswith("/kernel") or "pooler" in k:
      np.testing.assert_array_equal(v, before[k], err_msg=k)
    else:
      assert np.abs(v - before[k]).max() > 0, k


def test_merge_of_each_target_alone_matches():
  for name, (_, targets) in TOWERS.items():
    for target in targets:
      tower = _lora_tower(name, targets=[target], rank=2, alpha=3.0)
      params = _randomize_b(_init(tower), key=7)
      merged = merge_lora(params, tower["lora"])
      np.testing.assert_allclose(
        _apply(TOWERS[name][0], merged)["tokens"],
        _apply(tower, params)["tokens"],
        rtol=1e-5,
        atol=1e-5,
        err_msg=f"{name} {target}",
      )


def _np_rmsnorm(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def test_llama_mlp_against_a_numpy_reference():
  """Block 0's SwiGLU with adapters on gate, up and down, by hand in float64:
  `x + (W_down' (silu(W_gate' h) * W_up' h))` with `W' x = x W + (alpha / r) x A B`."""
  tower = _lora_tower("llama", targets=["gate", "up", "down"], rank=3, alpha=5.0)
  params = _randomize_b(_init(tower))
  _, state = build_tower(tower, "test").apply(
    {"params": params}, *_inputs(), capture_intermediates=True
  )
  inter = pytrees.named_leaves(state["intermediates"])
  embed = np.asarray(inter["token_embed/__call__/0"], np.float64)
  attn = np.asarray(inter["block_0/attn/__call__/0"], np.float64)
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), params["block_0"])
  x = embed + attn
  h = _np_rmsnorm(x, p["ln_mlp"]["scale"], 1e-5)

  def proj(name, inputs):
    lora = p[f"{name}_lora"]
    return inputs @ p[name]["kernel"] + (5.0 / 3) * inputs @ lora["a"] @ lora["b"]

  gate = proj("gate", h)
  expected = x + proj("down", gate / (1 + np.exp(-gate)) * proj("up", h))
  np.testing.assert_allclose(inter["block_0/__call__/0"], expected, rtol=1e-5, atol=1e-5)


def test_bert_mlp_against_a_numpy_reference():
  tower = _lora_tower("bert", targets=["fc1", "fc2"], rank=2, alpha=2.0)
  params = _randomize_b(_init(tower))
  _, state = build_tower(tower, "test").apply(
    {"params": params}, *_inputs(), capture_intermediates=True
  )
  inter = pytrees.named_leaves(state["intermediates"])
  x = np.asarray(inter["block_0/ln_attn/__call__/0"], np.float64)
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), params["block_0"]["mlp"])

  def proj(name, inputs):
    lora = p[f"{name}_lora"]
    return inputs @ p[name]["kernel"] + p[name]["bias"] + inputs @ lora["a"] @ lora["b"]

  y = proj("fc1", x)
  gelu = y * 0.5 * (1 + np.vectorize(math.erf)(y / math.sqrt(2)))
  np.testing.assert_allclose(
    inter["block_0/mlp/__call__/0"], proj("fc2", gelu), rtol=1e-5, atol=1e-5
  )


@pytest.mark.parametrize("in_axes", [1, 2])
def test_adapter_module_against_numpy(in_axes):
  """`(alpha / r) x A B` contracting the last `in_axes` axes (2: the attention output over
  `(heads, head_dim)`), output shape `features`."""
  shape, features = ((2, 5, 4, 8), (6,)) if in_axes == 2 else ((2, 5, 32), (4, 8))
  module = LoRA(features=features, rank=3, alpha=6.0, in_axes=in_axes)
  x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
  params = module.init(jax.random.key(0), x)["params"]
  assert params["a"].shape == (*shape[-in_axes:], 3) and params["b"].shape == (3, *features)
  fan_in = math.prod(shape[-in_axes:])
  assert np.abs(params["a"]).max() <= 1 / math.sqrt(fan_in)  # PEFT's kaiming_uniform(sqrt(5))
  params = {**params, "b": np.random.default_rng(2).normal(size=(3, *features))}
  out = module.apply({"params": params}, x)
  flat = x.reshape(*shape[:2], -1).astype(np.float64)
  a = np.asarray(params["a"], np.float64).reshape(fan_in, 3)
  expected = (2.0 * flat @ a @ params["b"].reshape(3, -1)).reshape(*shape[:2], *features)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(TOWERS))
def test_dropout_acts_on_the_adapter_branch_only(name):
  rng = jax.random.key(5)
  dropped = _lora_tower(name, dropout=0.5)
  params = _randomize_b(_init(dropped))
  eval_out = _apply(dropped, params)["tokens"]
  train_out = _apply(dropped, params, train=True, rng=rng)["tokens"]
  assert np.abs(np.asarray(train_out) - eval_out).max() > 1e-3
  # With B = 0 the branch is zero: dropping its input changes nothing.
  zero_b = _init(dropped)
  np.testing.assert_array_equal(
    _apply(dropped, zero_b, train=True, rng=rng)["tokens"], _apply(dropped, zero_b)["tokens"]
  )
  kept = _lora_tower(name, dropout=0.0)
  np.testing.assert_array_equal(_apply(kept, params, train=True, rng=rng)["tokens"], eval_out)


def _abstract(tower):
  return jax.eval_shape(build_tower(tower, "test").init, jax.random.key(0), *_inputs())["params"]


@pytest.mark.parametrize("name", sorted(TOWERS))
def test_hf_checkpoint_into_a_lora_tower(name):
  directory, tower, plain_tower = HF_DIRS[name], _lora_tower(name), TOWERS[name][0]
  fresh = _init(tower, key=4)
  params = apply_init(
    {"text": dict(loader="hf", target="text_encoder", path=str(directory))},
    {"params": {"text_encoder": fresh}},
    {"params": {"text_encoder": _abstract(tower)}},
    {"text": tower},
  )["params"]["text_encoder"]
  plain = hf.load_tower(directory, plain_tower, _abstract(plain_tower))
  loaded = pytrees.named_leaves(params)
  for k, v in pytrees.named_leaves(plain).items():
    np.testing.assert_array_equal(loaded[k], v, err_msg=k)
  stored = load_file(str(directory / hf.WEIGHTS_FILE))
  if name == "llama":
    np.testing.assert_array_equal(
      loaded["block_1/up/kernel"], stored["layers.1.mlp.up_proj.weight"].T
    )
  else:
    np.testing.assert_array_equal(
      loaded["block_1/mlp/fc1/kernel"], stored["encoder.layer.1.intermediate.dense.weight"].T
    )
  adapters = _adapters(params)
  assert set(adapters) == set(_adapters(fresh)) and adapters
  for k, v in adapters.items():
    np.testing.assert_array_equal(v, pytrees.named_leaves(fresh)[k], err_msg=k)  # fresh init
    if k.endswith("/b"):
      assert not np.any(v), k
  # B = 0: the LoRA tower computes what the checkpoint does.
  np.testing.assert_array_equal(
    _apply(tower, params)["tokens"], _apply(plain_tower, plain)["tokens"]
  )


def test_hf_import_into_a_lora_tower_still_names_missing_tensors(tmp_path):
  target = tmp_path / "ckpt"
  shutil.copytree(HF_DIRS["llama"], target)
  tensors = load_file(str(target / hf.WEIGHTS_FILE))
  tensors.pop("layers.1.self_attn.q_proj.weight")
  save_file(tensors, str(target / hf.WEIGHTS_FILE))
  tower = _lora_tower("llama")
  with pytest.raises(ConfigError, match=r"missing tensors: \['layers.1.self_attn.q_proj.weight'\]"):
    hf.load_tower(target, tower, _abstract(tower))
  # Without lora in the tower config, adapter leaves are parameters without a stored name.
  with pytest.raises(ConfigError, match="tower parameters without a stored name"):
    hf.load_tower(HF_DIRS["llama"], LLAMA, _abstract(tower))


@pytest.mark.parametrize("name", sorted(TOWERS))
def test_export_merges_the_adapters_into_a_plain_checkpoint(tmp_path, name):
  tower, plain_tower = _lora_tower(name), TOWERS[name][0]
  params = _randomize_b(_init(tower))
  out = hf.export_tower(params, tower, tmp_path / "export")
  config = json.loads((out / hf.CONFIG_FILE).read_text())
  assert "lora" not in config
  plain_export = hf.export_tower(_init(plain_tower), plain_tower, tmp_path / "plain")
  assert json.loads((plain_export / hf.CONFIG_FILE).read_text()) == config
  ours = {k: v.shape for k, v in load_file(str(out / hf.WEIGHTS_FILE)).items()}
  assert ours == {k: v.shape for k, v in load_file(str(plain_export / hf.WEIGHTS_FILE)).items()}
  reloaded = hf.load_tower(out, plain_tower, _abstract(plain_tower))
  for key in ("cls", "tokens"):
    np.testing.assert_allclose(
      _apply(plain_tower, reloaded)[key], _apply(tower, params)[key], rtol=1e-5, atol=1e-5
    )


def test_lora_config_errors_are_clear():
  with pytest.raises(ConfigError, match=r"model.text.lora: unknown fields \['rnak'\]"):
    _init({**LLAMA, "lora": {"rank": 4, "rnak": 4}})
  with pytest.raises(
    ConfigError,
    match=r"targets \['q_proj'\] are not projections of this tower; it has "
    r"\['down', 'gate', 'key', 'out', 'query', 'up', 'value'\]",
  ):
    _init({**LLAMA, "lora": {"rank": 4, "targets": ["query", "q_proj"]}})
  with pytest.raises(ConfigError, match=r"\['fc1', 'fc2', 'key', 'out', 'query', 'value'\]"):
    _init({**BERT, "lora": {"rank": 4, "targets": ["gate"]}})
  with pytest.raises(ConfigError, match="rank=0 must be an integer >= 1"):
    _init({**BERT, "lora": {"rank": 0}})
  with pytest.raises(ConfigError, match="needs a 'rank'"):
    check_lora({"targets": ["query"]}, LLAMA_LORA_TARGETS, "model.text.lora")
  with pytest.raises(ConfigError, match=r"dropout=1.0 must be in \[0, 1\)"):
    check_lora({"rank": 2, "dropout": 1.0}, LLAMA_LORA_TARGETS, "x")
  with pytest.raises(ConfigError, match="must be a list"):
    check_lora({"rank": 2, "targets": "query"}, LLAMA_LORA_TARGETS, "x")
  assert check_lora(None, LLAMA_LORA_TARGETS, "x") is None
  assert check_lora({"rank": 2}, LLAMA_LORA_TARGETS, "x") == dict(
    rank=2, alpha=2.0, dropout=0.0, targets=("query", "value")
  )
  with pytest.raises(ConfigError, match="the tower config has no lora"):
    merge_lora(_init(_lora_tower("llama")), None)


def test_freezing_all_but_the_adapters():
  params = {"text_encoder": _init(_lora_tower("llama", targets=["query"]))}
  frozen = pytrees.path_mask(params, ["text_encoder/(?!.*_lora/).*"], "optim.frozen")
  trainable = [k for k, v in pytrees.named_leaves(frozen).items() if not v]
  assert trainable == [
    f"text_encoder/block_{i}/attn/query_lora/{p}" for i in range(2) for p in ("a", "b")
  ]
  assert is_lora_path("block_0/attn/query_lora/a") and not is_lora_path("block_0/attn/query/kernel")
  assert LORA_PARAM_PATTERN == r".*_lora/.*"
