"""`config.init` from our own checkpoint at another image size: the ViT position table is resized
(ALBEF/TCL fine-tune retrieval at 384 px from 256 px pre-training), every other array loads as is,
and any other shape difference is still refused by name."""

import jax
import numpy as np
import pytest

from configs import albef
from vlalign import checkpoint, pytrees, trainer
from vlalign.models import scan, vit

POS = "image_encoder/pos_embedding"


def _tiny(image_size: int, cls_pos_embed: bool):
  config = albef.get_config("tiny")
  config.evals = {}
  config.data.image_size = image_size
  config.model.image.update(
    image_size=image_size, patch_size=8, cls_pos_embed=cls_pos_embed, pos_interpolation="bicubic"
  )
  return config


def _init_everything_from(config, workdir, params, root_entry=False):
  """The whole model from `workdir`: one `checkpoint` entry with target "/" (`root_entry`), or one
  per top-level parameter sub-tree."""
  if root_entry:
    config.init = {"model": dict(loader="checkpoint", target="/", workdir=str(workdir))}
    return config
  config.init = {
    key: dict(loader="checkpoint", target=key, workdir=str(workdir))
    for key in params[pytrees.PARAMS]
  }
  return config


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """`cls_pos_embed -> (workdir, params)` of a 32 px (4x4 patch grid) ALBEF state, saved where the
  `checkpoint` loader reads it (each made once)."""
  runs = {}

  def get(cls_pos_embed: bool):
    if cls_pos_embed not in runs:
      workdir = tmp_path_factory.mktemp("albef32")
      setup = trainer.build(_tiny(32, cls_pos_embed), data=False)
      state = trainer.fresh_state(setup, jax.random.PRNGKey(3))
      ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"), async_save=False)
      ckpt.save(1, state)
      ckpt.close()
      runs[cls_pos_embed] = workdir, jax.device_get(state.params)
    return runs[cls_pos_embed]

  return get


@pytest.mark.parametrize("cls_pos_embed", [False, True], ids=["grid", "cls_first"])
def test_position_table_resized_for_a_larger_image_everything_else_equal(saved, cls_pos_embed):
  workdir, source = saved(cls_pos_embed)
  # cls_first: one entry for every parameter (target "/"); grid: one entry per sub-tree.
  config = _init_everything_from(_tiny(48, cls_pos_embed), workdir, source, cls_pos_embed)
  setup = trainer.build(config, data=False)
  loaded = jax.device_get(trainer.fresh_state(setup, jax.random.PRNGKey(0)).params)

  stored = pytrees.named_leaves(source[pytrees.PARAMS])
  got = pytrees.named_leaves(loaded[pytrees.PARAMS])
  assert set(got) == set(stored)
  width = stored[POS].shape[-1]
  if cls_pos_embed:
    assert stored[POS].shape == (1 + 16, width) and got[POS].shape == (1 + 36, width)
    np.testing.assert_array_equal(got[POS][0], stored[POS][0])  # the CLS position as stored
    grid, new_grid = stored[POS][1:].reshape(4, 4, width), got[POS][1:].reshape(6, 6, width)
  else:
    assert stored[POS].shape == (4, 4, width) and got[POS].shape == (6, 6, width)
    grid, new_grid = stored[POS], got[POS]
  expected = np.asarray(vit.resize_position_embedding(grid, 6, 6, "bicubic"))
  np.testing.assert_allclose(new_grid, expected, rtol=0, atol=1e-6)
  for name, value in stored.items():
    if name != POS:
      np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_other_shape_differences_are_still_refused_by_name(saved):
  workdir, source = saved(False)
  config = _tiny(48, False)
  config.data.max_len = 16
  config.model.text.max_len = 16  # the text position table: not resizable
  config = _init_everything_from(config, workdir, source)
  setup = trainer.build(config, data=False)
  message = r"(?s)\(text_encoder\).*pos_embedding: checkpoint \(24, 32\) vs config \(16, 32\)"
  with pytest.raises(checkpoint.IncompatibleCheckpointError, match=message):
    trainer.fresh_state(setup, jax.random.PRNGKey(0))


def test_position_table_of_another_layout_is_refused(saved):
  """A grid without a CLS row into a tower with one is not a resize: refused by name."""
  workdir, _ = saved(False)
  config = _tiny(48, True)
  config.init = dict(image=dict(loader="checkpoint", target="image_encoder", workdir=str(workdir)))
  setup = trainer.build(config, data=False)
  message = r"pos_embedding: checkpoint \(4, 4, 32\) vs config \(37, 32\)"
  with pytest.raises(checkpoint.IncompatibleCheckpointError, match=message):
    trainer.fresh_state(setup, jax.random.PRNGKey(0))


@pytest.mark.parametrize("root_entry", [False, True], ids=["per_subtree", "root"])
def test_unrolled_blocks_initialise_scanned_layers_and_back(tmp_path, saved, root_entry):
  """An unrolled run initialises a model with scanned layers (blocks stacked, position table
  resized on the way) and that model's checkpoint initialises an unrolled one again: every array
  equal to the source's after `scan.stack_layers` / `unstack_layers`."""
  workdir, source = saved(False)
  config = _tiny(48, False)
  config.model.scan_layers = True
  config = _init_everything_from(config, workdir, source, root_entry)
  setup = trainer.build(config, data=False)
  state = trainer.fresh_state(setup, jax.random.PRNGKey(0))
  scanned = pytrees.named_leaves(jax.device_get(state.params)[pytrees.PARAMS])
  stacked_source = pytrees.named_leaves(scan.stack_layers(source)[pytrees.PARAMS])
  assert set(scanned) == set(stacked_source)
  assert any("/blocks/" in name for name in scanned)
  for name, value in stacked_source.items():
    if name != POS:
      np.testing.assert_array_equal(scanned[name], value, err_msg=name)
  assert scanned[POS].shape == (
    6,
    6,
    source[pytrees.PARAMS]["image_encoder"]["pos_embedding"].shape[-1],
  )

  scanned_dir = tmp_path / "scanned"
  ckpt = checkpoint.Checkpointer(str(scanned_dir / "checkpoints"), async_save=False)
  ckpt.save(1, state)
  ckpt.close()
  back = _init_everything_from(_tiny(48, False), scanned_dir, source, root_entry)
  loaded = trainer.fresh_state(trainer.build(back, data=False), jax.random.PRNGKey(1))
  unrolled = pytrees.named_leaves(jax.device_get(loaded.params)[pytrees.PARAMS])
  expected = pytrees.named_leaves(scan.unstack_layers(jax.device_get(state.params))[pytrees.PARAMS])
  assert set(unrolled) == set(expected)
  for name, value in expected.items():
    np.testing.assert_array_equal(unrolled[name], value, err_msg=name)
