"""The trainer end to end on tiny configs: entry point, resume, preemption, bad input."""

import os
import signal
import subprocess
import sys
import time

import pytest

from configs import clip, siglip
from vlalign import checkpoint, metrics, testing, trainer
from vlalign.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
  return testing.subprocess_env()


def _tiny(module=clip, **overrides):
  config = module.get_config("tiny")
  config.evals = {}
  config.log_every = 1
  for key, value in overrides.items():
    config[key] = value
  return config


def _train_cmd(workdir, *flags):
  """The training binary on the tiny CLIP config, as a user would launch it."""
  return [
    sys.executable, "-m", "vlalign.train", "--config=configs/clip.py:tiny", f"--workdir={workdir}",
    *flags,
  ]  # fmt: skip


def _losses(workdir):
  rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


RESULT_FILES = ("config.json", "metrics.jsonl", "final_metrics.json", "eval_step3.json",
                "eval_step3.md")  # fmt: skip


def test_rerunning_a_finished_run_leaves_its_results_byte_identical(tmp_path):
  """The binary trains 3 steps, checkpoints and evaluates; reruns change no result file."""
  workdir = tmp_path / "run"
  cmd = _train_cmd(workdir, "--config.total_steps=3", "--config.log_every=1")
  first = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  assert first.returncode == 0, first.stderr[-3000:]
  before = {name: (workdir / name).read_bytes() for name in RESULT_FILES}
  assert sorted(_losses(str(workdir))) == [1, 2, 3]
  assert checkpoint.Checkpointer(str(workdir / "checkpoints")).latest_step() == 3
  assert b'"eval/retrieval_test/t2i_r1"' in before["final_metrics.json"]

  again = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "already finished at step 3" in again.stderr
  assert {name: (workdir / name).read_bytes() for name in RESULT_FILES} == before

  # A crash after the last checkpoint but before the results: the rerun makes them, the same.
  for name in ("final_metrics.json", "eval_step3.json", "eval_step3.md"):
    (workdir / name).unlink()
  again = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert {name: (workdir / name).read_bytes() for name in RESULT_FILES} == before


def test_siglip_tiny_trains_and_loss_goes_down(tmp_path):
  config = _tiny(siglip, total_steps=6)
  final = trainer.train_and_evaluate(config, str(tmp_path))
  losses = _losses(str(tmp_path))
  assert sorted(losses) == list(range(1, 7))
  assert losses[6] < losses[1]
  assert "train/siglip/bias" in final


def test_crash_and_resume_continues_the_same_loss_sequence(tmp_path, monkeypatch):
  reference = tmp_path / "reference"
  trainer.train_and_evaluate(_tiny(total_steps=4, checkpoint_every=2), str(reference))

  crashed = tmp_path / "crashed"
  real = pipeline.to_global_batch
  calls = {"n": 0}

  def crash_on_third_batch(*args, **kwargs):
    calls["n"] += 1
    if calls["n"] == 3:
      raise KeyboardInterrupt("simulated crash after step 2")
    return real(*args, **kwargs)

  monkeypatch.setattr(pipeline, "to_global_batch", crash_on_third_batch)
  with pytest.raises(KeyboardInterrupt):
    trainer.train_and_evaluate(_tiny(total_steps=4, checkpoint_every=2), str(crashed))
  monkeypatch.setattr(pipeline, "to_global_batch", real)
  assert checkpoint.Checkpointer(str(crashed / "checkpoints")).latest_step() == 2

  trainer.train_and_evaluate(_tiny(total_steps=4, checkpoint_every=2), str(crashed))
  expected, resumed = _losses(str(reference)), _losses(str(crashed))
  assert sorted(resumed) == [1, 2, 3, 4]
  for step in range(1, 5):
    assert resumed[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  workdir = tmp_path / "run"
  cmd = _train_cmd(
    workdir,
    "--config.total_steps=100000",
    "--config.log_every=1",
    "--config.checkpoint_every=100000",
    "--config.evals={}",
  )
  proc = subprocess.Popen(
    cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )
  deadline = time.time() + 240
  jsonl = workdir / "metrics.jsonl"
  while time.time() < deadline and not (jsonl.exists() and jsonl.read_text().count("\n") >= 2):
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out[-3000:]
  step = checkpoint.Checkpointer(str(workdir / "checkpoints")).latest_step()
  assert step is not None and 2 <= step < 100000
  assert "SIGTERM" in out


def test_batch_that_does_not_divide_the_devices_is_rejected(tmp_path):
  with pytest.raises(ValueError, match="not divisible by the 8 devices"):
    trainer.train_and_evaluate(_tiny(batch_size=12), str(tmp_path))


def test_incompatible_checkpoint_in_workdir_is_a_clear_error_and_kept(tmp_path):
  trainer.train_and_evaluate(_tiny(total_steps=2, checkpoint_every=2), str(tmp_path))
  wider = _tiny(total_steps=4)
  wider.model.embed_dim = 48
  with pytest.raises(checkpoint.IncompatibleCheckpointError, match="fresh --workdir"):
    trainer.train_and_evaluate(wider, str(tmp_path), override_tag="wider")
  assert checkpoint.Checkpointer(str(tmp_path / "checkpoints")).latest_step() == 2
  assert not (tmp_path / "config.wider.json").exists()


def test_empty_split_is_a_clear_error(tmp_path):
  config = _tiny()
  config.data.train_size = 0
  with pytest.raises(ValueError, match="train"):
    trainer.train_and_evaluate(config, str(tmp_path))


def test_unknown_config_field_is_rejected_by_the_binary(tmp_path):
  cmd = _train_cmd(
    tmp_path,
    "--config.optim.learning_rate=1.0",
  )
  result = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "learning_rate" in result.stderr
  assert not (tmp_path / "checkpoints").exists()


def test_nan_guard_stops_with_the_step_range_and_keeps_the_last_good_checkpoint(tmp_path):
  trainer.train_and_evaluate(_tiny(total_steps=2, checkpoint_every=1), str(tmp_path))
  config = _tiny(total_steps=4, checkpoint_every=1)
  config.optim.lr = 1e30  # resumed from step 2, the first update makes the params overflow
  with pytest.raises(metrics.NonFiniteError, match="param_norm between step 3; the newest .* 2"):
    trainer.train_and_evaluate(config, str(tmp_path), override_tag="huge_lr")
  assert checkpoint.Checkpointer(str(tmp_path / "checkpoints")).latest_step() == 2
