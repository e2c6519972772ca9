"""Starting values of parameter sub-trees from elsewhere: `config.init`.

`config.init` maps an entry name to where one sub-tree of a fresh run's parameters comes from:

    config.init = dict(
      text=dict(loader="checkpoint", target="text_encoder", workdir="workdirs/clip_a"),
    )

* `target`: the sub-tree, a "/"-separated path below the `params` collection (`text_encoder`,
  `image_encoder/encoder`), or "/" for every parameter (fine-tuning a whole pre-trained model).
* `loader`: a registered loader (`LOADERS`); its other fields are the loader's.

The `checkpoint` loader reads the parameters (nothing else) of another run: fields `workdir` (a run
directory holding `checkpoints/`, or a checkpoint directory itself), `step` (default: its latest)
and `source` (the sub-tree there; default: `target`). The stored arrays must have the names and
shapes of the target sub-tree, and load straight onto the target shardings, with one exception: a
ViT position table (`RESIZABLE_POSITIONS`: `image_encoder/pos_embedding` of a `vit` image tower)
stored for another patch grid is resized to the configured one with the tower's
`pos_interpolation` (`fit_positions`), as ALBEF/TCL fine-tune retrieval at 384 px from their
256 px pre-training (`interpolate_pos_embed`). Its CLS (and distillation) rows are kept as stored.
The layout of the blocks may differ too: a run with unrolled blocks (`block_0` ...) initialises a
model with scanned layers (`model.scan_layers`: stacked `blocks`) and the other way round; the
stored blocks are read as stored and converted (`scan.stack_layers` / `scan.unstack_layers`).

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
from vlalign.models import scan, vit
from vlalign.registry import Registry

# (entry fields, target keys, abstract target sub-tree, config.model) -> the sub-tree's values.
Loader = Callable[[dict[str, Any], tuple[str, ...], Any, Any], Any]
LOADERS: Registry[Loader] = Registry("init loader", "vlalign.weights")


ROOT = "/"  # `target` of an entry that loads every parameter (e.g. fine-tuning a whole model)


def split_path(path: str, where: str) -> tuple[str, ...]:
  """`"a/b"` -> `("a", "b")`; `ROOT` -> `()` (the whole `params` collection)."""
  if str(path) == ROOT:
    return ()
  keys = tuple(k for k in str(path).split("/") if k)
  if not keys:
    raise ConfigError(
      f"config.{where} must name a parameter sub-tree (or {ROOT!r}: all of them), got {path!r}"
    )
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


# Parameters (paths below `params`) whose stored value may be for another image size -> the
# `config.model` field of their tower, whose `pos_interpolation` resizes them (`vit` towers only).
RESIZABLE_POSITIONS = {"image_encoder/pos_embedding": "image"}


def fit_positions(value: np.ndarray, shape: tuple[int, ...], tower: dict[str, Any]) -> np.ndarray:
  """A stored ViT position table (`[heads + N, D]`, optionally with a leading axis of 1, or a
  `[R, R, D]` grid) resized to a tower's `pos_embedding` `shape` with the tower config's
  `pos_interpolation` (`vit.fit_position_table`); the CLS (and distillation) rows are kept."""
  method = tower.get("pos_interpolation") or vit.ViT.pos_interpolation
  return vit.fit_position_table(value, shape, method, bool(tower.get("distillation_token")))


def _resizable_leaves(
  target: tuple[str, ...], abstract: Any, model_config: Any
) -> dict[str, dict[str, Any]]:
  """`{leaf name below target: its tower config}` for the leaves of `abstract` in
  `RESIZABLE_POSITIONS` whose tower is a configured `vit`."""
  out = {}
  for name in pytrees.named_leaves(abstract):
    full = "/".join(k for k in (*target, name) if k)
    tower_name = RESIZABLE_POSITIONS.get(full)
    if tower_name is None or model_config is None or tower_name not in model_config:
      continue
    tower = model_config[tower_name]
    tower = dict(tower.to_dict() if hasattr(tower, "to_dict") else tower)
    if tower.get("kind") == "vit":
      out[name] = tower
  return out


def _stored_shapes(ckpt: Any, step: int, source: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
  """`{leaf name below source: stored shape}` from the checkpoint's metadata (no array read);
  empty when the checkpoint has no such sub-tree (`restore_subtree` then names what is missing)."""
  stored = ckpt._stored_state(step)
  stored = stored.get("params", {})
  stored = stored.get(pytrees.PARAMS, stored)
  for key in source:
    if not isinstance(stored, dict) or key not in stored:
      return {}
    stored = stored[key]
  return {name: tuple(leaf.shape) for name, leaf in pytrees.named_leaves(stored).items()}


def _layout_change(abstract: Any, stored_names: Any) -> str | None:
  """ "stack" when the target has scanned (stacked) blocks and the stored sub-tree unrolled ones,
  "unstack" for the other way round, else None."""
  parts = {part for name in stored_names for part in name.split("/")}
  stored_unrolled = any(scan.UNROLLED.fullmatch(part) for part in parts)
  if scan.has_stacked_layers(abstract):
    return "stack" if stored_unrolled and scan.STACKED not in parts else None
  return "unstack" if scan.STACKED in parts else None


def _in_stored_layout(abstract: Any, change: str | None) -> Any:
  """`abstract` (ShapeDtypeStructs) converted to the stored layout of the blocks, replicated."""
  if change is None:
    return abstract
  convert = scan.unstack_layers if change == "stack" else scan.stack_layers
  mesh_leaf = next(
    (x for x in jax.tree.leaves(abstract) if getattr(x, "sharding", None) is not None), None
  )
  replicated = (
    jax.sharding.NamedSharding(mesh_leaf.sharding.mesh, jax.sharding.PartitionSpec())
    if mesh_leaf is not None and isinstance(mesh_leaf.sharding, jax.sharding.NamedSharding)
    else None
  )
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), convert(abstract)
  )


def _to_target_layout(values: Any, abstract: Any, change: str | None) -> Any:
  """Restored `values` (in the stored layout) converted to `abstract`'s and placed on its
  shardings."""
  if change is None:
    return values
  from vlalign.weights.hf import place  # noqa: PLC0415 - hf imports this module

  host = jax.tree.map(np.asarray, values)
  converted = scan.stack_layers(host) if change == "stack" else scan.unstack_layers(host)
  return jax.tree.map(place, converted, abstract)


def _as_stored(leaf: Any, shape: tuple[int, ...]) -> jax.ShapeDtypeStruct:
  """`leaf` (a ShapeDtypeStruct) with the stored `shape`, replicated over its mesh: the stored
  grid need not divide as the target's would."""
  sharding = getattr(leaf, "sharding", None)
  if isinstance(sharding, jax.sharding.NamedSharding):
    sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  return jax.ShapeDtypeStruct(shape, leaf.dtype, sharding=sharding)


@LOADERS.register("checkpoint")
def load_from_checkpoint(
  entry: dict[str, Any], target: tuple[str, ...], abstract: Any, model_config: Any = None
) -> Any:
  """The sub-tree `entry["source"]` (default `target`) of another run's parameters."""
  unknown = set(entry) - {"workdir", "step", "source"}
  if unknown or "workdir" not in entry:
    raise ConfigError(f"init loader 'checkpoint' takes workdir, step, source; got {sorted(entry)}")
  if not str(entry["workdir"]).strip():
    raise ConfigError(
      f"config.init: the 'checkpoint' loader of params/{'/'.join(target)} has an empty workdir; "
      "set it to the run to start from (e.g. --config.init.model.workdir=workdirs/<pre-training>)"
    )
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
    source = split_path(entry["source"], "init.source") if entry.get("source") else target
    stored = _stored_shapes(ckpt, step, source)
    change = _layout_change(abstract, stored)
    target_abstract, abstract = abstract, _in_stored_layout(abstract, change)
    resizable = _resizable_leaves(target, abstract, model_config)
    # Another grid of the same layout (rank, width) is read as stored, then resized; any other
    # difference is left to `restore_subtree`, which names the parameter.
    regrid = {
      name: stored[name]
      for name, leaf in pytrees.named_leaves(abstract).items()
      if name in resizable
      and name in stored
      and stored[name] != tuple(leaf.shape)
      and len(stored[name]) == len(leaf.shape)
      and stored[name][-1] == leaf.shape[-1]
    }
    read_as = jax.tree.map_with_path(
      lambda path, leaf: (
        _as_stored(leaf, regrid[name]) if (name := pytrees.path_name(path)) in regrid else leaf
      ),
      abstract,
    )
    values = ckpt.restore_subtree(step, source, read_as)
  finally:
    ckpt.close()
  if regrid:
    values = _regrid(values, abstract, regrid, resizable, target)
  if change:
    logging.info("init: params/%s: blocks converted (%s) to the model's layout", target, change)
  values = _to_target_layout(values, target_abstract, change)
  logging.info(
    "init: params/%s (%.2fM parameters) from %s step %d (params/%s)",  # "" = every parameter
    "/".join(target),
    count(values) / 1e6,
    directory,
    step,
    "/".join(source),
  )
  return values


def _regrid(
  values: Any,
  abstract: Any,
  regrid: dict[str, tuple[int, ...]],
  towers: dict[str, dict[str, Any]],
  target: tuple[str, ...],
) -> Any:
  """`values` with each leaf named in `regrid` resized to its `abstract` shape (`fit_positions`)
  and placed on the abstract leaf's sharding."""
  from vlalign.weights.hf import place  # noqa: PLC0415 - hf imports this module

  def fit(path: Any, value: Any, leaf: Any) -> Any:
    name = pytrees.path_name(path)
    if name not in regrid:
      return value
    full = "/".join(k for k in (*target, name) if k)
    try:
      resized = fit_positions(np.asarray(value), tuple(leaf.shape), towers[name])
    except ConfigError as e:
      raise ConfigError(f"config.init: params/{full} {regrid[name]} -> {leaf.shape}: {e}") from e
    logging.info(
      "init: params/%s resized from %s to %s (%s)",
      full,
      regrid[name],
      tuple(leaf.shape),
      towers[name].get("pos_interpolation") or vit.ViT.pos_interpolation,
    )
    return place(resized, leaf)

  return jax.tree.map_with_path(fit, values, abstract)


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
