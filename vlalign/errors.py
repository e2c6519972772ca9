"""Errors in what the user asked for, which the binaries report in one line, without a traceback.

Everything else (a bug) keeps its traceback. `ConfigError` subclasses ValueError, so library
callers that catch ValueError keep working.
"""


class UserError(Exception):
  """A problem with the flags, the config, a path or the workdir's state, with its remedy in the
  message. The binaries print it without a traceback and exit with `exit_code`."""

  exit_code = 2


class ConfigError(UserError, ValueError):
  """A config (or flag) value that cannot run, or a name no registry holds."""


class WorkdirError(UserError, RuntimeError):
  """The workdir cannot be used as asked: in use by another run, holding another config or model,
  not writable."""


class PathError(UserError, FileNotFoundError):
  """A path the config or the flags name does not exist or holds nothing usable."""
