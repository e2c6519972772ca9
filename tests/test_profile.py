"""`--profile_steps`: a jax.profiler trace of chosen train steps in `<workdir>/profile/`."""

import os
import subprocess
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import pytest
from absl import logging

from vlalign import trainer
from vlalign.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _traces(workdir):
  return sorted((workdir / trainer.PROFILE_DIR).rglob("*.xplane.pb"))


def test_parse_profile_steps():
  assert trainer.parse_profile_steps(None) is None
  assert trainer.parse_profile_steps("") is None
  assert trainer.parse_profile_steps("3,5") == (3, 5)
  assert trainer.parse_profile_steps("4") == (4, 4)
  for bad in ("0,2", "5,3", "a,b", "1,2,3", "2:4"):
    with pytest.raises(UserError, match="profile_steps"):
      trainer.parse_profile_steps(bad)


def _run_steps(profiler, steps):
  """A stand-in train loop: `(step, tracing during the step)` for steps 1..`steps`."""
  fn = jax.jit(lambda x: x @ x)
  x, seen = jnp.ones((64, 64)), []
  for step in range(1, steps + 1):
    profiler.begin(step)
    x = fn(x) / 64
    profiler.end(step, x)
    seen.append((step, profiler.tracing))
  profiler.close()
  return seen


def test_step_profiler_traces_only_its_steps(tmp_path):
  profiler = trainer.StepProfiler((2, 3), tmp_path / trainer.PROFILE_DIR)
  # `tracing` is read after `end`, which stops the trace after the last step.
  assert _run_steps(profiler, 5) == [(1, False), (2, True), (3, False), (4, False), (5, False)]
  traces = _traces(tmp_path)
  assert len(traces) == 1 and traces[0].stat().st_size > 0
  assert _run_steps(trainer.StepProfiler(None, tmp_path / "off"), 3) == [
    (1, False), (2, False), (3, False)
  ]  # fmt: skip
  assert not (tmp_path / "off").exists()


def test_a_failing_profiler_is_a_warning_and_the_loop_goes_on(tmp_path, monkeypatch):
  def broken(*args, **kwargs):
    raise RuntimeError("no profiler here")

  monkeypatch.setattr(jax.profiler, "start_trace", broken)
  with mock.patch.object(logging, "warning") as warning:
    seen = _run_steps(trainer.StepProfiler((1, 2), tmp_path / "a"), 3)
  assert [tracing for _, tracing in seen] == [False] * 3
  assert "could not start" in warning.call_args[0][0]
  monkeypatch.undo()
  monkeypatch.setattr(jax.profiler, "stop_trace", broken)
  profiler = trainer.StepProfiler((1, 5), tmp_path / "b")
  with mock.patch.object(logging, "warning") as warning:
    _run_steps(profiler, 2)  # Cut short: `close` stops the trace, which fails.
  assert "could not write" in warning.call_args[0][0]
  monkeypatch.undo()
  jax.profiler.stop_trace()  # The real trace the broken stop left running.


def test_binary_profiles_steps_of_a_tiny_clip_run(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  cmd = [
    sys.executable, "-m", "vlalign.train", "--config=configs/clip.py:tiny", "--config.evals={}",
    "--config.total_steps=3", "--config.checkpoint_every=3",
  ]  # fmt: skip
  bad = subprocess.run(
    [*cmd, f"--workdir={tmp_path / 'bad'}", "--profile_steps=3,1"],
    cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert bad.returncode == 2 and "profile_steps" in bad.stderr
  workdir = tmp_path / "run"
  run = subprocess.run(
    [*cmd, f"--workdir={workdir}", "--profile_steps=2,3"],
    cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert run.returncode == 0, run.stderr[-2000:]
  assert len(_traces(workdir)) == 1
  assert "profiling steps 2-3" in run.stderr
