"""CODIS: Sinkhorn-Knopp, the codebook losses, the `codis` method's state, health and report."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import codis as codis_config
from vlalign import losses, testing, trainer
from vlalign.evaluation import codebook as codebook_eval
from vlalign.losses import codebook
from vlalign.methods import codis

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, Q, K, E = 8, 16, 12, 6  # batch, queue rows, codes, embedding width


def _unit(rng, *shape):
  x = rng.normal(size=shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _ref_sinkhorn(scores, epsilon, iterations):
  """SwAV's `distributed_sinkhorn` on one process, in float64, exactly as written there."""
  q = np.exp(np.asarray(scores, np.float64) / epsilon).T  # [K, N]
  num_codes, num_samples = q.shape
  q /= q.sum()
  for _ in range(iterations):
    q /= q.sum(axis=1, keepdims=True)
    q /= num_codes
    q /= q.sum(axis=0, keepdims=True)
    q /= num_samples
  return (q * num_samples).T


# --- Sinkhorn -----------------------------------------------------------------------------------


@pytest.mark.parametrize("epsilon, iterations", [(0.05, 3), (0.5, 1), (0.01, 10)])
def test_sinkhorn_matches_swav(epsilon, iterations):
  rng = np.random.default_rng(0)
  scores = _unit(rng, 40, E) @ _unit(rng, K, E).T  # cosine similarities: logits up to 1 / eps
  got = jax.jit(codebook.sinkhorn, static_argnums=(1, 2))(scores, epsilon, iterations)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, _ref_sinkhorn(scores, epsilon, iterations), rtol=2e-4, atol=1e-6)


def test_sinkhorn_marginals_reach_their_targets():
  rng = np.random.default_rng(1)
  scores = _unit(rng, 48, E) @ _unit(rng, K, E).T
  q = np.asarray(codebook.sinkhorn(scores, 0.1, 200), np.float64)
  np.testing.assert_allclose(q.sum(axis=1), 1.0, atol=1e-4)  # each sample: one unit of mass
  np.testing.assert_allclose(q.sum(axis=0), 48 / K, atol=1e-4)  # each code: N / K


def test_sinkhorn_is_finite_and_right_for_small_epsilon_and_large_logits():
  rng = np.random.default_rng(2)
  scores = 3.0 * (_unit(rng, 32, E) @ _unit(rng, K, E).T)  # logits up to 300 at epsilon 0.01
  got = np.asarray(codebook.sinkhorn(scores, 0.01, 5))
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, _ref_sinkhorn(scores, 0.01, 5), rtol=1e-3, atol=1e-5)


def test_sinkhorn_on_8_devices_equals_one():
  rng = np.random.default_rng(3)
  scores = _unit(rng, 64, E) @ _unit(rng, K, E).T
  sharded, single = testing.run_sharded_and_single(lambda s: codebook.sinkhorn(s, 0.05, 3), scores)
  np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-7)


# --- Losses -------------------------------------------------------------------------------------


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  centres = _unit(rng, K, E)
  outputs = {"img/emb": _unit(rng, B, E), "txt/emb": _unit(rng, B, E), "codebook": centres}
  teacher_img, teacher_txt = _unit(rng, B + Q, E), _unit(rng, B + Q, E)
  img_codes = _ref_sinkhorn(teacher_img @ centres.T, 0.05, 3).astype(np.float32)
  txt_codes = _ref_sinkhorn(teacher_txt @ centres.T, 0.05, 3).astype(np.float32)
  codes = {
    "img/codes": img_codes[:B],
    "txt/codes": txt_codes[:B],
    "queue": {"img/codes": img_codes[B:], "txt/codes": txt_codes[B:]},
  }
  return outputs, codes


def _all_codes(codes, modality):
  """[batch | queue] rows of a modality's codes, `[B + Q, K]`."""
  return np.concatenate([codes[f"{modality}/codes"], codes["queue"][f"{modality}/codes"]])


def _softmax(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max())
  return e / e.sum()


def _ref_cross_entropy(targets, emb, centres, tau):
  return np.mean(
    [-np.sum(targets[i] * np.log(_softmax(emb[i] @ centres.T / tau))) for i in range(len(emb))]
  )


def _ref_contrast(student_emb, targets, centres, tau, tau_a):
  total = 0.0
  for i in range(len(student_emb)):
    p = _softmax(student_emb[i] @ centres.T / tau)
    logits = np.array([p @ targets[j] / tau_a for j in range(len(targets))])
    total -= np.log(_softmax(logits)[i])
  return total / len(student_emb)


def test_code_terms_match_loop_references():
  outputs, codes = _inputs()
  ctx = testing.loss_context(codes)
  c, tau = outputs["codebook"], 0.1
  q_img, q_txt = codes["img/codes"], codes["txt/codes"]
  value, metrics = jax.jit(losses.get("code_distill"))(outputs, ctx)
  i2t = _ref_cross_entropy(q_txt, outputs["img/emb"], c, tau)
  t2i = _ref_cross_entropy(q_img, outputs["txt/emb"], c, tau)
  np.testing.assert_allclose([metrics["i2t"], metrics["t2i"]], [i2t, t2i], rtol=1e-5)
  np.testing.assert_allclose(value, (i2t + t2i) / 2, rtol=1e-5)
  value, metrics = jax.jit(losses.get("code_intra"))(outputs, ctx)
  i2i = _ref_cross_entropy(q_img, outputs["img/emb"], c, tau)
  t2t = _ref_cross_entropy(q_txt, outputs["txt/emb"], c, tau)
  np.testing.assert_allclose(value, (i2i + t2t) / 2, rtol=1e-5)
  value, metrics = jax.jit(losses.get("code_contrast"))(outputs, ctx)
  i2t = _ref_contrast(outputs["img/emb"], _all_codes(codes, "txt"), c, tau, 0.05)
  t2i = _ref_contrast(outputs["txt/emb"], _all_codes(codes, "img"), c, tau, 0.05)
  np.testing.assert_allclose([metrics["i2t"], metrics["t2i"]], [i2t, t2i], rtol=1e-5)
  # entropy / perplexity of the students' assignments
  embeddings = np.concatenate([outputs["img/emb"], outputs["txt/emb"]])
  probs = np.stack([_softmax(e @ c.T / tau) for e in embeddings])
  _, metrics = losses.get("code_distill")(outputs, ctx)
  entropy = -np.mean(np.sum(probs * np.log(probs), axis=1))
  mean = probs.mean(0)
  np.testing.assert_allclose(metrics["entropy"], entropy, rtol=1e-4)
  np.testing.assert_allclose(metrics["perplexity"], np.exp(-np.sum(mean * np.log(mean))), rtol=1e-4)


@pytest.mark.parametrize("name", ["code_distill", "code_contrast", "code_intra"])
def test_gradients_reach_students_and_codebook_never_the_teachers(name):
  outputs, codes = _inputs(seed=1)
  fn = losses.get(name)
  grads = jax.grad(lambda o, t: fn(o, testing.loss_context(t))[0], argnums=(0, 1))(outputs, codes)
  for key in ("img/emb", "txt/emb", "codebook"):
    assert float(np.abs(grads[0][key]).max()) > 0, key
  for path, value in jax.tree_util.tree_leaves_with_path(grads[1]):
    np.testing.assert_array_equal(value, 0.0, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("name", ["code_distill", "code_contrast", "code_intra"])
def test_code_terms_on_8_devices_equal_one(name):
  outputs, codes = _inputs(seed=2)
  fn = losses.get(name)

  def value_and_grad(o, t):
    return jax.value_and_grad(lambda o_: fn(o_, testing.loss_context(t))[0])(o)

  (value8, grad8), (value1, grad1) = testing.run_sharded_and_single(value_and_grad, outputs, codes)
  np.testing.assert_allclose(value8, value1, rtol=1e-5)
  for key in grad1:
    np.testing.assert_allclose(grad8[key], grad1[key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_missing_codebook_or_codes_are_clear_errors():
  outputs, codes = _inputs()
  with pytest.raises(ValueError, match="needs model output 'codebook'"):
    losses.get("code_distill")({k: v for k, v in outputs.items() if k != "codebook"},
                               testing.loss_context(codes))  # fmt: skip
  with pytest.raises(ValueError, match=r"ctx.teacher entries \['img/codes', 'txt/codes'\]"):
    losses.get("code_contrast")(outputs, testing.loss_context({"img/emb": outputs["img/emb"]}))


# --- The codis method through the step ----------------------------------------------------------


def _setup(**codis_fields):
  """The tiny CODIS config without the fusion parts (ITM, MLM: tested with ALBEF), so that the
  step compiles fast; the codebook parts are all there."""
  config = codis_config.get_config("tiny")
  config.evals = {}
  config.codis.update(codis_fields)
  config.model.name = "two_tower"
  config.itm = config.mlm = None
  config.losses = {k: v for k, v in config.losses.items() if k not in ("itm", "mlm")}
  return trainer.build(config)


@pytest.mark.parametrize("target_codebook, sinkhorn_queue", [("student", True), ("teacher", False)])
def test_step_trains_the_codebook_and_never_the_teacher(target_codebook, sinkhorn_queue):
  setup = _setup(target_codebook=target_codebook, sinkhorn_queue=sinkhorn_queue)
  state = trainer.fresh_state(setup, jax.random.PRNGKey(0))
  batch = testing.synthetic_batch(setup.spec, 1)
  before = jax.device_get(state.params["params"]["codebook"]["centres"])
  step = jax.jit(setup.step_fn)
  new_state, metrics = step(*step(state, batch)[:1], batch)  # step 0 has lr 0 (warm-up)
  after = jax.device_get(new_state.params["params"]["codebook"]["centres"])
  assert not np.allclose(before, after)  # the codebook learns
  assert {"code_distill", "code_contrast", "code_intra", "codes/used"} <= set(metrics)
  state = trainer.fresh_state(setup, jax.random.PRNGKey(0))

  def params_after_step(teacher):
    out, _ = setup.step_fn(state.replace(extras={**state.extras, "teacher": teacher}), batch)
    return sum(jnp.sum(x) for x in jax.tree.leaves(out.params))

  grads = jax.jit(jax.grad(params_after_step))(state.extras["teacher"])
  assert all(float(np.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_codes_usage_and_dead_code_reinitialisation():
  last = codis.codes_last_used(
    jnp.full((4,), codis.NEVER), jnp.eye(4)[jnp.array([2, 2, 0])], jnp.int32(7)
  )
  np.testing.assert_array_equal(last, [7, codis.NEVER, 7, codis.NEVER])
  np.testing.assert_array_equal(codis.recently_used(last, jnp.int32(9), 3), [1, 0, 1, 0])
  setup = _setup(reinit_dead=True, usage_window=1)
  state = trainer.fresh_state(setup, jax.random.PRNGKey(0))
  step = jax.jit(setup.step_fn)
  for seed in (1, 2):  # from step 1 on, codes not picked in the last step are re-initialised
    state, metrics = step(state, testing.synthetic_batch(setup.spec, seed))
  reinit = np.asarray(state.extras["codes/reinit"])
  assert reinit.any() and float(metrics["codes/reinitialised"]) == reinit.sum()
  centres = np.asarray(state.params["params"]["codebook"]["centres"])
  # A re-initialised centre is a teacher embedding of the batch: a unit vector.
  np.testing.assert_allclose(np.linalg.norm(centres[reinit], axis=1), 1.0, rtol=1e-5)


def test_codebook_usage_metrics_against_a_hand_count():
  metrics, counts = codebook_eval.code_usage_metrics(
    np.array([0, 0, 1]), np.array([0, 1, 1, 0, 2, 2]), np.array([0, 0, 1, 1, 2, 2]), 4
  )
  np.testing.assert_array_equal(counts, [4, 3, 2, 0])
  usage = counts / 9
  expected = np.exp(-np.sum(usage[:3] * np.log(usage[:3])))
  assert metrics == pytest.approx(
    {"size": 4, "used": 3, "dead": 1, "perplexity": expected, "agreement": 100 * 2 / 6}
  )


def test_codis_run_writes_usage_plot_and_the_codebook_report(tmp_path):
  workdir = tmp_path / "run"
  env = testing.subprocess_env()
  train = [sys.executable, "-m", "vlalign.train", "--config=configs/codis.py:tiny",
           f"--workdir={workdir}", "--config.total_steps=3"]  # fmt: skip
  result = subprocess.run(train, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (workdir / "codebook_test_step3.png").read_bytes().startswith(b"\x89PNG")
  final = json.loads((workdir / "final_metrics.json").read_text())
  assert final["eval/codebook_test/used"] + final["eval/codebook_test/dead"] == 16
  assert math.isfinite(final["train/codes/used"])
  cmd = [sys.executable, "-m", "vlalign.codebook_report", "--config=configs/codis.py:tiny",
         f"--workdir={workdir}", "--codes=3", "--per_code=2"]  # fmt: skip
  result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  page = (workdir / "codebook" / "step3" / "index.md").read_text()
  assert page.startswith("# Codebook of codis_tiny at step 3")
  images = [line for line in page.splitlines() if "](code" in line]
  assert images, page
  for line in images:
    for name in line.split("](")[1:]:
      assert (workdir / "codebook" / "step3" / name.split(")")[0]).exists()
