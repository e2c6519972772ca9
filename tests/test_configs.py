"""Every config in configs/ instantiates; tiny and demo ones build; full ones build and lower."""

import importlib
import os

import jax
import pytest

from vlalign import trainer

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
NOT_METHODS = ("__init__.py", "common.py")
METHOD_CONFIGS = sorted(
  f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and f not in NOT_METHODS
)


def _config(name, variant):
  return importlib.import_module(f"configs.{name}").get_config(variant)


def test_there_are_method_configs():
  assert {"clip", "siglip"} <= set(METHOD_CONFIGS)


@pytest.mark.parametrize("name", METHOD_CONFIGS)
@pytest.mark.parametrize("variant", ["tiny", "demo", "full"])
def test_config_instantiates_and_builds(name, variant):
  config = _config(name, variant)
  assert config.name == f"{name}_{variant}"
  setup = trainer.build(config)  # validates; builds model, optimizer and abstract sharded state
  assert jax.tree.leaves(setup.abstract_state.params)


@pytest.mark.parametrize("name", METHOD_CONFIGS)
def test_full_config_train_step_lowers(name):
  lowered = trainer.lower_step(trainer.build(_config(name, "full")))
  assert "func.func public @main" in lowered.as_text()


def test_unknown_variant_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown config variant"):
    _config("clip", "huge")
