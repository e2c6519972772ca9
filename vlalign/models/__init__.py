"""Encoders ("towers") and the composite models built from them, both picked by name from config.

* `TOWERS`: `model.image.kind` / `model.text.kind` name a registered tower; the tower config's other
  fields are its constructor's arguments (plus `dtype`, `remat`, `remat_policy` and `scan_layers`
  from `config.model`). An image tower maps
  `images [B, H, W, 3] -> {"cls": [B, D], "tokens": [B, N, D]}`, a text tower
  `(ids [B, L], mask [B, L]) -> {"cls": [B, D], "tokens": [B, L, D]}`; a text tower whose token
  table can tie an MLM decoder also has `embedding_table() -> [V, D]`. A tower may take a
  `tokens` argument: with `tokens=False` it returns `cls` alone and may skip the work only the
  tokens need (`tower_outputs`).
* `MODELS`: `model.name` names a registered composite (`two_tower`, `albef`) taking the
  `config.model` ConfigDict.

A new tower is a Linen module in a file of this package (or of a module in `config.imports`)
decorated with `@TOWERS.register("<kind>")`; no composite model changes.
"""

import dataclasses
import inspect
from typing import Any

import flax.linen as nn
import jax

from vlalign.errors import ConfigError
from vlalign.registry import Registry

TOWERS: Registry[type[nn.Module]] = Registry("tower", "vlalign.models")
MODELS: Registry[type[nn.Module]] = Registry("model", "vlalign.models")

_NOT_CONFIG = {"parent", "name"}
# `common` fields a tower need not have, and their defaults: a tower without one is refused only
# when the config asks for another value (`vlalign/models/scan.py`).
OPTIONAL_COMMON = {"scan_layers": False, "remat_policy": "full"}


def tower_fields(kind: str) -> set[str]:
  """The config fields the tower `kind` accepts (its dataclass fields)."""
  cls = TOWERS.get(kind)
  return {f.name for f in dataclasses.fields(cls) if f.init} - _NOT_CONFIG


def build_tower(tower_config: Any, where: str, **common: Any) -> nn.Module:
  """The tower `tower_config.kind` built from the other fields of `tower_config` and `common`.

  Args:
    tower_config: e.g. `config.model.image`, with `kind` and the tower's own fields.
    where: the config path, for messages (e.g. "model.image").
    **common: fields every tower receives (`dtype`, `remat`, `remat_policy`, `scan_layers`), used
      when the tower has them; a tower without `scan_layers` / `remat_policy` is a ConfigError
      when they are not at their defaults (`OPTIONAL_COMMON`).
  """
  fields = dict(tower_config.to_dict() if hasattr(tower_config, "to_dict") else tower_config)
  if "kind" not in fields:
    raise ConfigError(f"config.{where} needs a 'kind'; registered towers: {TOWERS.names()}")
  kind = fields.pop("kind")
  cls = TOWERS.get(kind)
  allowed = tower_fields(kind)
  unknown = sorted(set(fields) - allowed)
  if unknown:
    raise ConfigError(
      f"config.{where} has fields {unknown} that tower kind {kind!r} does not take; "
      f"it takes {sorted(allowed - set(common))}"
    )
  unsupported = {
    k: default
    for k, default in OPTIONAL_COMMON.items()
    if k in common and common[k] != default and k not in allowed
  }
  if unsupported:
    raise ConfigError(
      f"config.model sets {sorted(unsupported)}, which tower kind {kind!r} (config.{where}) does "
      f"not implement; leave them at their defaults {unsupported}"
    )
  extra = {k: v for k, v in common.items() if k in allowed}
  return cls(**fields, **extra)


def build_model(model_config: Any) -> nn.Module:
  """The composite model named by `model_config.name`, configured by `model_config`."""
  if "name" not in model_config:
    raise ConfigError(f"config.model needs a 'name'; registered models: {MODELS.names()}")
  return MODELS.get(model_config.name)(model_config)


def tower_outputs(
  tower: nn.Module, *inputs: jax.Array, train: bool, tokens: bool
) -> dict[str, jax.Array]:
  """A tower's `{"cls", "tokens"}` on `inputs`; with `tokens=False` its `cls` alone.

  A tower whose `__call__` takes a `tokens` argument (`vit`, `text_transformer`) is told that its
  tokens are not needed, and computes its last block for the pooled token only; any other tower
  runs in full and its tokens are dropped here.
  """
  if tokens:
    return tower(*inputs, train)
  if "tokens" in inspect.signature(type(tower).__call__).parameters:
    return tower(*inputs, train, tokens=False)
  return {"cls": tower(*inputs, train)["cls"]}
