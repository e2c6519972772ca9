import math

import pytest

from vlalign import metrics


def test_check_finite_names_the_step_range_keys_and_the_checkpoint_to_resume_from():
  metrics.check_finite({"train/loss": 1.0}, 11, 20)
  with pytest.raises(metrics.NonFiniteError, match=r"train/loss between steps 11-20; resume"):
    metrics.check_finite({"train/loss": math.nan, "train/lr": 1.0}, 11, 20, resume="resume")
  with pytest.raises(metrics.NonFiniteError, match="grad_norm in x between step 5$"):
    metrics.check_finite({"train/grad_norm": math.inf}, 5, 5, "in x")


def test_writer_appends_jsonl(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path), enabled=True)
  writer.write(1, {"train/loss": 2.0})
  writer.write(2, {"train/loss": 1.5})
  writer.close()
  rows = metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert rows == [{"step": 1, "train/loss": 2.0}, {"step": 2, "train/loss": 1.5}]
  assert (tmp_path / "tb").is_dir()


def test_progress_reports_rates_and_eta():
  progress = metrics.Progress(total_steps=100, global_batch_size=8, start_step=0)
  progress.last_time -= 10.0  # pretend 10 s passed
  out = progress.update(50)
  assert out["steps_per_s"] == pytest.approx(5.0, rel=0.05)
  assert out["samples_per_s"] == pytest.approx(40.0, rel=0.05)
  assert out["eta_s"] == pytest.approx(10.0, rel=0.05)
  line = metrics.progress_line(
    50, 100, {"train/loss": 1.0, **{f"perf/{k}": v for k, v in out.items()}}
  )
  assert "step 50/100" in line and "ETA 0m10s" in line


def test_format_duration():
  assert metrics.format_duration(3725) == "1h02m05s"
  assert metrics.format_duration(65) == "1m05s"
