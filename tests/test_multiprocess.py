"""Two localhost processes stand in for a two-host pod: launch/local_multiprocess.sh end to end."""

import os
import subprocess
import sys

from vlalign import checkpoint, metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_processes_train_and_checkpoint(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(PYTHON=sys.executable, DEVICES_PER_PROCESS="2")
  cmd = [
    "bash", "launch/local_multiprocess.sh", "2", "--config=configs/clip.py:tiny",
    f"--workdir={tmp_path}", "--config.total_steps=3", "--config.log_every=1",
    "--config.checkpoint_every=1", "--config.keep_checkpoints=1", "--config.evals={}",
  ]  # fmt: skip
  result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-4000:]
  rows = metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))  # written by process 0 only
  assert [r["step"] for r in rows] == [1, 2, 3]
  # Retention ran on both processes: only the newest checkpoint is left.
  assert checkpoint.Checkpointer(str(tmp_path / "checkpoints")).all_steps() == [3]
  assert "process 1/2, 2 local / 4 global devices" in result.stderr
