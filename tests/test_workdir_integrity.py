"""No command loses a checkpoint or a result, whatever the user or the machine does.

One test per fault, through the real binaries on `configs/clip.py:tiny`, showing the message and
the data kept (docs/architecture.md, "What survives what").
"""

import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from configs import clip
from vlalign import checkpoint, metrics, testing, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "--config=configs/clip.py:tiny"
LONG = ("--config.total_steps=100000", "--config.checkpoint_every=100000", "--config.evals={}")


def _env():
  return testing.subprocess_env()


def _cmd(binary, workdir, *flags):
  return [sys.executable, "-m", f"vlalign.{binary}", TINY, f"--workdir={workdir}", *flags]


def _run(binary, workdir, *flags, timeout=300):
  result = subprocess.run(
    _cmd(binary, workdir, *flags), cwd=ROOT, env=_env(), capture_output=True, text=True,
    timeout=timeout,
  )  # fmt: skip
  return result


def _ok(result):
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def _user_error(result, code=2):
  """A one-line message, no traceback, the given exit status."""
  assert result.returncode == code, (result.returncode, result.stderr[-3000:])
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  return result.stderr.split("error: ", 1)[1]


def _steps(workdir):
  return checkpoint.Checkpointer(str(workdir / "checkpoints"), create=False).all_steps()


def _logged_steps(workdir):
  return [
    row["step"] for row in metrics.read_jsonl(workdir / "metrics.jsonl") if "train/loss" in row
  ]


def _snapshot(workdir):
  """Every file of the workdir except the lock, as bytes."""
  files = {}
  for path in glob.glob(str(workdir / "**"), recursive=True):
    if os.path.isfile(path) and not path.endswith("run.lock"):
      with open(path, "rb") as f:
        files[os.path.relpath(path, workdir)] = f.read()
  return files


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished 4-step run with checkpoints 2 and 4 and its evaluation at step 4."""
  workdir = tmp_path_factory.mktemp("finished")
  _ok(_run("train", workdir, "--config.total_steps=4", "--config.log_every=1"))
  assert _steps(workdir) == [2, 4]
  return workdir


def _copy(src, dst):
  subprocess.run(["cp", "-a", f"{src}/.", str(dst)], check=True)
  return dst


class _Background:
  """A long training run in the background; `output()` waits for it to end."""

  def __init__(self, workdir, *flags):
    self.proc = subprocess.Popen(
      _cmd("train", workdir, *LONG, "--config.log_every=1", *flags), cwd=ROOT, env=_env(),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    self.pid = self.proc.pid
    self.lines, self.logged = [], threading.Semaphore(0)
    self.reader = threading.Thread(target=self._read, daemon=True)
    self.reader.start()

  def _read(self):
    for line in self.proc.stdout:
      self.lines.append(line)
      if " | loss " in line:  # a progress line: one step logged
        self.logged.release()

  def wait_for_steps(self, count=2, timeout=240):
    for _ in range(count):
      assert self.logged.acquire(timeout=timeout), "".join(self.lines)[-3000:]
    return self

  def output(self, timeout=120):
    self.proc.wait(timeout=timeout)
    self.reader.join(timeout=10)
    return "".join(self.lines)


def _start(workdir, *flags):
  """A long training run in the background, returned once it has logged two steps."""
  return _Background(workdir, *flags).wait_for_steps(2)


# 1. Retention ---------------------------------------------------------------------------------


def test_keep_checkpoints_zero_is_refused_and_deletes_nothing(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  message = _user_error(
    _run("train", workdir, "--config.total_steps=4", "--config.keep_checkpoints=0")
  )
  assert "keep_checkpoints=0 must be > 0" in message
  assert _steps(workdir) == [2, 4]


def test_retention_keeps_the_newest_complete_checkpoints_only(tmp_path):
  _ok(_run("train", tmp_path, "--config.total_steps=6", "--config.keep_checkpoints=1",
           "--config.evals={}"))  # fmt: skip
  assert _steps(tmp_path) == [6]


# 2. Two trainers ------------------------------------------------------------------------------


def test_a_second_trainer_on_the_same_workdir_is_refused_and_a_dead_ones_lock_taken_over(tmp_path):
  first = _start(tmp_path)
  try:
    message = _user_error(_run("train", tmp_path, *LONG))
    assert f"in use by another training run: pid {first.pid} on host" in message
    assert first.proc.poll() is None  # the first run goes on
  finally:
    first.proc.kill()  # kill -9: its lock file still names it, but the OS released the lock
    first.output()
  logged = _logged_steps(tmp_path)
  assert logged == list(range(1, len(logged) + 1))  # one run's rows only
  assert json.loads((tmp_path / "run.lock").read_text())["pid"] == first.pid
  second = _start(tmp_path)
  second.proc.send_signal(signal.SIGTERM)
  out = second.output()
  assert second.proc.returncode == 0, out[-3000:]
  assert f"taking over the stale lock of pid {first.pid}" in out
  assert (tmp_path / "run.lock").read_text() == ""  # released


# 3. / 4. The run's config is the reference ---------------------------------------------------


def test_a_run_with_another_config_is_refused_before_writing_anything(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  before = _snapshot(workdir)
  message = _user_error(_run("train", workdir, "--config.total_steps=4",
                             "--config.model.embed_dim=48"))  # fmt: skip
  assert "model.embed_dim: 32 (run) -> 48 (now)" in message and "--override_config" in message
  # With the override the config check passes, but the checkpoint is another model's.
  message = _user_error(_run("train", workdir, "--config.total_steps=4",
                             "--config.model.embed_dim=48", "--override_config=wide"))  # fmt: skip
  assert "does not fit the configured model" in message
  assert _snapshot(workdir) == before  # config.json, checkpoints, results: byte-identical


def test_evaluating_with_another_behaviour_is_refused_or_written_to_a_tagged_report(
  finished, tmp_path
):
  workdir = _copy(finished, tmp_path)
  before = _snapshot(workdir)
  message = _user_error(_run("evaluate", workdir, "--config.model.text.causal=True"))
  assert "model.text.causal: False (run) -> True (now)" in message
  assert _snapshot(workdir) == before
  _ok(_run("evaluate", workdir, "--config.model.text.causal=True", "--override_config=causal"))
  after = _snapshot(workdir)
  assert {k: v for k, v in after.items() if k in before} == before
  assert set(after) - set(before) == {"eval_step4.causal.json", "eval_step4.causal.md"}
  # Operational fields (batch sizes, cadences, mesh) may differ.
  _ok(_run("evaluate", workdir, "--config.eval_batch_size=16", "--config.mesh.fsdp=2"))


# 5. SIGINT and SIGQUIT ------------------------------------------------------------------------


def test_sigint_and_sigquit_save_stop_with_the_shells_status_and_resume_without_duplicates(
  tmp_path,
):
  for signum in (signal.SIGINT, signal.SIGQUIT):
    run = _start(tmp_path)
    run.proc.send_signal(signum)
    out = run.output()
    assert run.proc.returncode == 128 + signum, out[-3000:]
    stopped = int(out.split("stopped by ")[1].split(" at step ")[1].split(" ")[0])
    assert f"checkpoint {stopped} saved" in out and "Traceback" not in out
    assert _steps(tmp_path)[-1] == stopped
  logged = _logged_steps(tmp_path)
  assert logged == list(range(1, len(logged) + 1))  # resumed: no step logged twice


# 6. NaN guard ----------------------------------------------------------------------------------


def test_nan_guard_keeps_only_parameters_whose_own_loss_was_finite(tmp_path):
  flags = ("--config.total_steps=8", "--config.checkpoint_every=1", "--config.log_every=1",
           "--config.evals={}")  # fmt: skip
  message = _user_error(_run("train", tmp_path, *flags, "--config.optim.lr=1e6"), code=3)
  # Step 1 has lr 0 (warm-up); the update of step 2 (lr 1e6) gives a non-finite loss.
  assert "after the update (not saved) between step 2" in message
  assert "the newest checkpoint, step 1" in message
  assert _steps(tmp_path) == [1]
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), create=False)
  params = ckpt.restore_params(1, trainer.build(clip.get_config("tiny")).abstract_state.params)
  ckpt.close()
  leaves = [np.asarray(x) for x in jax.tree.leaves(params)]
  assert all(np.isfinite(x).all() and np.abs(x).max() < 100 for x in leaves)
  _ok(_run("train", tmp_path, *flags, "--config.optim.lr=1e-3", "--override_config=lowlr"))
  assert _steps(tmp_path)[-1] == 8 and (tmp_path / "final_metrics.lowlr.json").exists()


# 7. Damaged checkpoints ------------------------------------------------------------------------


def _truncate_data_files(step_dir):
  """Cuts every array data file of a checkpoint in half (as a full disk or a killed copy would)."""
  for path in glob.glob(f"{step_dir}/state/**/d/*", recursive=True):
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_that_reads(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  results = json.loads((workdir / "eval_step4.json").read_text())["results"]
  _truncate_data_files(workdir / "checkpoints" / "4")
  result = _ok(_run("evaluate", workdir))
  assert "skipped the damaged checkpoint 4" in result.stderr and "step 2: wrote" in result.stdout
  message = _user_error(_run("evaluate", workdir, "--step=4"))
  assert "checkpoints/4 cannot be read" in message
  # Training moves the damaged step aside, resumes from step 2 and remakes step 4 exactly.
  result = _ok(_run("train", workdir, "--config.total_steps=4", "--config.log_every=1"))
  assert "moved the damaged step 4" in result.stderr
  assert _steps(workdir) == [2, 4] and (workdir / "checkpoints" / "4.damaged").is_dir()
  assert json.loads((workdir / "eval_step4.json").read_text())["results"] == results


def test_an_empty_step_directory_is_skipped_too(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  subprocess.run(["rm", "-rf", str(workdir / "checkpoints" / "4")], check=True)
  (workdir / "checkpoints" / "4").mkdir()
  result = _ok(_run("evaluate", workdir))
  assert "step 2: wrote" in result.stdout


# 8. Unwritable paths ---------------------------------------------------------------------------


def test_unwritable_workdir_or_checkpoint_directory_fails_at_once(tmp_path):
  (tmp_path / "checkpoints").symlink_to("/proc/self/fdinfo")  # unwritable even for root
  start = time.time()
  message = _user_error(_run("train", tmp_path, "--config.total_steps=2"))
  assert f"cannot write to {tmp_path}/checkpoints" in message
  message = _user_error(_run("train", "/proc/self/fdinfo/run", "--config.total_steps=2"))
  assert "cannot write to /proc/self/fdinfo/run" in message
  assert time.time() - start < 120


# 9. Learning rates -----------------------------------------------------------------------------


@pytest.mark.parametrize("lr, message", [("-1e-3", "must be > 0"), ("0", "must be > 0"),
                                         ("nan", "must be finite")])  # fmt: skip
def test_a_negative_zero_or_nan_learning_rate_is_refused(tmp_path, lr, message):
  assert message in _user_error(_run("train", tmp_path, f"--config.optim.lr={lr}"))
  assert not os.listdir(tmp_path)  # nothing written


# 10. Data settings that make the metrics meaningless -------------------------------------------


def test_data_settings_are_checked_before_compiling_and_by_dry_run(tmp_path):
  result = _ok(_run("train", tmp_path, "--dry_run", "--config.data.max_len=4"))
  assert "warning: data.max_len=4 cuts 100.0% of the train captions" in result.stdout
  message = _user_error(_run("train", tmp_path, "--dry_run", "--config.data.val_size=3"))
  assert "the 'val' split has 3 images, fewer than k=[5, 10]" in message
  message = _user_error(_run("train", tmp_path, "--dry_run", "--config.data.test_size=0"))
  assert "the shapes 'test' split has no examples" in message
  assert not os.listdir(tmp_path)


# 11. Flag and config-file errors ---------------------------------------------------------------


def test_unknown_fields_and_missing_config_files_print_one_line(tmp_path):
  message = _user_error(_run("train", tmp_path, "--config.optim.learning_rate=1"))
  assert message.startswith("--config.optim.learning_rate: optim has no field 'learning_rate'")
  for binary in ("train", "evaluate"):
    cmd = [sys.executable, "-m", f"vlalign.{binary}", "--config=configs/nope.py"]
    result = subprocess.run(
      [*cmd, f"--workdir={tmp_path}"], cwd=ROOT, env=_env(), capture_output=True, text=True
    )
    assert "configs/nope.py" in _user_error(result)
  assert not os.listdir(tmp_path)
