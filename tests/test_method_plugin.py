"""A new method defined entirely in this file trains through the real train binary.

The method keeps an EMA teacher and a text-feature queue of its own; its loss contrasts the
student's image embeddings with [teacher text | queue] and its weight ramps up with the step. The
binary finds the method and the loss through `config.imports` (this module); nothing in `vlalign/`
knows about them. This file is also the config (`--config=tests/test_method_plugin.py`).
"""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from configs import clip
from vlalign import checkpoint, losses, methods, metrics, testing
from vlalign.methods.base import Method, check_section
from vlalign.methods.momentum import ema_update, enqueue

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHT, WARMUP = 0.5, 4


@losses.register("test_plugin_queue_contrast")
def queue_contrast(outputs, ctx, temperature: float = 0.1):
  """InfoNCE of student image embeddings against [EMA-teacher text | text queue]."""
  losses.require(ctx, "test_plugin_queue_contrast", teacher=("txt/emb",), extras=("text_queue",))
  keys = jnp.concatenate([ctx.teacher["txt/emb"], ctx.extras["text_queue"]])
  logits = outputs["img/emb"] @ keys.T / temperature
  labels = jnp.arange(logits.shape[0])
  log_probs = jax.nn.log_softmax(logits, axis=1)
  return -jnp.mean(log_probs[labels, labels]), {"queue_norm": jnp.linalg.norm(keys[-1])}


@methods.register("test_plugin_ema_queue")
class EmaQueueMethod(Method):
  """Two towers + an EMA teacher + a queue of the teacher's text embeddings."""

  config_fields = ("plugin",)

  def validate(self):
    self.plugin = check_section(self.config, "plugin", {"momentum", "queue_size"}, set())

  def init_extras(self, params, rng):
    size, dim = self.plugin["queue_size"], self.config.model.embed_dim
    return {
      "ema": jax.tree.map(jnp.copy, params),
      "text_queue": jnp.zeros((size, dim), jnp.float32),
      "queue_ptr": jnp.zeros((), jnp.int32),
    }

  def before_gradient(self, state, batch, rng):
    ctx = super().before_gradient(state, batch, rng)
    ema = ema_update(state.extras["ema"], state.params, self.plugin["momentum"])
    teacher = jax.lax.stop_gradient(self.model.apply(ema, batch))
    return ctx.replace(teacher=teacher, extras={**ctx.extras, "ema": ema})

  def after_update(self, ctx, outputs, params):
    queue, ptr = enqueue(ctx.extras["text_queue"], ctx.extras["queue_ptr"], ctx.teacher["txt/emb"])
    return {**ctx.extras, "text_queue": queue, "queue_ptr": ptr}


def get_config(variant: str = "tiny"):
  c = clip.get_config(variant)
  c.name = f"plugin_{variant}"
  c.method = "test_plugin_ema_queue"
  c.imports = ("tests.test_method_plugin",)
  c.plugin = dict(momentum=0.9, queue_size=32)
  c.losses = dict(
    itc=dict(weight=1.0),
    queue=dict(
      fn="test_plugin_queue_contrast", weight=WEIGHT, weight_schedule=dict(warmup_steps=WARMUP)
    ),
  )
  c.evals = {}
  return c


def _train(workdir):
  cmd = [
    sys.executable, "-m", "vlalign.train", "--config=tests/test_method_plugin.py",
    f"--workdir={workdir}", "--config.total_steps=3", "--config.log_every=1",
    "--config.checkpoint_every=2",
  ]  # fmt: skip
  env = testing.subprocess_env()
  result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return {r["step"]: r for r in metrics.read_jsonl(workdir / "metrics.jsonl")}


def test_method_defined_in_a_test_file_trains_checkpoints_and_resumes(tmp_path):
  workdir = tmp_path / "run"
  rows = _train(workdir)
  assert sorted(rows) == [1, 2, 3]
  for step, row in rows.items():  # the ramp: weight * min(1, (step - 1) / warmup)
    np.testing.assert_allclose(row["train/queue/weight"], WEIGHT * (step - 1) / WARMUP, rtol=1e-6)
    assert np.isfinite(row["train/queue"]) and row["train/queue"] > 0
  ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"), create=False)
  extras = ckpt.manager.item_metadata(3)["state"]["extras"]
  assert set(extras) == {"ema", "text_queue", "queue_ptr"}
  ckpt.close()

  # A crash after step 3's metrics were logged but before its checkpoint: the rerun resumes from
  # step 2 (the method's EMA teacher and queue included) and recomputes step 3 exactly.
  shutil.rmtree(workdir / "checkpoints" / "3")
  resumed = _train(workdir)
  assert sorted(resumed) == [1, 2, 3]  # step 3 once, not twice
  for key in ("train/loss", "train/queue", "train/itc", "train/queue/queue_norm"):
    assert resumed[3][key] == rows[3][key], key
