"""Metric writing (JSONL + TensorBoard, process 0 only), progress/ETA/MFU, and the NaN/Inf guard."""

import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging

from vlalign import perf
from vlalign import workdir as workdir_lib
from vlalign.errors import UserError


class NonFiniteError(UserError, RuntimeError):
  """A logged metric, or the loss of parameters about to be saved, is NaN or Inf: the run diverged.
  The binaries report it in one line (with the checkpoint to resume from) and exit with 3."""

  exit_code = 3


def to_floats(metrics: dict[str, Any]) -> dict[str, float]:
  """Fetches a dict of scalars to host floats (one transfer)."""
  host = jax.device_get(metrics)
  return {k: float(np.asarray(v)) for k, v in host.items()}


def check_finite(
  metrics: dict[str, float],
  first_step: int,
  last_step: int,
  what: str = "",
  resume: str | Callable[[], str] = "",
) -> None:
  """Raises NonFiniteError naming the offending keys, the steps since the last check, `what` was
  checked, and `resume` (which checkpoint to resume from; a callable is called only on failure)."""
  bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
  if not bad:
    return
  resume = resume() if callable(resume) else resume
  span = f"step {last_step}" if first_step == last_step else f"steps {first_step}-{last_step}"
  message = f"non-finite {', '.join(bad)}{' ' + what if what else ''} between {span}"
  raise NonFiniteError(message + (f"; {resume}" if resume else ""))


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
  """Steps/s, samples/s and ETA over the interval since the previous call; with the step's FLOPs
  per device (`perf.step_flops`) also the achieved TFLOP/s per device, and with the device's peak
  TFLOP/s the model FLOPs utilisation (MFU)."""

  def __init__(
    self,
    total_steps: int,
    global_batch_size: int,
    start_step: int,
    flops_per_step: float | None = None,
    peak_tflops: float | None = None,
  ):
    self.total_steps = total_steps
    self.batch = global_batch_size
    self.last_step = start_step
    self.last_time = time.perf_counter()
    self.flops_per_step = flops_per_step
    self.peak_tflops = peak_tflops

  def update(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    steps_per_s = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    eta = (self.total_steps - step) / steps_per_s if steps_per_s > 0 else float("inf")
    return {
      "steps_per_s": steps_per_s,
      "samples_per_s": steps_per_s * self.batch,
      "eta_s": eta,
      **perf.utilisation(self.flops_per_step, steps_per_s, self.peak_tflops),
    }

  def reset_clock(self, step: int) -> None:
    """Restarts the interval after work that should not count as training (evaluation)."""
    self.last_step, self.last_time = step, time.perf_counter()


class MetricWriter:
  """Writes `{step, **metrics}` lines to `workdir/metrics.jsonl` and TensorBoard; process 0 only."""

  def __init__(self, workdir: str, enabled: bool | None = None, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    workdir = workdir_lib.as_path(workdir)
    self.path = workdir / workdir_lib.METRICS
    self._tb = None
    if self.enabled:
      workdir.mkdir(parents=True, exist_ok=True)
      if tensorboard:
        self._tb = _tensorboard_writer(os.fspath(workdir / "tb"))

  def drop_after(self, step: int) -> int:
    """Removes the rows of steps after `step` (logged by a run that crashed before its next
    checkpoint), so that a resumed run never logs a step twice. Returns how many were dropped."""
    if not self.enabled or not self.path.exists():
      return 0
    lines = self.path.read_text().splitlines(keepends=True)
    keep = [line for line in lines if not line.strip() or json.loads(line)["step"] <= step]
    if len(keep) < len(lines):
      workdir_lib.write_text(self.path, "".join(keep))
      logging.info("dropped %d rows after step %d from %s", len(lines) - len(keep), step, self.path)
    return len(lines) - len(keep)

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    workdir_lib.append_text(self.path, json.dumps({"step": step, **metrics}) + "\n")
    if self._tb is not None:
      for key, value in metrics.items():
        self._tb.add_scalar(key, value, step)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _tensorboard_writer(logdir: str) -> Any:
  """A tensorboardX SummaryWriter, or None (with a warning) where it cannot write: tensorboardX
  missing, or a bucket it has no client library for (it writes gs:// with google-cloud-storage
  and s3:// with boto3)."""
  scheme = logdir.split("://")[0] if workdir_lib.is_uri(logdir) else None
  if scheme not in (None, "gs", "s3"):
    logging.warning("TensorBoard cannot write to %s: metrics go to JSONL only", logdir)
    return None
  try:
    from tensorboardX import SummaryWriter

    return SummaryWriter(logdir)
  except ImportError as e:  # TensorBoard (or its bucket client) is optional.
    logging.warning("no TensorBoard events (%s): metrics go to JSONL only", e)
    return None


def read_jsonl(path: str | os.PathLike) -> list[dict[str, float]]:
  text = workdir_lib.as_path(path).read_text()
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def progress_line(step: int, total: int, metrics: dict[str, float]) -> str:
  """One human line: step, loss, throughput, ETA."""
  parts = [f"step {step}/{total}"]
  for key in ("train/loss", "train/lr", "train/grad_norm"):
    if key in metrics:
      parts.append(f"{key.split('/')[-1]} {metrics[key]:.4g}")
  if "perf/steps_per_s" in metrics:
    rate = (
      f"{metrics['perf/steps_per_s']:.2f} steps/s, {metrics['perf/samples_per_s']:.0f} samples/s"
    )
    if "perf/tflops_per_device" in metrics:
      rate += f", {metrics['perf/tflops_per_device']:.3g} TFLOP/s/device"
    if "perf/mfu" in metrics:
      rate += f", MFU {100 * metrics['perf/mfu']:.1f}%"
    parts.append(f"{rate}, ETA {format_duration(metrics['perf/eta_s'])}")
  return " | ".join(parts)
