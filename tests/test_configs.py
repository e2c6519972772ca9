"""Every config in configs/ instantiates; tiny and demo ones build; full ones build and lower."""

import importlib
import math
import os

import jax
import numpy as np
import pytest

from vlalign import trainer
from vlalign.errors import ConfigError, PathError

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
NOT_METHODS = ("__init__.py", "common.py")
METHOD_CONFIGS = sorted(
  f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and f not in NOT_METHODS
)


def _config(name, variant):
  return importlib.import_module(f"configs.{name}").get_config(variant)


def _offline(config):
  """`config` with a tokenizer that must be downloaded (`hf:...`, e.g. the full ALBEF/TCL configs'
  bert-base-uncased) replaced by the MiniLM WordPiece tokenizer that ships offline, which has the
  same 30,522 ids (a SentencePiece one, Llama 2's, by the small fixture model): building and
  lowering need the tokenizer, not the weights (`config.init` is read only when a run starts)."""
  from configs import lit  # noqa: PLC0415

  if str(config.data.get("tokenizer_path", "")).startswith("hf:"):
    if config.data.tokenizer == "sentencepiece":  # Llama 2's 32,000 ids > the fixture's
      assert config.model.text.vocab_size == 32_000
      config.data.tokenizer_path = os.path.join(FIXTURES, "tiny_spm", "tokenizer.model")
    else:
      assert config.model.text.vocab_size == 30_522
      config.data.tokenizer_path = lit.MINILM
  return config


def test_there_are_method_configs():
  assert {"clip", "siglip", "albef", "tcl", "codis"} <= set(METHOD_CONFIGS)


@pytest.mark.parametrize("name", METHOD_CONFIGS)
@pytest.mark.parametrize("variant", ["tiny", "demo"])  # full: built by the lowering test
def test_config_instantiates_and_builds(name, variant):
  config = _config(name, variant)
  assert config.name == f"{name}_{variant}"
  setup = trainer.build(config)  # validates; builds model, optimizer and abstract sharded state
  assert jax.tree.leaves(setup.abstract_state.params)


@pytest.mark.parametrize("name", METHOD_CONFIGS)
def test_full_config_builds_and_train_step_lowers(name):
  config = _offline(_config(name, "full"))
  assert config.name == f"{name}_full"
  lowered = trainer.lower_step(trainer.build(config, data=False))
  assert "func.func public @main" in lowered.as_text()


@pytest.mark.slow
def test_full_tcl_train_step_compiles():
  """The published ViT-B/16 + BERT-base (6 + 6) sizes with every ALBEF/TCL part (teacher, queues,
  fusion, ITM, MLM, the six contrastive terms) compile on the 8 simulated devices. A per-device
  batch of 2; the full batch changes array sizes, not the program. With the full config's scanned
  layers ~1-2 minutes of XLA CPU compilation on 2 cores (~3x that unrolled; docs/results.md), so
  it is marked slow: `python -m pytest -m slow tests`.
  `bench/compile_full.py` compiles every full config at its real batch."""
  config = _offline(_config("tcl", "full"))
  config.batch_size = 2 * jax.device_count()
  config.teacher.queue_size = 64 * config.batch_size
  compiled = trainer.lower_step(trainer.build(config, data=False)).compile()
  memory = trainer.log_memory_analysis(compiled)
  assert memory["argument_size_mib"] > 0


@pytest.mark.slow
def test_full_codis_train_step_compiles():
  """CODIS at the published sizes (ViT-B/16, BERT 6 + 6, 4,096 centres, queue 65,536: Sinkhorn over
  [batch | queue] x centres) compiles on the 8 simulated devices, 2 pairs per device."""
  config = _offline(_config("codis", "full"))
  config.batch_size = 2 * jax.device_count()
  config.teacher.queue_size = 64 * config.batch_size
  compiled = trainer.lower_step(trainer.build(config, data=False)).compile()
  assert trainer.log_memory_analysis(compiled)["argument_size_mib"] > 0


@pytest.mark.parametrize("name", METHOD_CONFIGS)
def test_tiny_config_trains_and_evaluates(name, tmp_path):
  config = _config(name, "tiny")
  config.total_steps = 3
  config.log_every = 1
  config.checkpoint_every = 3
  config.evals = {k: v for k, v in config.evals.items() if "test" in k}
  final = trainer.train_and_evaluate(config, str(tmp_path))
  assert all(math.isfinite(final[f"train/{loss}"]) for loss in config.losses)
  evals = {k for k in final if k.startswith("eval/")}
  for evaluator in config.evals:
    assert any(k.startswith(f"eval/{evaluator}/") for k in evals), evaluator


@pytest.mark.parametrize("name", ["albef", "tcl", "codis"])
def test_full_momentum_configs_name_the_published_weights(name):
  """They start from DeiT-B/16 and bert-base-uncased; offline, building stops with an error naming
  what could not be fetched, never training from a stand-in."""
  config = _config(name, "full")
  assert config.init.image.path == "hf:facebook/deit-base-patch16-224"
  assert (config.init.text.layers, config.init.fusion.layers) == ("0:6", "6:12")
  assert config.init.text.path == config.data.tokenizer_path == "hf:bert-base-uncased"
  with pytest.raises(PathError, match="bert-base-uncased"):
    trainer.build(config)


def test_unknown_variant_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown config variant"):
    _config("clip", "huge")


@pytest.mark.parametrize(
  "name,repo",
  [("clip", "openai/clip-vit-base-patch16"), ("siglip", "google/siglip-base-patch16-224")],
)
def test_finetune_configs_name_the_released_weights(name, repo):
  config = _config(name, "finetune")
  assert config.name == f"{name}_finetune"
  paths = {entry.path for entry in config.init.values()} | {config.data.tokenizer_path}
  assert paths == {f"hf:{repo}"}
  with pytest.raises(PathError, match=repo):
    trainer.build(config)


@pytest.fixture(scope="module")
def shapes_files(tmp_path_factory):
  """The embedded data written as ALBEF JSON + JPEG (the `_files` variants' layout)."""
  from vlalign.data import shapes_to_files  # noqa: PLC0415

  root = str(tmp_path_factory.mktemp("shapes_files"))
  shapes_to_files.write(root, "albef_json", {"train": 64, "val": 32, "test": 32}, image_size=32)
  return root


@pytest.mark.parametrize("name", METHOD_CONFIGS)
def test_files_variants_build_on_files_and_name_the_missing_path(name, shapes_files):
  """`<variant>_files` reads the exported embedded data from `data.paths.root`; without the path
  building stops naming the field to set. (Training through it: tests/test_files.py.)"""
  config = _config(name, "tiny_files")
  assert config.name == f"{name}_tiny_files" and config.data.name == "files"
  with pytest.raises(ConfigError, match="data.paths.root is not set"):
    trainer.build(config)
  config.data.paths.root = shapes_files
  config.batch_size = 16
  setup = trainer.build(config)
  assert jax.tree.leaves(setup.abstract_state.params)


@pytest.mark.parametrize("name", METHOD_CONFIGS)
def test_4m_variants_name_every_path_they_need(name, tmp_path):
  """`full_4m` trains on ALBEF's 4M mixture and tests on COCO and Flickr30k: unset paths and
  missing files stop the run with the field or file named, never a stand-in."""
  config = _offline(_config(name, "full_4m"))
  assert [s["image_root"] for s in config.data.train.mixture] == [
    "{coco}",
    "{vg}",
    "{cc3m}",
    "{cc3m}",
    "{sbu}",
  ]
  assert config.data.flickr_test.ann == "{ann}/flickr30k_test.json"
  assert any(e.split == "flickr_test" for e in config.evals.values())
  config.init = {}  # the published weights are checked by the tests above
  with pytest.raises(ConfigError, match="data.paths.ann is not set"):
    trainer.build(config)
  config.data.paths.update({k: str(tmp_path) for k in config.data.paths})
  with pytest.raises(PathError, match="coco.json does not exist"):
    trainer.build(config)


# --- ALBEF / TCL as published (configs/albef.py: published_recipe) -----------------------------

# The official files' values (Pretrain.yaml, Retrieval_{coco,flickr}.yaml, Pretrain.py, Retrieval.py
# of salesforce/ALBEF and uta-smile/TCL) and where each lives here; docs/methods.md has the table.
OFFICIAL = {
  "published": {
    "batch_size": 8 * 64,
    "loss_group_size": 64,
    "model.image.image_size": 256,
    "model.embed_dim": 256,
    "teacher.queue_size": 65_536,
    "teacher.momentum": 0.995,
    "teacher.alpha": 0.4,
    "mlm.prob": 0.15,
    "optim.lr": 1e-4,
    "optim.weight_decay": 0.02,
    "optim.warmup_lr": 1e-5,
    "optim.warmup_intervals": 20,
    "optim.warmup_interval_steps": 100,
    "data.max_len": 25,
    "data.eval_max_len": 30,
    "model.temperature": "tau",
    "model.dtype": "float32",
  },
  "coco": {
    "batch_size": 8 * 32,
    "loss_group_size": 32,
    "model.image.image_size": 384,
    "teacher.queue_size": 65_536,
    "optim.lr": 1e-5,
    "optim.warmup_intervals": 1,
    "data.max_len": 30,
    "evals.retrieval_itm_test.k": 256,
    "evals.retrieval_itm_test_flickr.k": 128,
  },
  "flickr": {
    "batch_size": 8 * 32,
    "evals.retrieval_itm_test.k": 128,
    "model.image.image_size": 384,
  },
}


def _field(config, dotted):
  for key in dotted.split("."):
    config = config[key]
  return config


@pytest.mark.parametrize("name", ["albef", "tcl"])
@pytest.mark.parametrize("variant", list(OFFICIAL))
def test_published_variants_carry_the_official_values(name, variant):
  config = _config(name, variant)
  assert config.name == f"{name}_{variant}"
  for dotted, want in OFFICIAL[variant].items():
    assert _field(config, dotted) == pytest.approx(want), dotted
  steps_per_epoch = config.optim.steps_per_epoch
  assert config.teacher.alpha_warmup_steps == steps_per_epoch
  assert config.total_steps == {"published": 30, "coco": 5, "flickr": 10}[variant] * steps_per_epoch
  assert config.optim.lr * config.optim.min_lr_ratio == pytest.approx(config.optim.lr / 10)
  retrieval = variant != "published"
  assert ("mlm" in config.losses) is not retrieval
  assert config.itm.exclude_same_image is retrieval and config.teacher.queue_image_id is retrieval
  assert bool(config.optim.clamp) is not retrieval  # only pre-training clamps tau
  if retrieval:
    assert config.init.model.target == "/" and not config.init.model.workdir
  else:
    assert config.losses.mlm.distill_form == "published"


@pytest.mark.parametrize("variant", ["published", "coco"])
def test_published_tcl_builds_and_lowers(variant):
  config = _offline(_config("tcl", variant))
  lowered = trainer.lower_step(trainer.build(config, data=False))
  assert "func.func public @main" in lowered.as_text()


def test_retrieval_variant_names_the_pretraining_run_to_start_from(tmp_path):
  config = _config("tcl", "tiny_retrieval")
  config.init = {"model": dict(loader="checkpoint", target="/", workdir="")}
  with pytest.raises(ConfigError, match="empty workdir"):
    trainer.train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize("variant", ["tiny_published", "tiny_retrieval"])
def test_published_switches_train_on_the_tiny_model(variant, tmp_path):
  """Every switch of the published runs (loss groups, tau, the epoch schedule, clamp, 25/30 tokens,
  pre_caption, ITM exclusion, the published MLM form) together, a few steps of TCL (ALBEF's
  variants differ only in the ITA loss)."""
  config = _config("tcl", variant)
  config.evals = {k: v for k, v in config.evals.items() if k == "retrieval_test"}
  final = trainer.train_and_evaluate(config, str(tmp_path))
  assert all(math.isfinite(final[f"train/{loss}"]) for loss in config.losses)
  assert final["train/lr"] == pytest.approx(
    config.optim.lr * (0.1 + 0.45 * (1 + math.cos(math.pi / 2))), rel=1e-5
  )
  assert "eval/retrieval_test/rsum" in final or any(k.startswith("eval/") for k in final)


@pytest.mark.slow
def test_published_tcl_loads_stand_in_weights_and_its_step_compiles(tmp_path):
  """The published TCL pre-training config at its sizes (ViT-B/16 at 256 px, BERT-base 6 + 6,
  float32). Random-weight stand-ins of DeiT-B/16 (224 px) and a 12-layer bert-base, written in the
  Hugging Face layout where the real files would be, load through its `config.init` (the 14 x 14
  position grid resized bicubically to 16 x 16), and the step compiles on the 8 simulated devices
  at 2 pairs per device (loss groups of 2), parameters sharded over them (fsdp).
  Minutes on 2 cores:
  `python -m pytest -m slow tests/test_configs.py -k stand_in`."""
  from vlalign.models import build_tower, vit  # noqa: PLC0415
  from vlalign.weights import hf  # noqa: PLC0415

  config = _offline(_config("tcl", "published"))
  deit = {**config.model.image.to_dict(), "image_size": 224}
  bert = {**config.model.text.to_dict(), "depth": 12}
  images = np.zeros((1, 224, 224, 3), np.float32)
  ids = np.zeros((1, 8), np.int32)
  deit_params = build_tower(deit, "stand-in").init(jax.random.key(1), images)["params"]
  bert_params = build_tower(bert, "stand-in").init(jax.random.key(2), ids, np.ones_like(ids))
  deit_dir = hf.export_tower(deit_params, deit, tmp_path / "deit")
  bert_dir = hf.export_tower(bert_params["params"], bert, tmp_path / "bert")
  config.init.image.path = str(deit_dir)
  config.init.text.path = config.init.fusion.path = str(bert_dir)
  config.batch_size = 2 * jax.device_count()
  config.loss_group_size = 2
  config.teacher.queue_size = 64 * config.batch_size
  # The 8 simulated devices share this host's memory: fsdp over all of them holds one copy of the
  # float32 state (params, teacher, two Adam moments: ~3.4 GB), where 8 replicas would not fit.
  config.mesh = dict(data=1, fsdp=jax.device_count())
  setup = trainer.build(config, data=False)
  state = trainer.fresh_state(setup, jax.random.PRNGKey(0))

  params = jax.device_get(state.params["params"])
  stored = np.asarray(deit_params["pos_embedding"]).reshape(-1, deit["width"])
  want = np.asarray(vit.fit_position_table(stored, (1 + 16 * 16, deit["width"]), "bicubic", False))
  np.testing.assert_allclose(params["image_encoder"]["pos_embedding"], want, atol=1e-6)
  query = np.asarray(bert_params["params"]["block_0"]["attn"]["query"]["kernel"])
  np.testing.assert_array_equal(params["text_encoder"]["block_0"]["attn"]["query"]["kernel"], query)

  del state
  compiled = trainer.lower_step(setup).compile()
  # Running it is left out: XLA's CPU client gives each simulated device its own ~2.3 GB of
  # float32 temporaries, more than this 24 GB machine holds beside the compiler.
  assert trainer.log_memory_analysis(compiled)["temp_size_mib"] > 0
