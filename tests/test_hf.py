"""Hugging Face import/export and tokenizers against references made by transformers (PyTorch).

The reference values are committed fixtures (`tests/fixtures/make_hf_fixtures.py` regenerates them
where torch and transformers are installed): a tiny random `BertModel` saved with
`save_pretrained`, the real all-MiniLM-L6-v2 on a few captions, and transformers' pure-Python BERT
tokenizer on 300 varied strings.
"""

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from configs import lit
from vlalign import checkpoint, pytrees, trainer
from vlalign.data import tokenizer as tk
from vlalign.errors import ConfigError, PathError, WorkdirError
from vlalign.models.bert import Bert
from vlalign.weights import hf

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
TINY = FIXTURES / "tiny_bert"
TINY_TOWER = dict(
  kind="bert", vocab_size=99, width=32, depth=2, num_heads=4, mlp_dim=37, max_len=40, pool="pooler"
)


def _bert(tower):
  return Bert(**{k: v for k, v in tower.items() if k != "kind"})


def _abstract(tower, length=8):
  ids = np.zeros((2, length), np.int32)
  return jax.eval_shape(_bert(tower).init, jax.random.key(0), ids, np.ones_like(ids))["params"]


TINY_VIT = dict(
  kind="vit",
  width=32,
  depth=2,
  num_heads=4,
  mlp_dim=37,
  image_size=32,
  patch_size=8,
  cls_pos_embed=True,
  layer_norm_eps=1e-12,
)
CLIP_VISION = {**TINY_VIT, "ln_pre": True, "patch_bias": False, "layer_norm_eps": 1e-5}
CLIP_VISION["activation"] = "quick_gelu"
CLIP_TEXT = dict(
  kind="text_transformer",
  vocab_size=99,
  width=32,
  depth=2,
  num_heads=4,
  mlp_dim=37,
  max_len=16,
  causal=True,
  pool="eos",
  layer_norm_eps=1e-5,
  activation="quick_gelu",
)


DINOV2 = dict(
  kind="vit",
  width=32,
  depth=2,
  num_heads=4,
  mlp_dim=64,
  image_size=28,
  patch_size=14,
  cls_pos_embed=True,
  layer_scale=True,
  pos_interpolation="bicubic",
)
SIGLIP_VISION = dict(
  kind="vit",
  width=32,
  depth=2,
  num_heads=4,
  mlp_dim=37,
  image_size=32,
  patch_size=8,
  class_token=False,
  pool="map",
  activation="gelu_tanh",
)
SIGLIP_TEXT = dict(
  kind="text_transformer",
  vocab_size=99,
  width=32,
  depth=2,
  num_heads=4,
  mlp_dim=37,
  max_len=16,
  pool="last",
  attend_padding=True,
  head=True,
  activation="gelu_tanh",
)
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


def _tower_apply(tower, params, *inputs):
  from vlalign.models import build_tower  # noqa: PLC0415

  return build_tower(tower, "test").apply({"params": params}, *inputs)


def _tower_abstract(tower, *inputs):
  from vlalign.models import build_tower  # noqa: PLC0415

  return jax.eval_shape(build_tower(tower, "test").init, jax.random.key(0), *inputs)["params"]


def _minilm_dir():
  return hf.resolve_location(lit.MINILM, "test")


def test_tiny_bert_matches_transformers():
  ref = np.load(TINY / "reference.npz")
  params = hf.load_tower(TINY, TINY_TOWER, _abstract(TINY_TOWER))
  out = _bert(TINY_TOWER).apply({"params": params}, ref["ids"], ref["mask"])
  # Padded positions too: BERT's padded queries still attend to the real keys.
  np.testing.assert_allclose(out["tokens"], ref["last_hidden_state"], atol=1e-5, rtol=0)
  np.testing.assert_allclose(out["cls"], ref["pooler_output"], atol=1e-5, rtol=0)


def test_tiny_vit_matches_transformers():
  ref = np.load(FIXTURES / "tiny_vit" / "reference.npz")
  params = hf.load_tower(FIXTURES / "tiny_vit", TINY_VIT, _tower_abstract(TINY_VIT, ref["images"]))
  out = _tower_apply(TINY_VIT, params, ref["images"])
  np.testing.assert_allclose(out["cls"], ref["last_hidden_state"][:, 0], atol=1e-5, rtol=0)
  np.testing.assert_allclose(out["tokens"], ref["last_hidden_state"][:, 1:], atol=1e-5, rtol=0)


def test_tiny_clip_towers_match_transformers():
  """Both towers from one CLIPModel checkpoint (nested vision_config / text_config)."""
  directory = FIXTURES / "tiny_clip"
  ref = np.load(directory / "reference.npz")
  abstract = _tower_abstract(CLIP_VISION, ref["images"])
  out = _tower_apply(CLIP_VISION, hf.load_tower(directory, CLIP_VISION, abstract), ref["images"])
  np.testing.assert_allclose(out["cls"], ref["vision_pooler_output"], atol=1e-5, rtol=0)
  np.testing.assert_allclose(out["tokens"], ref["vision_tokens"][:, 1:], atol=1e-5, rtol=0)
  ids, mask = ref["ids"], ref["mask"]
  params = hf.load_tower(directory, CLIP_TEXT, _tower_abstract(CLIP_TEXT, ids, mask))
  out = _tower_apply(CLIP_TEXT, params, ids, mask)
  real = mask[..., None] > 0  # causal: real tokens never see padding, so they must agree
  np.testing.assert_allclose(
    np.where(real, out["tokens"], 0), np.where(real, ref["text_last_hidden_state"], 0), atol=1e-5
  )
  np.testing.assert_allclose(out["cls"], ref["text_pooler_output"], atol=1e-5, rtol=0)


def test_tiny_distilled_deit_matches_transformers():
  tower = {**TINY_VIT, "distillation_token": True}
  ref = np.load(FIXTURES / "tiny_deit" / "reference.npz")
  params = hf.load_tower(FIXTURES / "tiny_deit", tower, _tower_abstract(tower, ref["images"]))
  out = _tower_apply(tower, params, ref["images"])
  hidden = ref["last_hidden_state"]  # [B, 2 + N, D]: CLS, distillation token, patches
  np.testing.assert_allclose(out["cls"], hidden[:, 0], atol=1e-5, rtol=0)
  np.testing.assert_allclose(out["tokens"], hidden[:, 2:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("registers", [0, 4])
def test_tiny_dinov2_matches_transformers(registers):
  directory = FIXTURES / ("tiny_dinov2_registers" if registers else "tiny_dinov2")
  tower = {**DINOV2, "num_registers": registers}
  ref = np.load(directory / "reference.npz")
  params = hf.load_tower(directory, tower, _tower_abstract(tower, ref["images"]))
  out = _tower_apply(tower, params, ref["images"])
  hidden = ref["last_hidden_state"]  # [B, 1 + R + N, D]: CLS, registers, patches
  np.testing.assert_allclose(out["cls"], hidden[:, 0], atol=1e-5, rtol=0)
  np.testing.assert_allclose(out["tokens"], hidden[:, 1 + registers :], atol=1e-5, rtol=0)
  # Another resolution runs (the learned 2x2 grid resized bicubically to 3x3).
  bigger = np.zeros((1, 42, 42, 3), np.float32)
  assert _tower_apply(tower, params, bigger)["tokens"].shape == (1, 9, 32)


def test_tiny_siglip_towers_match_transformers():
  directory = FIXTURES / "tiny_siglip"
  ref = np.load(directory / "reference.npz")
  params = hf.load_tower(directory, SIGLIP_VISION, _tower_abstract(SIGLIP_VISION, ref["images"]))
  out = _tower_apply(SIGLIP_VISION, params, ref["images"])
  np.testing.assert_allclose(out["tokens"], ref["vision_last_hidden_state"], atol=1e-5, rtol=0)
  np.testing.assert_allclose(out["cls"], ref["vision_pooler_output"], atol=1e-5, rtol=0)
  ids = ref["ids"]
  mask = (ids != 1).astype(np.int32)  # the mask is ignored (attend_padding) except by pooling
  params = hf.load_tower(directory, SIGLIP_TEXT, _tower_abstract(SIGLIP_TEXT, ids, mask))
  out = _tower_apply(SIGLIP_TEXT, params, ids, mask)
  np.testing.assert_allclose(out["tokens"], ref["text_last_hidden_state"], atol=1e-5, rtol=0)
  np.testing.assert_allclose(out["cls"], ref["text_pooler_output"], atol=1e-5, rtol=0)


def test_dinov2_register_count_is_checked():
  with pytest.raises(ConfigError, match="num_registers=0 but the checkpoint implies 4"):
    hf.load_tower(FIXTURES / "tiny_dinov2_registers", DINOV2, {})


def test_tiny_llama_matches_transformers():
  ref = np.load(FIXTURES / "tiny_llama" / "reference.npz")
  ids, mask = ref["ids"], ref["mask"]
  params = hf.load_tower(FIXTURES / "tiny_llama", LLAMA, _tower_abstract(LLAMA, ids, mask))
  out = _tower_apply(LLAMA, params, ids, mask)
  real = mask[..., None] > 0
  np.testing.assert_allclose(
    np.where(real, out["tokens"], 0), np.where(real, ref["last_hidden_state"], 0), atol=1e-5
  )
  last = mask.sum(1) - 1
  np.testing.assert_allclose(out["cls"], ref["last_hidden_state"][np.arange(3), last], atol=1e-5)
  with pytest.raises(ConfigError, match="num_kv_heads=4 but the checkpoint implies 2"):
    hf.load_tower(FIXTURES / "tiny_llama", {**LLAMA, "num_kv_heads": None}, {})


def test_llama_in_bfloat16_stays_close():
  ref = np.load(FIXTURES / "tiny_llama" / "reference.npz")
  ids, mask = ref["ids"], ref["mask"]
  params = hf.load_tower(FIXTURES / "tiny_llama", LLAMA, _tower_abstract(LLAMA, ids, mask))
  out = _tower_apply({**LLAMA, "dtype": jax.numpy.bfloat16}, params, ids, mask)
  assert out["tokens"].dtype == jax.numpy.bfloat16
  real = mask[..., None] > 0
  error = np.abs(
    np.where(real, np.asarray(out["tokens"], np.float32) - ref["last_hidden_state"], 0)
  )
  assert error.max() < 0.1 * np.abs(ref["last_hidden_state"]).max()


def test_vision_checkpoint_into_a_tower_without_its_fixed_fields_is_refused():
  tower = {**CLIP_VISION, "ln_pre": False}
  with pytest.raises(ConfigError, match="ln_pre must be True for a clip_vision checkpoint"):
    hf.load_tower(FIXTURES / "tiny_clip", tower, {})
  with pytest.raises(ConfigError, match="cannot load a checkpoint of model_type 'vit'"):
    hf.load_tower(FIXTURES / "tiny_vit", CLIP_TEXT, {})


ROUND_TRIP = {
  "vit": TINY_VIT,
  "clip_vision": CLIP_VISION,
  "clip_text": CLIP_TEXT,
  "dinov2": DINOV2,
  "dinov2_registers": {**DINOV2, "num_registers": 4},
  "llama": LLAMA,
  "deit": {**TINY_VIT, "distillation_token": True},
  "siglip_vision": SIGLIP_VISION,
  "siglip_text": SIGLIP_TEXT,
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIP))
def test_export_round_trip_of_each_family(tmp_path, name):
  tower = ROUND_TRIP[name]
  size = tower.get("image_size", 0)
  inputs = (
    (np.zeros((1, size, size, 3), np.float32),)
    if tower["kind"] == "vit"
    else (np.zeros((1, 5), np.int32), np.ones((1, 5), np.int32))
  )
  from vlalign.models import build_tower  # noqa: PLC0415

  params = build_tower(tower, "test").init(jax.random.key(1), *inputs)["params"]
  out = hf.export_tower(params, tower, tmp_path)
  loaded = hf.load_tower(out, tower, _tower_abstract(tower, *inputs))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded), strict=True):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_real_minilm_matches_sentence_transformers_reference():
  ref = np.load(FIXTURES / "minilm_reference.npz")
  tower = lit.minilm_tower()
  tok = tk.JsonTokenizer(_minilm_dir())
  ids, mask = tok.encode_batch([str(c) for c in ref["captions"]], ref["ids"].shape[1])
  np.testing.assert_array_equal(ids, ref["ids"])
  np.testing.assert_array_equal(mask, ref["mask"])
  params = hf.load_tower(_minilm_dir(), tower, _abstract(tower, ids.shape[1]))
  out = _bert(tower).apply({"params": params}, ids, mask)
  real = mask[..., None] > 0
  np.testing.assert_allclose(
    np.where(real, out["tokens"], 0), np.where(real, ref["last_hidden_state"], 0), atol=1e-5
  )
  emb = out["cls"] / np.linalg.norm(out["cls"], axis=-1, keepdims=True)
  np.testing.assert_allclose(emb, ref["embedding"], atol=1e-6)
  assert np.abs(emb @ emb.T - ref["embedding"] @ ref["embedding"].T).max() < 1e-6


def test_bert_tokenizer_matches_transformers_on_varied_strings():
  ref = json.loads((FIXTURES / "bert_tokenizer_reference.json").read_text())
  assert len(ref["texts"]) >= 300
  tok = tk.JsonTokenizer(_minilm_dir())
  ids, mask = tok.encode_batch(ref["texts"], ref["max_len"])
  for i, text in enumerate(ref["texts"]):
    assert ids[i].tolist() == ref["ids"][i], text
    assert mask[i].tolist() == ref["mask"][i], text
  single = np.stack([tok.encode(t, ref["max_len"])[0] for t in ref["texts"][:20]])
  np.testing.assert_array_equal(single, ids[:20])
  truncated = [i for i, m in enumerate(ref["mask"]) if m[-1] == 1]
  assert len(truncated) > 10  # long texts cut at max_len with [SEP] kept last


def test_special_ids_come_from_the_tokenizer_files():
  ref = json.loads((FIXTURES / "bert_tokenizer_reference.json").read_text())
  tok = tk.JsonTokenizer(_minilm_dir() / "tokenizer.json")
  empty = ref["texts"].index("")
  cls, sep, pad = ref["ids"][empty][:3]
  assert (tok.cls_id, tok.eos_id, tok.pad_id) == (cls, sep, pad)
  vocab = (_minilm_dir() / "vocab.txt").read_text().splitlines()
  assert (vocab[tok.mask_id], vocab[tok.unk_id]) == ("[MASK]", "[UNK]")
  assert tok.vocab_size == len(vocab)
  assert tok.decode(tok.encode("A Red circle!", 12)[0]) == "a red circle!"


def test_tokenizer_without_a_mask_token_is_refused_by_mlm(tmp_path):
  data = json.loads((_minilm_dir() / "tokenizer.json").read_text())
  data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "[MASK]"]
  del data["model"]["vocab"]["[MASK]"]
  (tmp_path / "tokenizer.json").write_text(json.dumps(data))
  tok = tk.JsonTokenizer(tmp_path)
  assert tok.mask_id == -1
  from configs import albef  # noqa: PLC0415
  from vlalign.methods import build_method  # noqa: PLC0415
  from vlalign.models import build_model  # noqa: PLC0415

  config = albef.get_config("tiny")
  with pytest.raises(ConfigError, match="mask token"):
    build_method(config, build_model(config.model), tok)


def test_export_then_import_is_bit_identical(tmp_path):
  tower = TINY_TOWER
  params = _bert(tower).init(jax.random.key(3), np.zeros((1, 5), np.int32), np.ones((1, 5)))
  out = hf.export_tower(params["params"], tower, tmp_path / "export")
  config = json.loads((out / "config.json").read_text())
  assert (config["model_type"], config["hidden_size"], config["num_hidden_layers"]) == (
    "bert",
    32,
    2,
  )
  loaded = hf.load_tower(out, tower, _abstract(tower))
  for (name, a), b in zip(
    pytrees.named_leaves(params["params"]).items(), jax.tree.leaves(loaded), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
  # The exported names and shapes are those transformers wrote for the same architecture.
  ours = {k: v.shape for k, v in load_file(str(out / "model.safetensors")).items()}
  theirs = {k: v.shape for k, v in load_file(str(TINY / "model.safetensors")).items()}
  assert ours == {k: v for k, v in theirs.items() if "position_ids" not in k}


def test_import_loads_straight_into_the_target_shardings():
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))

  def place(leaf):
    spec = P("fsdp") if leaf.shape and leaf.shape[0] % 8 == 0 else P()
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, spec))

  abstract = jax.tree.map(place, _abstract(TINY_TOWER))
  sharded = hf.load_tower(TINY, TINY_TOWER, abstract)
  plain = hf.load_tower(TINY, TINY_TOWER, _abstract(TINY_TOWER))
  table = sharded["position_embed"]["embedding"]  # [40, 32]
  assert table.sharding.spec == P("fsdp")
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(plain), strict=True):
    np.testing.assert_array_equal(np.asarray(a), b)
  kernel = sharded["block_0"]["mlp"]["fc1"]["kernel"]  # [32, 37]: rows split over 8 devices
  assert {s.data.shape for s in kernel.addressable_shards} == {(4, 37)}


def _copy_with(tmp_path, change):
  """A copy of the tiny checkpoint with `change(tensors)` applied to its tensors."""
  target = tmp_path / "ckpt"
  shutil.copytree(TINY, target)
  tensors = load_file(str(TINY / "model.safetensors"))
  change(tensors)
  save_file(tensors, str(target / "model.safetensors"))
  return target


def test_missing_tensor_is_named(tmp_path):
  name = "encoder.layer.1.output.dense.weight"
  path = _copy_with(tmp_path, lambda t: t.pop(name))
  with pytest.raises(ConfigError, match=f"missing tensors: \\['{name}'\\]"):
    hf.load_tower(path, TINY_TOWER, _abstract(TINY_TOWER))


def test_wrong_shape_is_named(tmp_path):
  name = "encoder.layer.0.intermediate.dense.weight"
  path = _copy_with(tmp_path, lambda t: t.update({name: np.zeros((36, 32), np.float32)}))
  with pytest.raises(ConfigError, match=f"tensor {name} has shape \\(36, 32\\)"):
    hf.load_tower(path, TINY_TOWER, _abstract(TINY_TOWER))


def test_unexpected_tensor_is_named(tmp_path):
  path = _copy_with(tmp_path, lambda t: t.update({"encoder.layer.2.extra": np.zeros(3)}))
  with pytest.raises(ConfigError, match="unexpected tensors: \\['encoder.layer.2.extra'\\]"):
    hf.load_tower(path, TINY_TOWER, _abstract(TINY_TOWER))


def test_architecture_mismatch_names_every_field(tmp_path):
  tower = {**TINY_TOWER, "depth": 3, "layer_norm_eps": 1e-5}
  with pytest.raises(ConfigError, match="depth=3 but num_hidden_layers=2.*layer_norm_eps"):
    hf.load_tower(TINY, tower, _abstract(tower))
  path = tmp_path / "relu"
  shutil.copytree(TINY, path)
  config = json.loads((path / "config.json").read_text())
  (path / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
  with pytest.raises(ConfigError, match="hidden_act='relu': only 'gelu'"):
    hf.load_tower(path, TINY_TOWER, _abstract(TINY_TOWER))


def test_sharded_checkpoint_with_index(tmp_path):
  tensors = load_file(str(TINY / "model.safetensors"))
  names = sorted(tensors)
  target = tmp_path / "sharded"
  target.mkdir()
  shutil.copy(TINY / "config.json", target)
  weight_map = {}
  for part, chunk in enumerate((names[::2], names[1::2])):
    file = f"model-0000{part + 1}-of-00002.safetensors"
    save_file({n: tensors[n] for n in chunk}, str(target / file))
    weight_map.update({n: file for n in chunk})
  (target / hf.INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
  a = hf.load_tower(target, TINY_TOWER, _abstract(TINY_TOWER))
  b = hf.load_tower(TINY, TINY_TOWER, _abstract(TINY_TOWER))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_locations_that_do_not_exist_are_named(tmp_path):
  with pytest.raises(PathError, match="not installed"):
    hf.resolve_location("pip:no_such_weights_pkg/model", "init.path")
  with pytest.raises(PathError, match="does not exist"):
    hf.resolve_location(str(tmp_path / "nowhere"), "init.path")
  with pytest.raises(PathError, match="no config.json"):
    hf.load_tower(tmp_path, TINY_TOWER, _abstract(TINY_TOWER))
  config = lit.get_config("tiny")
  config.data.tokenizer_path = str(tmp_path / "missing_tokenizer")
  with pytest.raises(PathError, match="missing_tokenizer"):
    trainer.build(config)


def test_lit_tiny_trains_with_the_pretrained_text_tower_frozen(tmp_path):
  config = lit.get_config("tiny")
  config.total_steps = 3
  config.checkpoint_every = 3
  config.evals = {}
  trainer.train_and_evaluate(config, str(tmp_path))
  setup = trainer.build(config)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), create=False)
  params = jax.device_get(ckpt.restore(3, setup.abstract_state).params)
  ckpt.close()
  pretrained = hf.load_tower(
    _minilm_dir(), config.model.text.to_dict(), _abstract(lit.minilm_tower())
  )
  text = params["params"]["text_encoder"]
  for (name, a), b in zip(
    pytrees.named_leaves(text).items(), jax.tree.leaves(pretrained), strict=True
  ):
    np.testing.assert_array_equal(a, b, err_msg=name)
  fresh = jax.device_get(setup.init_params(jax.random.PRNGKey(config.seed)))["params"]
  assert not np.array_equal(
    fresh["image_encoder"]["patch_embed"]["kernel"],
    params["params"]["image_encoder"]["patch_embed"]["kernel"],
  )
  assert not np.array_equal(
    fresh["text_proj"]["out"]["kernel"], params["params"]["text_proj"]["out"]["kernel"]
  )
  # The export command writes the trained tower (and the tokenizer) in the Hugging Face layout.
  from vlalign import export  # noqa: PLC0415

  step, out = export.export(config, str(tmp_path), "text", str(tmp_path / "exported"))
  assert step == 3
  assert (out / "tokenizer.json").exists() and (out / "vocab.txt").exists()
  again = hf.load_tower(out, config.model.text.to_dict(), _abstract(lit.minilm_tower()))
  for a, b in zip(jax.tree.leaves(text), jax.tree.leaves(again), strict=True):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(WorkdirError, match="already holds a checkpoint"):
    export.export(config, str(tmp_path), "text", str(tmp_path / "exported"))


def test_sentencepiece_tokenizer_matches_the_reference_and_lays_out_like_llama():
  ref = json.loads((FIXTURES / "spm_tokenizer_reference.json").read_text())
  tok = tk.SentencePieceTokenizer(FIXTURES / "tiny_spm")  # finds tokenizer.model in the directory
  assert (tok.cls_id, tok.eos_id) == (ref["bos_id"], ref["eos_id"])
  assert ref["pad_id"] == -1 and tok.pad_id == tok.eos_id  # no pad piece: pad with the end piece
  assert tok.mask_id == -1
  max_len = 16
  ids, mask = tok.encode_batch(ref["texts"], max_len)
  for row, (text, pieces) in enumerate(zip(ref["texts"], ref["ids"], strict=True)):
    assert tok.token_ids(text) == pieces, text
    body = pieces[: max_len - 2]  # plain-loop layout: [BOS] pieces [EOS] [PAD]...
    expected = [ref["bos_id"], *body, ref["eos_id"]]
    expected += [tok.pad_id] * (max_len - len(expected))
    assert ids[row].tolist() == expected, text
    assert mask[row].tolist() == [1] * (len(body) + 2) + [0] * (max_len - len(body) - 2)
  assert tok.decode(tok.encode("a red circle", max_len)[0]) == "a red circle"


def test_layout_without_a_begin_token():
  ids, mask = tk.layout([7, 8, 9], 4, None, 2, 0)
  assert ids.tolist() == [7, 8, 9, 2] and mask.tolist() == [1, 1, 1, 1]
  ids, mask = tk.layout([7, 8, 9, 10], 4, None, 2, 0)
  assert ids.tolist() == [7, 8, 9, 2]
  ids, mask = tk.layout([7], 4, None, 2, 0)
  assert ids.tolist() == [7, 2, 0, 0] and mask.tolist() == [1, 1, 0, 0]


def test_sentencepiece_tokenizer_from_config(tmp_path):
  import ml_collections  # noqa: PLC0415

  config = ml_collections.ConfigDict(
    dict(tokenizer="sentencepiece", tokenizer_path=str(FIXTURES / "tiny_spm" / "tokenizer.model"))
  )
  assert isinstance(tk.build_tokenizer(config), tk.SentencePieceTokenizer)
  config.tokenizer_path = str(tmp_path)
  with pytest.raises(PathError, match="no SentencePiece model"):
    tk.build_tokenizer(config)


def test_lower_bert_layers_as_a_shallower_text_encoder():
  ref = np.load(TINY / "reference.npz")
  tower = {**TINY_TOWER, "depth": 1, "pool": "first"}
  params = hf.load_tower(TINY, tower, _abstract(tower), layers=(0, 1))
  out = _bert(tower).apply({"params": params}, ref["ids"], ref["mask"])
  np.testing.assert_allclose(out["tokens"], ref["hidden_states"][1], atol=1e-5, rtol=0)
  with pytest.raises(ConfigError, match="depth=1 but num_hidden_layers=2"):
    hf.load_tower(TINY, tower, _abstract(tower))  # all layers into one block: refused
  with pytest.raises(ConfigError, match="layers 1:3 are not within its 2 layers"):
    hf.load_tower(TINY, tower, _abstract(tower), layers=(1, 3))


def test_albef_minilm_starts_from_minilm_with_fresh_cross_attention():
  """Text encoder = MiniLM's first layers, fusion = the next ones (self-attention, MLP, LayerNorms)
  plus cross-attention at its random initialisation, as ALBEF builds its fusion encoder from BERT
  (the tiny config: one of each, so the fusion layer comes from stored layer 1)."""
  from configs import albef_minilm  # noqa: PLC0415

  config = albef_minilm.get_config("tiny")  # MiniLM layer 0 = text, layer 1 = fusion
  setup = trainer.build(config)
  params = jax.device_get(trainer.fresh_state(setup, jax.random.PRNGKey(0)).params)["params"]
  fresh = jax.device_get(setup.init_params(jax.random.PRNGKey(0)))["params"]
  stored = load_file(str(_minilm_dir() / "model.safetensors"))
  text, fusion = params["text_encoder"], params["fusion"]
  depth = config.model.text.depth
  assert (depth, config.model.fusion_depth) == (1, 1)
  for i in range(depth):
    layer = f"encoder.layer.{i}"
    np.testing.assert_array_equal(
      text[f"block_{i}"]["mlp"]["fc1"]["kernel"], stored[f"{layer}.intermediate.dense.weight"].T
    )
    layer = f"encoder.layer.{depth + i}"
    block = fusion[f"block_{i}"]
    np.testing.assert_array_equal(
      block["self_attn"]["query"]["kernel"].reshape(384, 384),
      stored[f"{layer}.attention.self.query.weight"].T,
    )
    np.testing.assert_array_equal(
      block["ln_self"]["scale"], stored[f"{layer}.attention.output.LayerNorm.weight"]
    )
    np.testing.assert_array_equal(block["mlp"]["fc2"]["bias"], stored[f"{layer}.output.dense.bias"])
    np.testing.assert_array_equal(block["ln_mlp"]["bias"], stored[f"{layer}.output.LayerNorm.bias"])
    for name in ("cross_attn", "ln_cross"):
      for a, b in zip(
        jax.tree.leaves(block[name]),
        jax.tree.leaves(fresh["fusion"][f"block_{i}"][name]),
        strict=True,
      ):  # the same draws; the two programs may round `0.02 * normal` 1 ulp apart
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    kernel = block["cross_attn"]["key"]["kernel"]  # BERT's start (`BertModel.init_weights`)
    assert abs(kernel.std() / 0.02 - 1) < 0.1
  np.testing.assert_array_equal(
    text["token_embed"]["embedding"], stored["embeddings.word_embeddings.weight"]
  )


@pytest.mark.parametrize(
  "directory,tower",
  [("tiny_vit", TINY_VIT), ("tiny_clip", CLIP_VISION), ("tiny_siglip", SIGLIP_VISION)],
)
def test_position_grid_resized_for_another_image_size(directory, tower):
  """A 32 px checkpoint (4x4 grid) loads into a 48 px tower (6x6): the grid is interpolated as the
  tower would interpolate it at run time, the CLS position is kept."""
  bigger = {**tower, "image_size": 48}
  images = np.zeros((1, 48, 48, 3), np.float32)
  params = hf.load_tower(FIXTURES / directory, bigger, _tower_abstract(bigger, images))
  native = hf.load_tower(FIXTURES / directory, tower, _tower_abstract(tower, images[:, :32, :32]))
  a = np.asarray(_tower_apply(bigger, params, images)["cls"])
  b = np.asarray(_tower_apply(tower, native, images)["cls"])  # resized at run time instead
  np.testing.assert_allclose(a, b, atol=1e-5)
  if tower.get("cls_pos_embed"):
    np.testing.assert_array_equal(params["pos_embedding"][0], native["pos_embedding"][0])


def test_clip_finetune_entries_load_towers_projections_and_temperature(tmp_path):
  """The `finetune` config's init entries pointed at the tiny CLIP checkpoint: every parameter of
  the model comes from it, and the run trains from there."""
  from configs import clip  # noqa: PLC0415

  config = clip.get_config("tiny")
  config.model.image.update({k: v for k, v in CLIP_VISION.items() if k != "kind"})
  config.model.text.update({k: v for k, v in CLIP_TEXT.items() if k != "kind"})
  config.model.embed_dim = 24
  config.data.max_len = 16
  config = clip.finetune_from(config, str(FIXTURES / "tiny_clip"))
  config.data.tokenizer = "shapes_words"  # the tiny checkpoint has no tokenizer; 60 ids <= 99
  config.total_steps, config.checkpoint_every, config.evals = 2, 2, {}
  setup = trainer.build(config)
  params = jax.device_get(trainer.fresh_state(setup, jax.random.PRNGKey(0)).params)["params"]
  stored = load_file(str(FIXTURES / "tiny_clip" / "model.safetensors"))
  np.testing.assert_array_equal(
    params["image_proj"]["out"]["kernel"], stored["visual_projection.weight"].T
  )
  np.testing.assert_array_equal(
    params["text_proj"]["out"]["kernel"], stored["text_projection.weight"].T
  )
  np.testing.assert_array_equal(params["logit_scale"], stored["logit_scale"].reshape(()))
  np.testing.assert_array_equal(
    params["image_encoder"]["cls"].reshape(-1), stored["vision_model.embeddings.class_embedding"]
  )
  final = trainer.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(final["train/loss"])


def test_clip_bpe_tokenizer_matches_transformers_and_lays_out_like_clip():
  """CLIP's byte-level BPE (its first 3,000 merges) as Hugging Face saves it: the same ids as
  transformers' `CLIPTokenizer` on 300 varied strings, `<|startoftext|>` first and
  `<|endoftext|>` last. OpenAI's own tokenizer (open_clip `SimpleTokenizer`) cleans the text with
  ftfy first; the strings where its ids differ are counted, not hidden."""
  ref = json.loads((FIXTURES / "clip_tokenizer_reference.json").read_text())
  tok = tk.JsonTokenizer(FIXTURES / "tiny_clip_tokenizer")
  assert (tok.cls_id, tok.eos_id, tok.pad_id) == (ref["bos_id"], ref["eos_id"], ref["pad_id"])
  ids, mask = tok.encode_batch(ref["texts"], 16)
  for row, (text, expected) in enumerate(zip(ref["texts"], ref["hf_ids"], strict=True)):
    assert tok.token_ids(text) == expected, text
    body = expected[:14]
    assert ids[row].tolist() == [tok.cls_id, *body, tok.eos_id] + [tok.pad_id] * (14 - len(body))
    assert mask[row].sum() == len(body) + 2
  differ = [t for t, a, b in zip(ref["texts"], ref["hf_ids"], ref["open_clip_ids"]) if a != b]
  assert len(differ) == 44  # fullwidth letters, emoji, CJK, newlines (docs/methods.md)
  assert all(any(ord(c) > 0x2000 or c == "\n" for c in t) for t in differ)


# --- Scanned towers (`model.scan_layers`): the same stored tensors, blocks stacked. ---


def _inputs_of(tower):
  size = tower.get("image_size", 0)
  if tower["kind"] == "vit":
    return (np.zeros((1, size, size, 3), np.float32),)
  return np.zeros((1, 5), np.int32), np.ones((1, 5), np.int32)


def _scanned_abstract(tower, *inputs):
  from vlalign.models import build_tower  # noqa: PLC0415

  scanned = build_tower(tower, "test", scan_layers=True)
  return jax.eval_shape(scanned.init, jax.random.key(0), *inputs)["params"]


@pytest.mark.parametrize("name", sorted(ROUND_TRIP))
def test_scanned_tower_imports_and_exports_the_unrolled_towers_tensors(tmp_path, name):
  """A scanned tower loads a checkpoint into stacked blocks (layer i at index i) and writes back
  exactly the files the unrolled tower writes."""
  from vlalign.models import build_tower, scan  # noqa: PLC0415

  tower = ROUND_TRIP[name]
  inputs = _inputs_of(tower)
  params = build_tower(tower, "test").init(jax.random.key(1), *inputs)["params"]
  unrolled_dir = hf.export_tower(params, tower, tmp_path / "unrolled")
  loaded = hf.load_tower(unrolled_dir, tower, _scanned_abstract(tower, *inputs))
  assert scan.has_stacked_layers(loaded)
  expected = scan.stack_layers(params)
  assert jax.tree.structure(loaded) == jax.tree.structure(expected)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), loaded, expected)
  scanned_dir = hf.export_tower(loaded, tower, tmp_path / "scanned")
  written = load_file(str(scanned_dir / hf.WEIGHTS_FILE))
  reference = load_file(str(unrolled_dir / hf.WEIGHTS_FILE))
  assert written.keys() == reference.keys()
  for key, value in reference.items():
    np.testing.assert_array_equal(written[key], value, err_msg=key)
  assert (scanned_dir / "config.json").read_text() == (unrolled_dir / "config.json").read_text()


def test_scanned_bert_matches_transformers_whole_and_sliced():
  ref = np.load(TINY / "reference.npz")
  from vlalign.models import build_tower  # noqa: PLC0415

  for layers, tower, expected in (
    (None, TINY_TOWER, ref["last_hidden_state"]),
    ((0, 1), {**TINY_TOWER, "depth": 1, "pool": "first"}, ref["hidden_states"][1]),
  ):
    abstract = _scanned_abstract(tower, ref["ids"], ref["mask"])
    params = hf.load_tower(TINY, tower, abstract, layers=layers)
    scanned = build_tower(tower, "test", scan_layers=True)
    out = scanned.apply({"params": params}, ref["ids"], ref["mask"])
    np.testing.assert_allclose(out["tokens"], expected, atol=1e-5, rtol=0)


def test_scanned_fusion_loads_the_upper_layers_and_leaves_cross_attention_fresh():
  """`tower="fusion"`, `layers="1:2"` into a scanned post-LN fusion encoder: self-attention, MLP
  and LayerNorms from stored layer 1 (as the unrolled encoder's `block_0`), cross-attention None
  (the loader's "keep the fresh value")."""
  import ml_collections  # noqa: PLC0415

  from vlalign.models import fusion, scan  # noqa: PLC0415

  model = ml_collections.ConfigDict(
    dict(fusion_style="post_ln", fusion_depth=1, text=dict(TINY_TOWER))
  )
  tower = hf.fusion_tower(model)
  inputs = (np.zeros((2, 5, 32), np.float32), np.ones((2, 5), np.int32))
  image = np.zeros((2, 3, 32), np.float32)

  def abstract(scanned):
    module = fusion.FusionEncoder(
      depth=1, num_heads=4, mlp_dim=37, style="post_ln", scan_layers=scanned
    )
    return jax.eval_shape(module.init, jax.random.key(0), *inputs, image)["params"]

  unrolled = hf.load_tower(TINY, tower, abstract(False), "model.fusion", layers=(1, 2))
  stacked = hf.load_tower(TINY, tower, abstract(True), "model.fusion", layers=(1, 2))
  block = stacked[scan.STACKED]
  assert all(v is None for v in jax.tree.leaves(block["cross_attn"], is_leaf=lambda x: x is None))
  stored = load_file(str(TINY / "model.safetensors"))
  np.testing.assert_array_equal(
    block["mlp"]["fc1"]["kernel"][0], stored["encoder.layer.1.intermediate.dense.weight"].T
  )
  expected = scan.stack_layers(unrolled)
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(a, b), stacked, expected, is_leaf=lambda x: x is None
  )


def test_albef_minilm_init_under_scan_layers_loads_every_layer_stacked():
  """`config.init` (MiniLM layer 0 -> text encoder, layer 1 -> fusion) with `model.scan_layers`:
  every loaded parameter is what the unrolled towers load, stacked; cross-attention keeps its
  fresh value."""
  from configs import albef_minilm  # noqa: PLC0415
  from vlalign.models import build_tower, fusion, scan  # noqa: PLC0415

  config = albef_minilm.get_config("tiny")
  config.model.scan_layers = True
  setup = trainer.build(config)
  params = jax.device_get(trainer.fresh_state(setup, jax.random.PRNGKey(0)).params)["params"]
  fresh = jax.device_get(setup.init_params(jax.random.PRNGKey(0)))["params"]
  assert all(
    scan.has_stacked_layers(params[k]) for k in ("image_encoder", "text_encoder", "fusion")
  )
  # What the unrolled towers load from the same entries.
  text_tower = config.model.text.to_dict()
  ids = np.zeros((2, 8), np.int32)
  unrolled_text = jax.eval_shape(
    build_tower(text_tower, "test").init, jax.random.key(0), ids, np.ones_like(ids)
  )["params"]
  text = hf.load_tower(_minilm_dir(), text_tower, unrolled_text, "model.text", layers=(0, 1))
  jax.tree.map(np.testing.assert_array_equal, params["text_encoder"], scan.stack_layers(text))
  width = text_tower["width"]
  module = fusion.FusionEncoder(
    depth=1, num_heads=text_tower["num_heads"], mlp_dim=text_tower["mlp_dim"], style="post_ln"
  )
  tokens = np.zeros((2, 8, width), np.float32)
  image = np.zeros((2, 3, config.model.image.width), np.float32)
  unrolled_fusion = jax.eval_shape(
    module.init, jax.random.key(0), tokens, np.ones((2, 8), np.int32), image
  )["params"]
  loaded = hf.load_tower(
    _minilm_dir(), hf.fusion_tower(config.model), unrolled_fusion, "model.fusion", layers=(1, 2)
  )
  block = params["fusion"][scan.STACKED]
  for name, value in scan.stack_layers(loaded)[scan.STACKED].items():
    if name in ("cross_attn", "ln_cross"):  # not in the checkpoint: the fresh (scanned) values,
      # drawn by another compiled program than `fresh`'s (equal up to a float rounding).
      fresh_value = fresh["fusion"][scan.STACKED][name]
      jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        block[name],
        fresh_value,
      )
    else:
      jax.tree.map(np.testing.assert_array_equal, block[name], value)
