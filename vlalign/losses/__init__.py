"""Loss registry.

Every loss is a pure function

    fn(outputs, teacher, batch, **kwargs) -> (scalar, metrics)

where `outputs` is the student model's output dict (see `vlalign.models.model`), `teacher` is the
teacher's output dict plus any state the loss reads (queues, step), or `None` for methods without a
teacher, and `batch` is the global input batch. Losses are written on *global* arrays; under
`jax.jit` with sharded inputs XLA inserts the collectives. `metrics` is a dict of scalars, logged
under `train/<loss name>/<key>`.

A config names losses in `config.losses`, a dict of entries `{fn: <registered name>, weight: float,
**kwargs}` keyed by the name the loss is logged under (`fn` defaults to the key). The step sums
`weight * value` over the entries.
"""

from collections.abc import Callable
from typing import Any

import jax

Metrics = dict[str, jax.Array]
LossFn = Callable[..., tuple[jax.Array, Metrics]]

_REGISTRY: dict[str, LossFn] = {}


def register(name: str) -> Callable[[LossFn], LossFn]:
  """Decorator: registers `fn` under `name`."""

  def wrap(fn: LossFn) -> LossFn:
    if name in _REGISTRY:
      raise ValueError(f"loss {name!r} is registered twice")
    _REGISTRY[name] = fn
    return fn

  return wrap


def get(name: str) -> LossFn:
  """Returns the loss registered under `name`, with a clear error for unknown names."""
  _import_all()
  if name not in _REGISTRY:
    raise KeyError(f"unknown loss {name!r}; registered: {sorted(_REGISTRY)}")
  return _REGISTRY[name]


def names() -> list[str]:
  _import_all()
  return sorted(_REGISTRY)


def parse_entries(losses_config: Any) -> list[tuple[str, LossFn, float, dict[str, Any]]]:
  """Turns `config.losses` into `[(log_name, fn, weight, kwargs)]`, validating every entry."""
  entries = []
  for log_name, entry in dict(losses_config).items():
    entry = dict(entry)
    fn = get(entry.pop("fn", log_name))
    if "weight" not in entry:
      raise ValueError(f"config.losses.{log_name} needs a 'weight'")
    weight = float(entry.pop("weight"))
    entries.append((log_name, fn, weight, entry))
  if not entries:
    raise ValueError("config.losses is empty: a run needs at least one loss")
  return entries


def _import_all() -> None:
  # Importing the modules registers their losses.
  from vlalign.losses import (  # noqa: F401
    contrastive,  # noqa: F401
    intra,
    local_mi,
    matching,
    momentum,
  )
