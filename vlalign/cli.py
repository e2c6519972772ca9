"""What the binaries share: flag parsing and user errors reported in one line, without a traceback.

    if __name__ == "__main__":
      cli.run(main)

A bad flag, an unknown config field, a config file that is missing or fails to load, and any
`vlalign.errors.UserError` print `error: <message>` on stderr and exit with status 2. Other
exceptions (bugs) keep their traceback.

Every binary run this way takes `--compilation_cache_dir=DIR` (default: off): JAX's persistent
compilation cache, so a restarted run reads its compiled step instead of compiling it again; and
`--retain_host_memory` (default: on): glibc's malloc keeps freed memory for reuse, so that XLA's
per-step CPU buffers do not fault in fresh pages every step (`perf.retain_host_memory`). On the
CPU, large random draws (dropout masks) hash their counters in one fused loop instead of JAX's
5-iteration loop, with the same bits (`perf.unroll_threefry_on_cpu`; both in `perf.set_up_host`).
"""

import os
import runpy
import sys
from collections.abc import Callable
from typing import Any

from absl import app, flags, logging

from vlalign import errors

_RETAIN_HOST_MEMORY = flags.DEFINE_bool(
  "retain_host_memory",
  True,
  "Keep the memory the process frees for its next allocations (glibc malloc: one arena, no mmap "
  "for large blocks, no trimming): XLA's CPU buffers are reused instead of faulting in fresh "
  "pages every step (~20% of a CPU train step). The process keeps its peak host memory.",
)

_LOAD_ERRORS = (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError)

_COMPILATION_CACHE_DIR = flags.DEFINE_string(
  "compilation_cache_dir",
  "",
  "JAX's persistent compilation cache (local path or gs://): compilations of 1 s or more are "
  "written there and read back by later runs on the same devices and versions. Empty: off. Only "
  "a directory that no one else can write (the cache holds executable code).",
)


def fail(message: str, exit_code: int = 2) -> None:
  """Prints `error: <message>` and exits at once. `os._exit`, not `sys.exit`: background threads
  of a failed read (TensorStore, Orbax) must not print their own tracebacks while the interpreter
  shuts down. Every checkpoint write has been waited for before a user error reaches here."""
  logging.flush()
  sys.stdout.flush()
  sys.stderr.write(f"error: {message}\n")
  sys.stderr.flush()
  os._exit(exit_code)


def _missing_field(config: Any, path: str) -> str | None:
  """For an override `a.b.c`, a description of the first component `config` lacks, or None."""
  node, parts = config, path.split(".")
  for depth, key in enumerate(parts):
    if not hasattr(node, "keys") or key not in node:
      where = ".".join(parts[:depth]) or "the config"
      fields = sorted(node.keys()) if hasattr(node, "keys") else []
      return f"{where!s} has no field {key!r} (its fields: {', '.join(fields)})"
    node = node[key]
  return None


def _load_config(argv: list[str]) -> Any:
  """The config `--config=path[:arg]` of `argv` without overrides, or None if it fails to load."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None:
    return None
  path, _, arg = spec.partition(":")
  try:
    get_config = runpy.run_path(path)["get_config"]
    return get_config(arg) if arg else get_config()
  except Exception:  # noqa: BLE001 - the config itself fails: the original message says why.
    return None


def _one_line(message: str) -> str:
  """A config-loading message without the traceback config_flags embeds in it: its first line
  and the exception's own line (or the OS error of a file that cannot be read)."""
  lines = [line.strip() for line in message.strip().strip('"').splitlines() if line.strip()]
  if not lines:
    return message
  if any(line.startswith("Traceback") for line in lines) or any("[Errno" in x for x in lines):
    head = lines[0].rstrip(":")
    cause = next((x for x in reversed(lines) if "[Errno" in x), lines[-1])
    return f"{head}: {cause}" if cause != head else head
  return " ".join(lines)


def _explain(error: Exception, argv: list[str]) -> str:
  """A one-line message for a flag-parsing failure, naming the bad `--config.*` override."""
  message = _one_line(str(error))
  overrides = [a.split("=", 1)[0][len("--config.") :] for a in argv if a.startswith("--config.")]
  config = _load_config(argv)
  if config is not None:
    for path in overrides:
      missing = _missing_field(config, path)
      if missing:
        return f"--config.{path}: {missing}; an unknown field is an error, not a no-op"
  return message


def parse_flags(argv: list[str]) -> list[str]:
  """`FLAGS(argv)`, with every parsing or config-loading failure reported as a user error."""
  try:
    return flags.FLAGS(argv)
  except _LOAD_ERRORS as e:
    fail(_explain(e, argv))
  return []


def config_value(config_flag: Any) -> Any:
  """The value of a `config_flags` flag; a config file that is missing or fails to load (its
  `get_config` raised) is a user error."""
  try:
    value = config_flag.value
    value.keys()  # config_flags defers the error of a file that failed to load to first use
    return value
  except _LOAD_ERRORS as e:
    fail(f"--config: {_one_line(str(e))}")
  return None


def _is_closed_loop_noise(exc_type: type, exc: BaseException | None) -> bool:
  """TensorStore's callbacks of a failed checkpoint read that land after Orbax closed its event
  loop: harmless, but each prints a traceback over the one-line message."""
  return issubclass(exc_type, RuntimeError) and str(exc) == "Event loop is closed"


def _quiet_closed_loop_noise() -> None:
  """Filters that noise from both ways Python reports it: `sys.excepthook` and, for an exception
  raised in a callback TensorStore runs from its own thread, `sys.unraisablehook`."""
  default_excepthook, default_unraisablehook = sys.excepthook, sys.unraisablehook

  def excepthook(exc_type, exc, tb):
    if not _is_closed_loop_noise(exc_type, exc):
      default_excepthook(exc_type, exc, tb)

  def unraisablehook(unraisable):
    if not _is_closed_loop_noise(unraisable.exc_type, unraisable.exc_value):
      default_unraisablehook(unraisable)

  sys.excepthook, sys.unraisablehook = excepthook, unraisablehook


def run(main: Callable[[list[str]], Any]) -> None:
  """`app.run(main)` with one-line user errors (see the module docstring)."""
  _quiet_closed_loop_noise()

  def guarded(argv: list[str]) -> Any:
    try:
      from vlalign import perf

      perf.set_up_host(retain_memory=_RETAIN_HOST_MEMORY.value)
      if _COMPILATION_CACHE_DIR.value:
        perf.enable_compilation_cache(_COMPILATION_CACHE_DIR.value)
      return main(argv)
    except errors.UserError as e:
      fail(str(e), e.exit_code)
    return None

  app.run(guarded, flags_parser=parse_flags)
