"""Starting values of parameter sub-trees from elsewhere: `config.init`.

`config.init` maps an entry name to where one sub-tree of a fresh run's parameters comes from:

    config.init = dict(
      text=dict(loader="checkpoint", target="text_encoder", workdir="workdirs/clip_a"),
    )

* `target`: the sub-tree, a "/"-separated path below the `params` collection (`text_encoder`,
  `image_encoder/encoder`).
* `loader`: a registered loader (`LOADERS`); its other fields are the loader's.

The `checkpoint` loader reads the parameters (nothing else) of another run: fields `workdir` (a run
directory holding `checkpoints/`, or a checkpoint directory itself), `step` (default: its latest)
and `source` (the sub-tree there; default: `target`). The stored arrays must have the names and
shapes of the target sub-tree, and load straight onto the target shardings.

Loaded values replace the random initialisation before anything derived from the parameters (an
EMA teacher, the optimizer state) is made. They apply to a fresh run only: a run resuming from its
own checkpoint restores everything from there.
"""

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging

from vlalign import checkpoint as ckpt_lib
from vlalign import pytrees
from vlalign import workdir as workdir_lib
from vlalign.errors import ConfigError, PathError
from vlalign.registry import Registry

# (entry fields, target keys, abstract target sub-tree, config.model) -> the sub-tree's values.
Loader = Callable[[dict[str, Any], tuple[str, ...], Any, Any], Any]
LOADERS: Registry[Loader] = Registry("init loader", "vlalign.weights")


def split_path(path: str, where: str) -> tuple[str, ...]:
  keys = tuple(k for k in str(path).split("/") if k)
  if not keys:
    raise ConfigError(f"config.{where} must name a parameter sub-tree, got {path!r}")
  return keys


def get_subtree(params: Any, keys: tuple[str, ...], where: str) -> Any:
  """`params["params"][k0][k1]...`, or an error listing what exists at the failing level."""
  node = params[pytrees.PARAMS]
  for depth, key in enumerate(keys):
    if not isinstance(node, dict) or key not in node:
      have = sorted(node) if isinstance(node, dict) else []
      raise ConfigError(
        f"config.{where}: the model has no parameter sub-tree {'/'.join(keys[: depth + 1])!r}; "
        f"at that level it has {have}"
      )
    node = node[key]
  return node


def replace_subtree(params: Any, keys: tuple[str, ...], value: Any) -> Any:
  """A copy of `params` with `params["params"][keys...]` replaced by `value` (dicts only)."""

  def put(node: dict, rest: tuple[str, ...]) -> dict:
    if not rest:
      return value
    return {**node, rest[0]: put(node[rest[0]], rest[1:])}

  return {**params, pytrees.PARAMS: put(params[pytrees.PARAMS], keys)}


def count(tree: Any) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@LOADERS.register("checkpoint")
def load_from_checkpoint(
  entry: dict[str, Any], target: tuple[str, ...], abstract: Any, model_config: Any = None
) -> Any:
  """The sub-tree `entry["source"]` (default `target`) of another run's parameters."""
  unknown = set(entry) - {"workdir", "step", "source"}
  if unknown or "workdir" not in entry:
    raise ConfigError(f"init loader 'checkpoint' takes workdir, step, source; got {sorted(entry)}")
  root = workdir_lib.as_path(entry["workdir"])
  directory = root / workdir_lib.CHECKPOINTS
  if not directory.exists():
    directory = root
  if not directory.exists():
    raise PathError(f"config.init: no checkpoint directory at {root}")
  ckpt = ckpt_lib.Checkpointer(str(directory), async_save=False, create=False)
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise PathError(f"config.init: {directory} holds no checkpoint")
    step = steps[-1] if entry.get("step") is None else int(entry["step"])
    if step not in steps:
      raise ConfigError(f"config.init: no step {step} in {directory}; available: {steps}")
    source = split_path(entry.get("source") or "/".join(target), "init.source")
    values = ckpt.restore_subtree(step, source, abstract)
  finally:
    ckpt.close()
  logging.info(
    "init: params/%s (%.2fM parameters) from %s step %d (params/%s)",
    "/".join(target),
    count(values) / 1e6,
    directory,
    step,
    "/".join(source),
  )
  return values


def check_init_config(init_config: Any) -> list[tuple[str, dict[str, Any]]]:
  """`[(entry name, fields)]` of `config.init`, each with a `target` and a registered `loader`."""
  entries = []
  for name, entry in dict(init_config or {}).items():
    entry = dict(entry.to_dict() if hasattr(entry, "to_dict") else entry)
    if "target" not in entry or "loader" not in entry:
      raise ConfigError(f"config.init.{name} needs a 'target' sub-tree and a 'loader'")
    LOADERS.get(entry["loader"])
    entries.append((name, entry))
  targets = [e["target"] for _, e in entries]
  if len(set(targets)) != len(targets):
    raise ConfigError(f"config.init names a target twice: {targets}")
  return entries


def apply_init(
  init_config: Any, params: Any, abstract_params: Any, model_config: Any = None
) -> Any:
  """`params` with every `config.init` sub-tree replaced by its loaded values.

  Args:
    init_config: `config.init` (None or empty: `params` unchanged).
    params: freshly initialised parameters (sharded arrays).
    abstract_params: ShapeDtypeStructs with the target shardings, like `params`.
    model_config: `config.model`, for loaders that check a checkpoint against a tower config.
  """
  for name, entry in check_init_config(init_config):
    target = split_path(entry.pop("target"), f"init.{name}.target")
    loader = LOADERS.get(entry.pop("loader"))
    abstract = get_subtree(abstract_params, target, f"init.{name}.target")
    loaded = loader(entry, target, abstract, model_config)
    current = get_subtree(params, target, f"init.{name}.target")
    # A loader leaves None where it has no value (a parameter the source lacks): keep the fresh one.
    loaded = jax.tree.map(
      lambda new, old: old if new is None else new, loaded, current, is_leaf=lambda x: x is None
    )
    params = replace_subtree(params, target, loaded)
  return params
