"""LexVLA: sparsity regularisers against loop references, the lexical model, the method's frozen
sub-trees, the prompt tokenizer, and a few training steps through the real binary."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlalign import losses, testing
from vlalign.data import tokenizer as tokenizer_lib
from vlalign.errors import ConfigError
from vlalign.losses import lexical

# --- Regularisers ---------------------------------------------------------------------------------


def _ref_flops(lex: np.ndarray) -> float:
  total = 0.0
  for j in range(lex.shape[1]):
    mean = sum(lex[i, j] for i in range(lex.shape[0])) / lex.shape[0]
    total += mean * mean
  return total


def _ref_overuse(lex: np.ndarray) -> float:
  """Eq. 7 in its second form: N V sum_j (sum_i s_ij / N)^3 / sum_ij s_ij."""
  n, v = lex.shape
  cubes = sum((sum(lex[i, j] for i in range(n)) / n) ** 3 for j in range(v))
  return n * v * cubes / float(np.sum(lex))


def _unit_rows(rng, n=12, v=20) -> np.ndarray:
  x = np.exp(rng.normal(size=(n, v))).astype(np.float32)
  x[:, 3] *= 6.0  # one word that fires on everything
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_flops_and_overuse_match_loop_references():
  lex = _unit_rows(np.random.default_rng(0))
  np.testing.assert_allclose(lexical.flops_penalty(jnp.asarray(lex)), _ref_flops(lex), rtol=1e-5)
  np.testing.assert_allclose(
    lexical.overuse_penalty(jnp.asarray(lex)), _ref_overuse(lex), rtol=1e-5
  )


def test_overuse_penalises_a_frequent_word_more_than_flops_does():
  """Moving mass onto one word shared by every row raises the overuse penalty relative to FLOPs:
  the overuse term of a word grows with the cube of its mean, FLOPs' with the square."""
  rng = np.random.default_rng(1)
  spread = _unit_rows(rng)
  spread[:, 3] = spread[:, 4]
  peaked = spread.copy()
  peaked[:, 3] *= 10.0
  peaked /= np.linalg.norm(peaked, axis=1, keepdims=True)
  ratio = lambda x: float(lexical.overuse_penalty(x)) / float(lexical.flops_penalty(x))
  assert ratio(jnp.asarray(peaked)) > 3 * ratio(jnp.asarray(spread))


def test_uniform_vectors_give_overuse_equal_to_v_times_flops_share():
  """For equal means s_j = s: overuse = V * sum_j (1/V) s^2 = V s^2 = FLOPs."""
  lex = jnp.full((4, 10), 1 / math.sqrt(10))
  np.testing.assert_allclose(lexical.overuse_penalty(lex), lexical.flops_penalty(lex), rtol=1e-6)


@pytest.mark.parametrize("name", ["flops", "overuse"])
def test_regulariser_registry_entries_and_metrics(name):
  lex = _unit_rows(np.random.default_rng(2))
  fn = losses.get(name)
  value, metrics = fn({"img/lex": jnp.asarray(lex)}, losses.context(), modality="img")
  ref = _ref_flops(lex) if name == "flops" else _ref_overuse(lex)
  np.testing.assert_allclose(value, ref, rtol=1e-5)
  threshold = 1 / math.sqrt(lex.shape[1])
  np.testing.assert_allclose(metrics["active"], np.mean(np.sum(lex > threshold, axis=1)))
  mean = lex.mean(axis=0)
  np.testing.assert_allclose(metrics["max_share"], mean.max() / mean.sum(), rtol=1e-5)
  with pytest.raises(ConfigError, match="modality"):
    fn({"img/lex": jnp.asarray(lex)}, losses.context(), modality="audio")
  with pytest.raises(ConfigError, match="txt/lex"):
    fn({"img/lex": jnp.asarray(lex)}, losses.context(), modality="txt")


@pytest.mark.parametrize("name", ["flops", "overuse"])
def test_regularisers_on_8_devices_equal_one(name):
  lex = jnp.asarray(_unit_rows(np.random.default_rng(3), n=16))
  fn = losses.get(name)

  def value_and_grad(x):
    return jax.value_and_grad(lambda y: fn({"txt/lex": y}, losses.context(), modality="txt")[0])(x)

  (value8, grad8), (value1, grad1) = testing.run_sharded_and_single(value_and_grad, lex)
  np.testing.assert_allclose(value8, value1, rtol=1e-6)
  np.testing.assert_allclose(grad8, grad1, rtol=1e-5, atol=1e-9)


# --- Prompt tokenizer -----------------------------------------------------------------------------


def test_prompt_template_keeps_the_prompt_and_cuts_the_text():
  base = tokenizer_lib.WordTokenizer(["red", "circle", "focus", "of", "words", "a"])
  prompted = tokenizer_lib.PromptTokenizer(base, 'the focus of "{}" words :')
  ids, mask = prompted.encode("a red circle", 16)
  expected = [base.cls_id, *base.token_ids('the focus of "a red circle" words :'), base.eos_id]
  assert ids[: len(expected)].tolist() == expected
  assert mask.sum() == len(expected)
  ids, mask = prompted.encode("a red circle " * 10, 12)  # too long: the caption is cut
  assert ids[-1] == base.eos_id and mask.all()
  assert ids[-3:-1].tolist() == base.token_ids("words :")
  assert ids[1:5].tolist() == base.token_ids('the focus of "')
  with pytest.raises(ConfigError, match="no room"):
    prompted.encode("red", 8)
  with pytest.raises(ConfigError, match="exactly once"):
    tokenizer_lib.PromptTokenizer(base, "no slot")


def test_data_text_template_builds_a_prompt_tokenizer():
  from configs import lexvla  # noqa: PLC0415

  tok = tokenizer_lib.build_tokenizer(lexvla.get_config("tiny").data)
  assert isinstance(tok, tokenizer_lib.PromptTokenizer)
  ids, _ = tok.encode_batch(["a red circle", "two blue stars"], 32)
  assert ids.shape == (2, 32)


# --- Model and method -----------------------------------------------------------------------------


def _tiny_setup(**overrides):
  from configs import lexvla  # noqa: PLC0415
  from vlalign import trainer  # noqa: PLC0415

  config = lexvla.get_config("tiny")
  config.evals = {}
  for key, value in overrides.items():
    config.model[key] = value
  return trainer.build(config)


def _params_at(params, path: str):
  node = params["params"]
  for key in path.split("/"):
    node = node[key]
  return np.asarray(jax.device_get(node))


def test_lexical_vectors_follow_the_equations():
  """img/lex = normalize(max_patches elu1p(z Z_v^T)), unit rows, Z_v = Z_t at initialisation; the
  text codebook is the output head's rows of the lexicon."""
  setup = _tiny_setup(lexicon_ids=(5, 9, 11, 40, 77, 100))
  state = jax.device_get(trainer_fresh(setup))
  batch = testing.synthetic_batch(setup.spec, 0)
  out = jax.jit(setup.model.apply)(state.params, batch)
  patch = np.asarray(out["img/patch_lex"])
  assert patch.shape[-1] == 6 and (patch > 0).all()  # elu1p is strictly positive
  pooled = patch.max(axis=1)
  np.testing.assert_allclose(
    out["img/lex"], pooled / np.linalg.norm(pooled, axis=1, keepdims=True), rtol=1e-5
  )
  np.testing.assert_allclose(np.linalg.norm(out["txt/lex"], axis=1), 1.0, rtol=1e-5)
  head = _params_at(state.params, "text_encoder/lm_head")
  model_cls = type(setup.model)
  text_cb = setup.model.apply(state.params, method=model_cls.text_codebook)
  np.testing.assert_array_equal(text_cb, head[[5, 9, 11, 40, 77, 100]])
  np.testing.assert_array_equal(
    setup.model.apply(state.params, method=model_cls.visual_codebook), text_cb
  )


def trainer_fresh(setup):
  from vlalign import trainer  # noqa: PLC0415

  return trainer.fresh_state(setup, jax.random.PRNGKey(0))


def test_step_trains_lora_adapter_mapper_and_visual_codebook_only():
  """After two steps the frozen weights (image tower, every text weight but LoRA's, hence the text
  codebook) are bit-identical, while the adapters, the visual codebook and the mapper move."""
  setup = _tiny_setup()
  state = trainer_fresh(setup)
  before = jax.device_get(state.params)
  batch = testing.synthetic_batch(setup.spec, 1)
  step = jax.jit(setup.step_fn)
  state, _ = step(state, batch)  # step 0 has lr 0 (warm-up)
  state, metrics = step(state, batch)
  after = jax.device_get(state.params)
  flat_before = dict(jax.tree_util.tree_flatten_with_path(before)[0])
  flat_after = dict(jax.tree_util.tree_flatten_with_path(after)[0])
  moved, frozen = set(), set()
  for path, value in flat_before.items():
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if np.array_equal(value, flat_after[path]):
      frozen.add(name)
    else:
      moved.add(name)
  for name in frozen | moved:
    trainable = "_lora/" in name or not name.startswith(
      ("params/image_encoder", "params/text_encoder")
    )
    if not trainable:
      assert name in frozen, name
  assert any("_lora/b" in n for n in moved)  # B starts at zero and moves
  assert "params/visual_codebook_delta" in moved
  assert any(n.startswith("params/adapter") for n in moved)
  assert any(n.startswith("params/image_mapper") for n in moved)
  assert "params/text_encoder/lm_head" in frozen  # the text codebook
  assert {"lexical/img_active", "lexical/txt_active", "overuse_img", "overuse_txt"} <= set(metrics)


def test_method_and_model_config_errors():
  from configs import lexvla  # noqa: PLC0415
  from vlalign import trainer  # noqa: PLC0415

  config = lexvla.get_config("tiny")
  config.model.text.lora = None
  with pytest.raises(ConfigError, match="model.text.lora"):
    trainer.build(config)
  config = lexvla.get_config("tiny")
  config.model.text.lm_head = False
  config.model.text_codebook = "output"
  with pytest.raises(ConfigError, match="output codebook"):
    trainer.build(config)
  config = lexvla.get_config("tiny")
  config.model.activation = "softplus"
  with pytest.raises(ConfigError, match="activation"):
    trainer.build(config)
  config = lexvla.get_config("tiny")
  config.model.name = "two_tower"
  with pytest.raises(ConfigError, match="lexvla"):
    trainer.build(config)


def test_run_is_explained_and_its_lora_text_tower_exports_merged(tmp_path):
  """A tiny run through the real trainer, then the user's commands on its workdir: `explain` writes
  the JSON and the heat-map PNG; `export --tower=text` writes a plain Llama checkpoint (with its
  output codebook) whose outputs equal the run's LoRA tower's."""
  import json  # noqa: PLC0415

  from PIL import Image  # noqa: PLC0415

  from configs import lexvla  # noqa: PLC0415
  from vlalign import checkpoint as ckpt_lib  # noqa: PLC0415
  from vlalign import explain, export, trainer  # noqa: PLC0415
  from vlalign.models import build_tower  # noqa: PLC0415
  from vlalign.weights import hf  # noqa: PLC0415

  config = lexvla.get_config("tiny")
  config.update(total_steps=3, checkpoint_every=3, evals={})
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(config, workdir)

  json_path, png_path = explain.explain(config, workdir, str(tmp_path / "explain"), index=2, topk=5)
  with open(json_path) as f:
    record = json.load(f)
  assert record["step"] == 3 and len(record["top_words"]) == 5
  assert len(record["patches"]) == record["grid"] ** 2 == 16
  with Image.open(png_path) as png:
    assert png.format == "PNG" and png.size[0] > config.data.image_size

  step, out = export.export(config, workdir, "text", str(tmp_path / "text"))
  assert step == 3 and "lora" not in json.loads((out / hf.CONFIG_FILE).read_text())
  setup = trainer.build(config)
  _, params = ckpt_lib.restore_run_params(workdir, setup.abstract_state.params)
  run_tower = config.model.text.to_dict()
  lora_b = _params_at(params, "text_encoder/block_0/attn/query_lora/b")
  assert np.abs(lora_b).max() > 0  # the adapters trained, so the merge matters
  plain = {k: v for k, v in run_tower.items() if k != "lora"}
  ids, mask = setup.tokenizer.encode_batch(["a red circle", "two blue stars left of a square"], 32)
  abstract = jax.eval_shape(
    lambda: build_tower(plain, "t").init(jax.random.PRNGKey(0), ids, mask)["params"]
  )
  merged = hf.load_tower(out, plain, abstract)
  got = build_tower(plain, "t").apply({"params": merged}, ids, mask)["cls"]
  want = build_tower(run_tower, "t").apply(
    {"params": jax.device_get(params["params"]["text_encoder"])}, ids, mask
  )["cls"]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(merged["lm_head"], _params_at(params, "text_encoder/lm_head"))
