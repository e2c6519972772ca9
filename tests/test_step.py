"""The train step with the momentum method: EMA rule, no teacher gradient, queue writes."""

import jax
import ml_collections
import numpy as np

from configs import clip
from vlalign import testing, trainer


def _teacher_config(momentum=0.9):
  config = clip.get_config("tiny")
  config.evals = {}
  config.method = "momentum"
  config.teacher = ml_collections.ConfigDict(
    dict(momentum=momentum, queue_size=32, alpha=0.4, alpha_warmup_steps=4, image_key="image",
         dropout=False)
  )  # fmt: skip
  config.losses = dict(cma=dict(weight=1.0))
  return config


def _batch(setup, seed):
  return testing.synthetic_batch(setup.spec, seed)


def test_teacher_moves_by_the_ema_rule_and_queues_fill():
  momentum = 0.9
  setup = trainer.build(_teacher_config(momentum))
  state = trainer.fresh_state(setup, jax.random.PRNGKey(0))
  step_fn = jax.jit(setup.step_fn)
  params0 = jax.device_get(state.params)
  np.testing.assert_array_equal(
    jax.tree.leaves(jax.device_get(state.extras["teacher"]))[0], jax.tree.leaves(params0)[0]
  )
  state, _ = step_fn(state, _batch(setup, 1))
  params1 = jax.device_get(state.params)
  teacher1 = jax.device_get(state.extras["teacher"])  # EMA of teacher0 == params0 towards params0
  # m p + (1 - m) p is p up to float rounding (one ulp, depending on how the kernel is compiled).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), teacher1, params0)
  assert int(state.extras["queue/ptr"]) == 16

  state, metrics = step_fn(state, _batch(setup, 2))
  teacher2 = jax.device_get(state.extras["teacher"])
  expected = jax.tree.map(lambda t, s: momentum * t + (1 - momentum) * s, teacher1, params1)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), teacher2, expected
  )
  assert int(state.extras["queue/ptr"]) == 0  # 32 slots, 2 batches of 16: wrapped around
  queue = np.asarray(state.extras["queue/img"])
  np.testing.assert_allclose(np.linalg.norm(queue, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(metrics["alpha"], 0.4 * 1 / 4, rtol=1e-6)  # ramp: step 1 of 4


def test_teacher_receives_no_gradient():
  config = _teacher_config()
  setup = trainer.build(config)
  state = trainer.fresh_state(setup, jax.random.PRNGKey(0))
  step_fn = setup.step_fn
  batch = _batch(setup, 3)

  def teacher_sensitivity(teacher):
    new_state, _ = step_fn(state.replace(extras={**state.extras, "teacher": teacher}), batch)
    return sum(jax.numpy.sum(x) for x in jax.tree.leaves(new_state.params))

  grads = jax.jit(jax.grad(teacher_sensitivity))(state.extras["teacher"])  # jitted: 3x faster
  assert all(float(np.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_image_id_queue_follows_the_feature_queues_for_retrieval_finetuning():
  config = _teacher_config()
  config.teacher.queue_image_id = True
  config.losses = dict(cma=dict(weight=1.0, match_image_id=True))
  setup = trainer.build(config)
  state = trainer.fresh_state(setup, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(state.extras["queue/image_id"], -1)  # empty slots match nothing
  step_fn = jax.jit(setup.step_fn)
  first = _batch(setup, 1)
  state, metrics = step_fn(state, first)
  ids = np.asarray(state.extras["queue/image_id"])
  np.testing.assert_array_equal(ids[:16], first["image_id"])
  np.testing.assert_array_equal(ids[16:], -1)
  second = _batch(setup, 2)
  state, metrics = step_fn(state, second)
  np.testing.assert_array_equal(
    state.extras["queue/image_id"], np.concatenate([first["image_id"], second["image_id"]])
  )
  assert np.isfinite(metrics["cma"])
