"""ALBEF / TCL end to end in the step: fusion passes (ITM pairs, MLM), their losses, 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import albef, tcl
from vlalign import testing, trainer
from vlalign.losses import matching
from vlalign.testing import loss_context


def _setup(module):
  config = module.get_config("tiny")
  config.evals = {}
  setup = trainer.build(config)
  return setup, setup.config


def test_itm_pairs_are_positives_then_negative_images_then_negative_texts():
  setup, _ = _setup(albef)
  batch = testing.synthetic_batch(setup.spec, seed=1)
  batch = {k: v[:4] for k, v in batch.items()}
  params = setup.model.init({"params": jax.random.PRNGKey(0)}, batch)
  neg_text, neg_image = np.array([2, 0, 3, 1]), np.array([1, 3, 0, 2])

  def itm_pairs(module):
    out = module(batch)
    return module.itm_pairs(out, batch["text_mask"], neg_text, neg_image)

  out = setup.model.apply(params, method=itm_pairs)
  assert out["itm/logits"].shape == (12, 2)

  device_batch = jax.tree.map(jnp.asarray, batch)

  @jax.jit
  def one_pair_logits(image_index, text_index):  # one image and one text, fused on their own
    def fn(module):
      image = device_batch["image"][image_index][None]
      ids = device_batch["text_ids"][text_index][None]
      mask = device_batch["text_mask"][text_index][None]
      img = module.encode_image(image)["img/all_tokens"]
      txt = module.encode_text(ids, mask)["txt/tokens"]
      return module.itm_logits(module.fuse(txt, mask, img))[0]

    return setup.model.apply(params, method=fn)

  def pair_logits(image_index, text_index):
    return np.asarray(one_pair_logits(int(image_index), int(text_index)))

  expected = [pair_logits(b, b) for b in range(4)]
  expected += [pair_logits(neg_image[b], b) for b in range(4)]
  expected += [pair_logits(b, neg_text[b]) for b in range(4)]
  np.testing.assert_allclose(out["itm/logits"], np.stack(expected), rtol=1e-4, atol=1e-5)


def test_itm_loss_entry_reports_accuracy_against_labels():
  logits = jnp.array([[0.0, 2.0], [1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [2.0, 1.0], [1.0, 0.5]])
  loss, metrics = matching.itm({"itm/logits": logits}, loss_context())
  labels = np.array([1, 1, 0, 0, 0, 0])
  log_probs = np.log(np.exp(logits) / np.exp(logits).sum(1, keepdims=True))
  np.testing.assert_allclose(loss, -np.mean(log_probs[np.arange(6), labels]), rtol=1e-6)
  np.testing.assert_allclose(metrics["accuracy"], 4 / 6)


def test_mlm_loss_entry_distills_from_teacher_and_counts_masked_accuracy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
  teacher_logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
  hit, miss = int(logits[0, 1].argmax()), (int(logits[1, 0].argmax()) + 1) % 5
  labels = np.array([[-100, hit, -100], [miss, -100, -100]])
  outputs, inputs = {"mlm/logits": logits}, {"mlm_labels": labels}
  ctx = loss_context({"mlm/logits": teacher_logits, "alpha": 0.4, **inputs})
  loss, metrics = matching.mlm(outputs, ctx)
  np.testing.assert_allclose(
    loss, matching.mlm_loss(logits, labels, teacher_logits, 0.4), rtol=1e-6
  )
  np.testing.assert_allclose(metrics["accuracy"], 0.5)
  plain, _ = matching.mlm(outputs, loss_context(inputs), distill=False)
  np.testing.assert_allclose(plain, matching.mlm_loss(logits, labels, None, 0.0), rtol=1e-6)
  with pytest.raises(ValueError, match=r"ctx.teacher entries \['mlm/logits'\]"):
    matching.mlm(outputs, loss_context(inputs))
  with pytest.raises(ValueError, match="model output 'itm/logits'"):
    matching.itm({}, loss_context(inputs))


def _two_steps(train_step, state, batches):
  metrics = None
  for batch in batches:
    state, metrics = train_step(state, batch)
  return jax.device_get((state.params, state.extras, metrics))


def test_train_step_on_8_devices_equals_one_device_queues_included():
  """TCL's step holds every ALBEF part (teacher, queues, ITM, MLM, the ITA terms of `cma`) plus
  the second view, IMC and LMI; `cma` alone is checked on 8 devices in test_momentum."""
  setup, config = _setup(tcl)
  batches = [testing.synthetic_batch(setup.spec, seed) for seed in (1, 2)]
  state = trainer.fresh_state(setup, jax.random.PRNGKey(0))
  host_state = jax.device_get(state)
  with jax.set_mesh(setup.mesh):
    sharded = _two_steps(
      setup.train_step, state, [testing.shard_leading(b, setup.mesh) for b in batches]
    )
  step_fn = jax.jit(setup.step_fn)
  device = jax.devices()[0]
  single = _two_steps(
    step_fn, jax.device_put(host_state, device), [jax.device_put(b, device) for b in batches]
  )
  params, extras, metrics = sharded
  assert set(metrics) >= {"itm", "mlm", "itm/accuracy", "mlm/accuracy", "alpha"}
  assert int(extras["queue/ptr"]) == 2 * config.batch_size % config.teacher.queue_size
  for (path, got), want in zip(
    jax.tree.leaves_with_path(sharded), jax.tree.leaves(single), strict=True
  ):
    name = jax.tree_util.keystr(path)
    if "['key']['bias']" in name and "['teacher']" not in name:
      # A key bias shifts every logit of a softmax row equally: its gradient is exactly 0, and
      # Adam turns the float noise around 0 into +-lr steps that differ with the reduction order.
      np.testing.assert_allclose(got, want, atol=2.5 * config.optim.lr, err_msg=name)
      continue
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5, err_msg=name)
  # The second batch's rows of the queues hold the embeddings of the teacher that saw it (the
  # stored teacher: the EMA update precedes the forward pass), on the teacher's image view.
  view = {**batches[1], "image": batches[1][config.teacher.image_key]}
  teacher_out = setup.model.apply(extras["teacher"], view)
  rows = slice(config.batch_size, 2 * config.batch_size)
  np.testing.assert_allclose(extras["queue/img"][rows], teacher_out["img/emb"], atol=1e-5)
  np.testing.assert_allclose(extras["queue/txt"][rows], teacher_out["txt/emb"], atol=1e-5)
  itm_kernel = lambda p: p["params"]["itm_head"]["classifier"]["kernel"]
  assert not np.allclose(itm_kernel(params), itm_kernel(host_state.params))  # ITM head trains


@pytest.mark.parametrize(
  "edit, message",
  [
    (lambda c: c.teacher.update(queue_size=40), "multiple of the global batch size 16"),
    (lambda c: c.teacher.update(image_key="image_aug"), "augment_views=2"),
    (lambda c: c.model.update(name="two_tower"), "needs a model with `itm_pairs`"),
    (lambda c: c.update(method="two_tower"), r"fields \['itm', 'mlm', 'teacher'\] are not read"),
    (lambda c: c.teacher.update(alpha=1.5), r"alpha=1.5 must be in \[0, 1\]"),
    (lambda c: c.mlm.update(mask_id=3), "disagrees with the tokenizer"),
  ],
  ids=["queue", "view", "itm_model", "method", "alpha", "mask_id"],
)
def test_bad_albef_configs_are_clear_errors(edit, message):
  config = albef.get_config("tiny")
  edit(config)
  with pytest.raises(ValueError, match=message):
    trainer.build(config)
