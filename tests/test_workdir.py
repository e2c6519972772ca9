"""Workdir files on local disks and on buckets (a `gs://` path backed by fsspec's in-memory
filesystem stands in for Cloud Storage), and the TPU launcher's argument quoting."""

import os
import shlex
import subprocess

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from vlalign import metrics
from vlalign import workdir as workdir_lib
from vlalign.evaluation import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _FakeCloudStorage(MemoryFileSystem):
  """fsspec's in-memory filesystem answering for gs:// (etils asks fsspec for 'gcs')."""

  protocol = ("gs", "gcs")


@pytest.fixture
def bucket():
  """`gs://` served from memory for this test."""
  for protocol in _FakeCloudStorage.protocol:
    fsspec.register_implementation(protocol, _FakeCloudStorage, clobber=True)
  _FakeCloudStorage.store.clear()
  yield "gs://bucket/run"
  _FakeCloudStorage.store.clear()


def test_local_paths_are_made_absolute_and_uris_kept(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert str(workdir_lib.as_path("runs/a")) == str(tmp_path / "runs" / "a")
  assert str(workdir_lib.as_path("gs://bucket/run")) == "gs://bucket/run"


def test_local_writes_are_atomic_and_leave_no_temporary_file(tmp_path):
  path = workdir_lib.as_path(tmp_path / "sub" / "config.json")
  workdir_lib.write_text(path, "one")
  workdir_lib.write_text(path, "two")
  workdir_lib.append_text(path, "+three")
  assert path.read_text() == "two+three"
  assert os.listdir(tmp_path / "sub") == ["config.json"]


def test_config_metrics_and_reports_on_a_bucket(bucket, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  run = workdir_lib.as_path(bucket)
  workdir_lib.write_text(run / workdir_lib.CONFIG, '{"name": "x"}')
  writer = metrics.MetricWriter(bucket, enabled=True, tensorboard=False)
  writer.write(1, {"train/loss": 2.0})
  writer.write(2, {"train/loss": 1.5})
  writer.write(3, {"train/loss": 1.0})
  assert writer.drop_after(2) == 1
  writer.close()
  json_path, md_path = report.write_report({"ev": {"r1": 50.0}}, bucket, 2, header="h")
  assert json_path == "gs://bucket/run/eval_step2.json"
  assert [r["step"] for r in metrics.read_jsonl(f"{bucket}/metrics.jsonl")] == [1, 2]
  assert (run / workdir_lib.CONFIG).read_text() == '{"name": "x"}'
  assert "| ev | 50.00 |" in (run / "eval_step2.md").read_text()
  assert not os.listdir(tmp_path)  # nothing landed on the local disk


def test_tpu_pod_launcher_keeps_the_quoting_of_its_arguments(tmp_path):
  fake_gcloud = tmp_path / "gcloud"
  log = tmp_path / "args"
  fake_gcloud.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {log}\n')
  fake_gcloud.chmod(0o755)
  args = ["--config=configs/clip.py:full", "--config.name=my run's name", "--workdir=gs://b/x y"]
  env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "TPU_NAME": "t", "ZONE": "z"}
  result = subprocess.run(
    ["bash", "launch/tpu_pod.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True
  )
  assert result.returncode == 0, result.stderr
  command = next(a for a in log.read_text().splitlines() if a.startswith("--command="))
  remote = shlex.split(command[len("--command=") :].split("&&", 1)[1])
  assert remote[:4] == [".venv/bin/python", "-m", "vlalign.train", "--jax_distributed"]
  assert remote[4:] == args
