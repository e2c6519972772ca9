"""Loss groups (`config.loss_group_size`, vlalign/losses/groups.py): every loss on consecutive
groups of G examples, averaged, against a reference that loops over the groups; the same on 8
devices and on 1; one group = today's global values; ITM negatives from the own group only."""

import functools
import math

import jax
import numpy as np
import pytest

from configs import tcl
from vlalign import losses, testing, trainer
from vlalign.errors import ConfigError
from vlalign.losses import groups

B, E, Q, L, V, K, SIDE = 8, 16, 16, 6, 11, 5, 4
PER_EXAMPLE_BLOCKS = {"itm/logits": 3}  # [3B, 2]: positives, negative images, negative texts


def _unit(rng, *shape):
  x = rng.normal(size=shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _softmax_rows(x):
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def _inputs(seed=0):
  """Outputs, context fields and batch that every loss below can read."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, L + 1, size=B)
  text_mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
  labels = np.where(rng.random((B, L)) < 0.4, rng.integers(0, V, (B, L)), -100)
  labels = np.where(text_mask > 0, labels, -100).astype(np.int32)
  outputs = {
    "img/emb": _unit(rng, B, E),
    "txt/emb": _unit(rng, B, E),
    "img/tokens_emb": _unit(rng, B, SIDE * SIDE, E),
    "txt/tokens_emb": _unit(rng, B, L, E),
    "itm/logits": rng.normal(size=(3 * B, 2)).astype(np.float32),
    "mlm/logits": rng.normal(size=(B, L, V)).astype(np.float32),
    "codebook": _unit(rng, K, E),
    "logit_scale": np.float32(math.log(1 / 0.07)),
    "logit_bias": np.float32(-2.0),
  }
  teacher = {
    "img/emb": _unit(rng, B, E),
    "txt/emb": _unit(rng, B, E),
    "img/tokens_emb": _unit(rng, B, SIDE * SIDE, E),
    "txt/tokens_emb": _unit(rng, B, L, E),
    "mlm/logits": rng.normal(size=(B, L, V)).astype(np.float32),
    "img/codes": _softmax_rows(rng.normal(size=(B, K))),
    "txt/codes": _softmax_rows(rng.normal(size=(B, K))),
    "queue": {
      "img/codes": _softmax_rows(rng.normal(size=(Q, K))),
      "txt/codes": _softmax_rows(rng.normal(size=(Q, K))),
    },
  }
  image_id = np.arange(B, dtype=np.int32)
  image_id[1] = image_id[0]  # two captions of one image inside the first group
  fields = {
    "teacher": teacher,
    "extras": {
      "queue/img": _unit(rng, Q, E),
      "queue/txt": _unit(rng, Q, E),
      "queue/image_id": rng.integers(0, B, size=Q).astype(np.int32),
    },
    "schedules": {"alpha": np.float32(0.4)},
    "inputs": {"mlm_labels": labels},
    "batch": {"text_mask": text_mask, "image_id": image_id},
  }
  return outputs, fields


# (name, fn, kwargs): every loss of the published recipes, the CLIP/SigLIP ones and CODIS's.
CASES = [
  ("itc", "itc", {}),
  ("siglip", "siglip", {}),
  ("cma", "cma", {}),
  ("cma_ids", "cma", {"match_image_id": True}),
  ("imc", "imc", {}),
  ("lmi", "lmi", {"grid": 2}),
  ("tcl_ita", "tcl_ita", {"grid": 2}),
  ("itm", "itm", {}),
  ("mlm", "mlm", {}),
  ("mlm_published", "mlm", {"distill_form": "published"}),
  ("code_distill", "code_distill", {}),
  ("code_contrast", "code_contrast", {}),
]


def _slice_group(tree, g, size, shared_keys=False):
  """Group g's rows of every per-example entry (reference: plain indexing, block by block)."""
  if tree is None:
    return None
  out = {}
  for key, value in tree.items():
    if shared_keys and "/" not in key:
      out[key] = value
      continue
    blocks = PER_EXAMPLE_BLOCKS.get(key, 1)
    parts = [value[b * B + g * size : b * B + (g + 1) * size] for b in range(blocks)]
    out[key] = np.concatenate(parts)
  return out


def _reference(fn, outputs, fields, size):
  """Mean over the groups of `fn` on each group's slice, in a Python loop."""
  values, metrics = [], []
  for g in range(B // size):
    ctx = losses.context(
      teacher=_slice_group(fields["teacher"], g, size, shared_keys=True),
      extras=fields["extras"],
      schedules=fields["schedules"],
      inputs=_slice_group(fields["inputs"], g, size),
      batch=_slice_group(fields["batch"], g, size),
    )
    value, m = fn(_slice_group(outputs, g, size, shared_keys=True), ctx)
    values.append(float(value))
    metrics.append(jax.device_get(m))
  mean_metrics = {k: np.mean([m[k] for m in metrics]) for k in metrics[0]}
  return np.mean(values), mean_metrics


def _entries(fn_name, kwargs):
  return losses.parse_entries({"loss": dict(fn=fn_name, weight=1.0, **kwargs)})


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize(("name", "fn_name", "kwargs"), CASES, ids=[c[0] for c in CASES])
def test_grouped_losses_equal_a_loop_over_groups(name, fn_name, kwargs, size):
  del name
  outputs, fields = _inputs(seed=size)
  entries = _entries(fn_name, kwargs)
  value, metrics = jax.jit(
    lambda o, f: losses.sum_losses(entries, o, losses.context(**f), group_size=size)
  )(outputs, fields)
  want_value, want_metrics = _reference(
    functools.partial(losses.get(fn_name), **kwargs), outputs, fields, size
  )
  np.testing.assert_allclose(value, want_value, rtol=2e-5, atol=1e-6)
  for key, want in want_metrics.items():
    np.testing.assert_allclose(metrics[f"loss/{key}"], want, rtol=2e-5, atol=1e-6, err_msg=key)
  global_value, _ = losses.sum_losses(entries, outputs, losses.context(**fields))
  if fn_name not in ("itm", "code_distill"):  # means of per-example terms: the same per group
    assert abs(float(value) - float(global_value)) > 1e-6, "groups changed nothing"


@pytest.mark.parametrize(("name", "fn_name", "kwargs"), CASES, ids=[c[0] for c in CASES])
def test_one_group_of_the_whole_batch_is_todays_global_loss(name, fn_name, kwargs):
  del name
  outputs, fields = _inputs(seed=3)
  entries = _entries(fn_name, kwargs)
  ctx = losses.context(**fields)
  got = losses.sum_losses(entries, outputs, ctx, group_size=B)
  want = losses.sum_losses(entries, outputs, ctx)
  for key in want[1]:
    np.testing.assert_array_equal(got[1][key], want[1][key], err_msg=key)


@pytest.mark.parametrize("fn_name", ["cma", "tcl_ita", "mlm", "code_contrast"])
def test_grouped_value_and_grad_same_on_8_devices(fn_name):
  outputs, fields = _inputs(seed=7)
  entries = _entries(fn_name, {"grid": 2} if fn_name == "tcl_ita" else {})

  def value_and_grad(o, f):
    def total(o_):
      return losses.sum_losses(entries, o_, losses.context(**f), group_size=2)[0]

    return jax.value_and_grad(total)(o)

  (value8, grad8), (value1, grad1) = testing.run_sharded_and_single(value_and_grad, outputs, fields)
  np.testing.assert_allclose(value8, value1, rtol=1e-5)
  for key in grad1:
    np.testing.assert_allclose(grad8[key], grad1[key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_split_takes_each_groups_rows_of_every_block():
  x = np.arange(3 * B)  # three blocks of B rows
  got = np.asarray(groups.split(x, B, 4))
  np.testing.assert_array_equal(got, [[0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19],
                                      [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23]])  # fmt: skip
  with pytest.raises(ValueError, match="multiple of the batch size 8"):
    groups.split(np.zeros((B + 1, 2)), B, 4, "outputs['img/x']")


@pytest.mark.parametrize(
  ("size", "batch_size", "want"), [(0, 16, None), (16, 16, None), (4, 16, 4), (None, 16, None)]
)
def test_group_size_of_config(size, batch_size, want):
  assert groups.group_size_of({"loss_group_size": size, "batch_size": batch_size}) == want


@pytest.mark.parametrize("size", [3, -4])
def test_bad_group_sizes_are_config_errors(size):
  config = tcl.get_config("tiny")
  config.loss_group_size = size
  with pytest.raises(ConfigError, match="loss_group_size"):
    trainer.build(config, data=False)


def _tcl_grouped(size):
  config = tcl.get_config("tiny")
  config.evals = {}
  config.loss_group_size = size
  return trainer.build(config)


def test_itm_negatives_come_from_the_own_group():
  setup = _tcl_grouped(4)
  method, batch_size = setup.method, setup.config.batch_size
  rng = np.random.default_rng(0)
  out = {"img/emb": _unit(rng, batch_size, 16), "txt/emb": _unit(rng, batch_size, 16)}
  out["logit_scale"] = np.float32(math.log(1 / 0.07))
  teacher = {"img/emb": _unit(rng, batch_size, 16), "txt/emb": _unit(rng, batch_size, 16)}
  batch = {"image_id": np.arange(batch_size, dtype=np.int32)}
  ctx = losses.context(teacher=teacher, batch=batch)
  for seed in range(5):
    neg_text, neg_image = jax.device_get(method.itm_negatives(out, ctx, jax.random.PRNGKey(seed)))
    own_group = np.arange(batch_size) // 4
    np.testing.assert_array_equal(neg_text // 4, own_group)
    np.testing.assert_array_equal(neg_image // 4, own_group)
    assert np.all(neg_text != np.arange(batch_size)) and np.all(neg_image != np.arange(batch_size))


@pytest.mark.slow
def test_grouped_tcl_step_on_8_devices_equals_one_device():
  """The whole TCL step (ITM sampling in groups, every loss grouped) with groups of 4 that do not
  align with the 8 devices' shards of 2: same loss and parameters on 8 devices and on 1. Three
  compilations of the TCL step (~2 minutes), so marked slow: each grouped loss is checked on 8
  devices above, and the ungrouped TCL step in tests/test_albef.py."""
  setup = _tcl_grouped(4)
  batch = testing.synthetic_batch(setup.spec, 1)
  state = trainer.fresh_state(setup, jax.random.PRNGKey(0))
  host_state = jax.device_get(state)
  with jax.set_mesh(setup.mesh):
    state8, metrics8 = setup.train_step(state, testing.shard_leading(batch, setup.mesh))
  device = jax.devices()[0]
  state1, metrics1 = jax.jit(setup.step_fn)(
    jax.device_put(host_state, device), jax.device_put(batch, device)
  )
  for key in ("loss", "tcl_ita", "itm", "mlm", "itm/accuracy"):
    np.testing.assert_allclose(metrics8[key], metrics1[key], rtol=2e-5, err_msg=key)
  global_setup = _tcl_grouped(0)
  _, global_metrics = jax.jit(global_setup.step_fn)(
    jax.device_put(host_state, device), jax.device_put(batch, device)
  )
  assert abs(float(global_metrics["tcl_ita"]) - float(metrics1["tcl_ita"])) > 1e-5


@pytest.mark.parametrize("exclude", [True, False])
def test_itm_exclude_same_image_switch(exclude):
  """Pre-training (False) excludes only the pair itself, so a caption of the same image can be a
  negative; retrieval fine-tuning (True, the default) never draws one."""
  setup = _tcl_grouped(0)
  method = setup.method
  method.itm = {**method.itm, "exclude_same_image": exclude}
  batch_size = setup.config.batch_size
  rng = np.random.default_rng(1)
  img = _unit(rng, batch_size, 16)
  partner = np.arange(batch_size) ^ 1  # examples 2k and 2k+1 show the same image
  out = {"img/emb": img, "txt/emb": img, "logit_scale": np.float32(math.log(1 / 0.07))}
  teacher = {"img/emb": img[partner], "txt/emb": img[partner]}  # the partner is the hardest
  batch = {"image_id": (np.arange(batch_size) // 2).astype(np.int32)}
  ctx = losses.context(teacher=teacher, batch=batch)
  drawn = [
    jax.device_get(method.itm_negatives(out, ctx, jax.random.PRNGKey(s))[0]) for s in range(4)
  ]
  hits = sum(int(np.sum(d == partner)) for d in drawn)
  assert all(np.all(d != np.arange(batch_size)) for d in drawn)
  assert (hits == 0) if exclude else (hits > batch_size)
