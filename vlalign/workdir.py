"""A run's workdir: paths and writes (local disks and buckets alike), the write probe, the lock,
and the run's reference config.

Paths are `etils.epath.Path`s (the path library Orbax uses): a local path is made absolute, a URI
(`gs://bucket/run`, `s3://...`) is kept as it is and read and written through its filesystem.
Local writes are atomic (a temporary file renamed over the target), so a crash never leaves a
half-written result; object stores write whole objects anyway.
"""

import fcntl
import fnmatch
import json
import os
import re
import socket
import sys
import threading
import time
import uuid
from typing import Any

from absl import logging
from etils import epath

from vlalign.errors import ConfigError, WorkdirError

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


def write_bytes(path: epath.Path, data: bytes) -> None:
  """Writes `data` to `path` atomically on local disks (temporary file + rename)."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if is_uri(path):
    path.write_bytes(data)
    return
  tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    tmp.write_bytes(data)
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


def write_text(path: epath.Path, text: str) -> None:
  """Writes `text` to `path` atomically on local disks (temporary file + rename)."""
  write_bytes(path, text.encode())


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


def check_writable(directory: epath.Path) -> None:
  """Creates `directory` and writes and removes a probe file in it; WorkdirError at once when
  that fails (instead of an async checkpoint write timing out minutes later)."""
  directory = epath.Path(directory)
  probe = directory / f".write-probe-{socket.gethostname()}-{os.getpid()}"
  try:
    directory.mkdir(parents=True, exist_ok=True)
    probe.write_text("probe")
    probe.unlink()
  except OSError as e:
    raise WorkdirError(f"cannot write to {directory}: {e}") from e


# --- Lock ---------------------------------------------------------------------------------------

LOCK = "run.lock"
STALE_AFTER_S = 900  # A bucket lock whose heartbeat is older than this is taken over.


def _owner() -> dict:
  return {
    "host": socket.gethostname(),
    "pid": os.getpid(),
    "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    "heartbeat": time.time(),
    "command": " ".join(sys.argv),
  }


def _describe(owner: dict) -> str:
  return (
    f"pid {owner.get('pid')} on host {owner.get('host')} since {owner.get('started')} "
    f"({owner.get('command', '?')})"
  )


def _parse(text: str) -> dict | None:
  try:
    owner = json.loads(text)
  except ValueError:
    return None
  return owner if isinstance(owner, dict) else None


class WorkdirLock:
  """Exclusive lock of a workdir by one training run (`<workdir>/run.lock`, holding the owner's
  host, pid, start time and command).

  On a local or network filesystem the lock is an `flock` on that file: the operating system
  releases it when the owner exits, however it dies (kill -9 included), so a stale lock (the file
  still names a dead owner) is simply taken over, with a warning naming it. On a bucket (gs://,
  s3://), which has no locks, the owner rewrites a heartbeat every minute from a background thread
  and a lock whose heartbeat is older than `STALE_AFTER_S` is taken over; two runs starting within
  the same second could both win there, so start one run per bucket workdir.
  """

  def __init__(self, workdir: str | os.PathLike):
    self.path = as_path(workdir) / LOCK
    self._fd = None
    self._stop = threading.Event()
    self._thread = None

  def acquire(self) -> None:
    """Takes the lock, or raises WorkdirError naming the run that holds it."""
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if is_uri(self.path):
      self._acquire_bucket()
    else:
      self._acquire_local()

  def _acquire_local(self) -> None:
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      owner = _parse(os.pread(fd, 1 << 16, 0).decode(errors="replace")) or {}
      os.close(fd)
      raise WorkdirError(
        f"{self.path.parent} is in use by another training run: {_describe(owner)}. Wait for it "
        "to finish (or stop it), or use another --workdir"
      ) from None
    previous = _parse(os.pread(fd, 1 << 16, 0).decode(errors="replace"))
    if previous:
      logging.warning("taking over the stale lock of %s (no longer running)", _describe(previous))
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_owner()).encode(), 0)
    os.fsync(fd)
    self._fd = fd

  def _acquire_bucket(self) -> None:
    if self.path.exists():
      owner = _parse(self.path.read_text()) or {}
      age = time.time() - float(owner.get("heartbeat", 0))
      if age < STALE_AFTER_S:
        raise WorkdirError(
          f"{self.path.parent} is in use by another training run: {_describe(owner)}, last "
          f"heartbeat {age:.0f}s ago. Wait for it, or use another --workdir"
        )
      logging.warning("taking over the stale lock of %s (heartbeat %.0fs ago)", _describe(owner),
                      age)  # fmt: skip
    mine = _owner()
    self.path.write_text(json.dumps(mine))
    time.sleep(1.0)  # Let a concurrent writer's object land, then check who won.
    if (_parse(self.path.read_text()) or {}).get("pid") != mine["pid"]:
      raise WorkdirError(f"{self.path.parent}: another run took the lock at the same time")
    self._thread = threading.Thread(target=self._heartbeat, daemon=True)
    self._thread.start()

  def _heartbeat(self) -> None:
    while not self._stop.wait(60.0):
      try:
        owner = _parse(self.path.read_text()) or {}
        owner["heartbeat"] = time.time()
        self.path.write_text(json.dumps(owner))
      except OSError as e:  # A missed heartbeat is not fatal; the next one may land.
        logging.warning("lock heartbeat failed: %s", e)

  def release(self) -> None:
    """Releases the lock; the file is emptied (a file naming an owner is a stale lock)."""
    if self._fd is not None:
      os.ftruncate(self._fd, 0)
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None
      self.path.unlink(missing_ok=True)

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


# --- The run's reference config -----------------------------------------------------------------

# Fields that change how a run is operated, not what it computes: they may differ between the
# invocations of one run (fnmatch patterns on dotted paths).
OPERATIONAL_FIELDS = (
  "log_every",
  "checkpoint_every",
  "keep_checkpoints",
  "keep_period",
  "eval_batch_size",
  "mesh.*",
  "data.num_threads",
  "data.prefetch_buffer_size",
  "evals.*.every_steps",
  "evals.*.batch_size",
)
# Fields that cannot change what an evaluation of given parameters computes.
TRAINING_ONLY_FIELDS = (
  "total_steps",
  "batch_size",
  "seed",
  "optim.*",
  "losses.*",
  "init.*",
  "data.augment*",
  "data.train_size",
)
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def config_dict(config: Any) -> dict:
  """A ConfigDict as the plain JSON data of `config.json` (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """`{"optim.lr": 1e-3, ...}`; empty dicts and lists are leaves."""
  if isinstance(tree, dict) and tree:
    out = {}
    for key, value in tree.items():
      out.update(flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def config_differences(
  reference: dict, current: dict, ignore: tuple[str, ...] = OPERATIONAL_FIELDS
) -> list[tuple[str, Any, Any]]:
  """`[(field, reference value, current value)]` for fields that differ, absent ones included."""
  ref, cur = flatten(reference), flatten(current)
  missing = object()
  diffs = []
  for field in sorted(set(ref) | set(cur)):
    if any(fnmatch.fnmatchcase(field, pattern) for pattern in ignore):
      continue
    a, b = ref.get(field, missing), cur.get(field, missing)
    if a != b:
      diffs.append((field, "(absent)" if a is missing else a, "(absent)" if b is missing else b))
  return diffs


def check_tag(tag: str | None) -> str:
  """`""` for no tag, else `.<tag>` for file names; a tag must be a plain name."""
  if not tag:
    return ""
  if not _TAG.fullmatch(tag):
    raise ConfigError(f"--override_config={tag!r}: use letters, digits, '_', '-', '.'")
  return f".{tag}"


def config_path(workdir: epath.Path, tag: str = "") -> epath.Path:
  return epath.Path(workdir) / f"config{tag}.json"


def check_config_matches(
  workdir: epath.Path, config: Any, tag: str, ignore: tuple[str, ...], action: str
) -> None:
  """Raises WorkdirError naming the fields in which `config` differs from the run's reference
  (`config.json`; with an override `tag`, `config<tag>.json` if it exists). A workdir without a
  reference config matches anything."""
  reference_path = config_path(workdir, tag) if tag else config_path(workdir)
  if not reference_path.exists():
    return
  reference = json.loads(reference_path.read_text())
  diffs = config_differences(reference, config_dict(config), ignore)
  if not diffs:
    return
  lines = [f"  {field}: {a!r} (run) -> {b!r} (now)" for field, a, b in diffs[:20]]
  if len(diffs) > 20:
    lines.append(f"  ... and {len(diffs) - 20} more")
  if tag:
    remedy = (
      f"The tag {tag[1:]!r} is already used by another config in this workdir; pick another "
      "--override_config name."
    )
  else:
    remedy = (
      f"Use the run's config or a fresh --workdir; to {action} with these values anyway, pass "
      "--override_config=NAME: its results then go to files tagged NAME (config.NAME.json, "
      "final_metrics.NAME.json, eval_step<N>.NAME.json/.md) and nothing of the run's is "
      "overwritten or deleted."
    )
  raise WorkdirError(
    f"the config differs from the one this workdir's run was started with "
    f"({reference_path}):\n" + "\n".join(lines) + "\n" + remedy
  )
