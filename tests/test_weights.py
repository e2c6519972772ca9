"""`config.init` (sub-trees from another run's checkpoint) and `config.optim.frozen`."""

import jax
import numpy as np
import pytest

from configs import clip
from vlalign import checkpoint, pytrees, trainer


def _tiny(**overrides):
  config = clip.get_config("tiny")
  config.evals = {}
  config.log_every = 1
  for key, value in overrides.items():
    config[key] = value
  return config


def _init_text_from(config, source):
  config.init = dict(text=dict(loader="checkpoint", target="text_encoder", workdir=str(source)))
  return config


def _restore(workdir, setup, step):
  ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"), create=False)
  state = ckpt.restore(step, setup.abstract_state)
  ckpt.close()
  return jax.device_get(state)


def _split(params):
  """`(text_encoder leaves, other leaves)` by name."""
  named = pytrees.named_leaves(params)
  text = {k: v for k, v in named.items() if "/text_encoder/" in k}
  return text, {k: v for k, v in named.items() if k not in text}


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("source")
  config = _tiny(total_steps=2, checkpoint_every=2)
  trainer.train_and_evaluate(config, str(workdir))
  return workdir, _restore(workdir, trainer.build(config), 2).params


def test_text_tower_from_another_run_frozen_while_the_rest_trains(tmp_path, source_run):
  source, source_params = source_run
  config = _init_text_from(_tiny(total_steps=3, checkpoint_every=3, seed=1), source)
  config.optim.frozen = ("text_encoder/.*",)
  setup = trainer.build(config)
  start = jax.device_get(trainer.fresh_state(setup, jax.random.PRNGKey(config.seed)))
  random_start = jax.device_get(setup.init_params(jax.random.PRNGKey(config.seed)))

  trainer.train_and_evaluate(config, str(tmp_path))
  final = _restore(tmp_path, setup, 3)

  source_text, _ = _split(source_params)
  random_text, _ = _split(random_start)
  start_text, start_rest = _split(start.params)
  final_text, final_rest = _split(final.params)
  assert source_text and start_rest
  for name, value in source_text.items():
    assert not np.array_equal(random_text[name], value), name  # really loaded, not the seed's
    np.testing.assert_array_equal(start_text[name], value, err_msg=name)
    np.testing.assert_array_equal(final_text[name], value, err_msg=name)  # bit-identical
  # Every other parameter moved, except attention key biases: they shift each softmax row by a
  # constant, so their gradient is exactly 0 (and they get no weight decay).
  unmoved = [k for k, v in final_rest.items() if np.array_equal(v, start_rest[k])]
  assert all(k.endswith("key/bias") for k in unmoved), unmoved
  # No optimizer moments for the frozen leaves; one mu and one nu per trainable leaf.
  opt_names = list(pytrees.named_leaves(final.opt_state))
  assert not any("text_encoder" in name for name in opt_names)
  for moment in ("mu", "nu"):
    assert sum(f"/{moment}/" in name for name in opt_names) == len(start_rest), moment


def test_frozen_part_is_reported_with_parameter_counts(source_run):
  config = _tiny()
  config.optim.frozen = ("text_encoder/.*", "text_proj/.*")
  setup = trainer.build(config)
  line = trainer.describe_params(setup.abstract_state.params, setup.frozen)
  assert "trainable; frozen: text_encoder (" in line and "text_proj (" in line


@pytest.mark.parametrize(
  "edit, error, message",
  [
    (lambda c: c.optim.update(frozen=("txt_encoder/.*",)), ValueError, "match no parameter"),
    (lambda c: c.optim.update(decay=("(kernel",)), ValueError, "bad pattern"),
    (
      lambda c: c.init.update(text=dict(loader="checkpoint", target="txt", workdir="/nonexistent")),
      ValueError,
      r"no parameter sub-tree 'txt'",
    ),
    (
      lambda c: c.init.update(text=dict(loader="hub", target="text_encoder")),
      ValueError,
      "unknown init loader 'hub'",
    ),
    (
      lambda c: c.init.update(text=dict(loader="checkpoint", target="text_encoder", workdir="/no")),
      FileNotFoundError,
      "no checkpoint directory at /no",
    ),
  ],
  ids=["frozen_typo", "decay_regex", "init_target", "init_loader", "init_path"],
)
def test_bad_init_and_freeze_settings_are_clear_errors(tmp_path, edit, error, message):
  config = _tiny(total_steps=2)
  edit(config)
  with pytest.raises(error, match=message):
    trainer.train_and_evaluate(config, str(tmp_path))


def test_patterns_must_be_a_list():
  with pytest.raises(ValueError, match="list of patterns, not the string"):
    pytrees.path_mask({"params": {"a": np.zeros(2)}}, "a", "optim.frozen")


def test_init_from_a_checkpoint_of_other_shapes_names_the_array(tmp_path, source_run):
  source, _ = source_run
  config = _init_text_from(_tiny(total_steps=2), source)
  config.model.text.mlp_dim = 48
  with pytest.raises(checkpoint.IncompatibleCheckpointError, match="differ in shape.*mlp/fc1"):
    trainer.train_and_evaluate(config, str(tmp_path))
