"""Every config in configs/ instantiates; tiny and demo ones build; full ones build and lower."""

import importlib
import math
import os

import jax
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
  batch of 2; the full batch changes array sizes, not the program. ~2.5 minutes of XLA CPU
  compilation on 2 cores, so it is marked slow: `python -m pytest -m slow tests`.
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
