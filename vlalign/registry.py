"""Name -> object registries that find their entries without a hand-kept import list.

A registry belongs to a package (`vlalign.losses`, `vlalign.methods`, `vlalign.models`,
`vlalign.evaluation`). Modules register their entries with a decorator,

    @LOSSES.register("itc")
    def itc(outputs, ctx): ...

and the first lookup of an unknown name imports every module of the package, so a new file in the
package is found by itself. Code outside the package (a research fork, a test) registers by being
imported: list its module in `config.imports` (see `import_modules`), and the binaries import it
before anything is built.
"""

import importlib
import inspect
import os
import pkgutil
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from vlalign.errors import ConfigError

T = TypeVar("T")


class UnknownNameError(ConfigError):
  """A config names an entry no registry holds (a typo, or a module missing from
  config.imports)."""


def _origin(obj: Any) -> tuple[str, str] | None:
  """`(source file, qualified name)` of a function or class, None if unknown."""
  try:
    return os.path.realpath(inspect.getfile(obj)), obj.__qualname__
  except (TypeError, AttributeError):
    return None


class Registry(Generic[T]):
  """Entries of one kind (losses, methods, towers, ...) registered by name.

  Attributes:
    kind: what an entry is, for messages ("loss", "method", ...).
    package: the package whose modules are imported to find entries, e.g. "vlalign.losses".
  """

  def __init__(self, kind: str, package: str):
    self.kind = kind
    self.package = package
    self._entries: dict[str, T] = {}
    self._imported = False

  def register(self, name: str) -> Callable[[T], T]:
    """Decorator registering its argument under `name`.

    Registering another object under a taken name is an error; registering the same definition
    again (a module imported under two names, e.g. a test file loaded by pytest and by
    `config.imports`) replaces the entry.
    """

    def wrap(obj: T) -> T:
      old = self._entries.get(name)
      if old is not None and old is not obj and _origin(old) != _origin(obj):
        raise ValueError(f"{self.kind} {name!r} is registered twice: {old!r} and {obj!r}")
      self._entries[name] = obj
      return obj

    return wrap

  def get(self, name: str) -> T:
    """The entry registered under `name`; UnknownNameError listing the known names otherwise."""
    if name not in self._entries:
      self.import_package()
    if name not in self._entries:
      raise UnknownNameError(
        f"unknown {self.kind} {name!r}; registered: {sorted(self._entries)}. An entry defined "
        "outside vlalign is found when its module is listed in config.imports"
      )
    return self._entries[name]

  def names(self) -> list[str]:
    self.import_package()
    return sorted(self._entries)

  def import_package(self) -> None:
    """Imports every module of `package` (once), which registers their entries."""
    if self._imported:
      return
    self._imported = True
    package = importlib.import_module(self.package)
    for module in pkgutil.iter_modules(package.__path__):
      if not module.name.startswith("_"):
        importlib.import_module(f"{self.package}.{module.name}")


def import_modules(names: Iterable[str]) -> None:
  """Imports the modules of `config.imports` (research code outside vlalign that registers
  losses, methods, towers or evaluators); a module that cannot be imported is a clear error."""
  for name in names or ():
    try:
      importlib.import_module(name)
    except ImportError as e:
      raise ImportError(f"config.imports lists {name!r}, which cannot be imported: {e}") from e
