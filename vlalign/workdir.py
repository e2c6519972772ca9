"""Paths and file writes of a run's workdir, for local disks and cloud buckets alike.

Paths are `etils.epath.Path`s (the path library Orbax uses): a local path is made absolute, a URI
(`gs://bucket/run`, `s3://...`) is kept as it is and read and written through its filesystem.
Local writes are atomic (a temporary file renamed over the target), so a crash never leaves a
half-written result; object stores write whole objects anyway.
"""

import os
import uuid

from etils import epath

CONFIG = "config.json"
METRICS = "metrics.jsonl"
FINAL_METRICS = "final_metrics.json"
CHECKPOINTS = "checkpoints"


def is_uri(path: str | os.PathLike) -> bool:
  return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
  """An `epath.Path`: local paths absolute, URIs unchanged."""
  path = os.fspath(path)
  return epath.Path(path if is_uri(path) else os.path.abspath(path))


def write_text(path: epath.Path, text: str) -> None:
  """Writes `text` to `path` atomically on local disks (temporary file + rename)."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if is_uri(path):
    path.write_text(text)
    return
  tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    tmp.write_text(text)
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


def append_text(path: epath.Path, text: str) -> None:
  """Appends `text` to `path` (object stores cannot append: there the object is rewritten)."""
  path = epath.Path(path)
  if is_uri(path):
    old = path.read_text() if path.exists() else ""
    path.write_text(old + text)
    return
  with open(path, "a") as f:
    f.write(text)
    f.flush()
