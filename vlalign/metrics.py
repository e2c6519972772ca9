"""Metric writing (JSONL + TensorBoard, process 0 only), progress/ETA, and the NaN/Inf guard."""

import json
import math
import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging


class NonFiniteError(RuntimeError):
  """Raised when a logged loss or gradient norm is NaN or Inf."""


def to_floats(metrics: dict[str, Any]) -> dict[str, float]:
  """Fetches a dict of scalars to host floats (one transfer)."""
  host = jax.device_get(metrics)
  return {k: float(np.asarray(v)) for k, v in host.items()}


def check_finite(metrics: dict[str, float], last_good_step: int, step: int) -> None:
  """Raises NonFiniteError naming the step range and the offending keys."""
  bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
  if bad:
    raise NonFiniteError(
      f"non-finite {', '.join(bad)} between step {last_good_step + 1} and step {step} "
      f"(last finite check at step {last_good_step}); the last good checkpoint is kept"
    )


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
  """Steps/s, samples/s and ETA over the interval since the previous call."""

  def __init__(self, total_steps: int, global_batch_size: int, start_step: int):
    self.total_steps = total_steps
    self.batch = global_batch_size
    self.last_step = start_step
    self.last_time = time.perf_counter()

  def update(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    steps_per_s = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    eta = (self.total_steps - step) / steps_per_s if steps_per_s > 0 else float("inf")
    return {
      "steps_per_s": steps_per_s,
      "samples_per_s": steps_per_s * self.batch,
      "eta_s": eta,
    }

  def reset_clock(self, step: int) -> None:
    """Restarts the interval after work that should not count as training (evaluation)."""
    self.last_step, self.last_time = step, time.perf_counter()


class MetricWriter:
  """Writes `{step, **metrics}` lines to `workdir/metrics.jsonl` and TensorBoard; process 0 only."""

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      try:
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(workdir, "tb"))
      except ImportError:  # TensorBoard is optional.
        logging.warning("tensorboardX not installed: metrics go to JSONL only")

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, **metrics}) + "\n")
    if self._tb is not None:
      for key, value in metrics.items():
        self._tb.add_scalar(key, value, step)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_jsonl(path: str) -> list[dict[str, float]]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def progress_line(step: int, total: int, metrics: dict[str, float]) -> str:
  """One human line: step, loss, throughput, ETA."""
  parts = [f"step {step}/{total}"]
  for key in ("train/loss", "train/lr", "train/grad_norm"):
    if key in metrics:
      parts.append(f"{key.split('/')[-1]} {metrics[key]:.4g}")
  if "perf/steps_per_s" in metrics:
    parts.append(
      f"{metrics['perf/steps_per_s']:.2f} steps/s, {metrics['perf/samples_per_s']:.0f} samples/s, "
      f"ETA {format_duration(metrics['perf/eta_s'])}"
    )
  return " | ".join(parts)
