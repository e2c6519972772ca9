"""Thin wrapper over an Orbax CheckpointManager: train state and Grain iterator in one step.

- async saves; keeps the last `keep` steps and every `keep_period`-th step;
- restores onto target shardings (a checkpoint written on 8 devices restores on 4 or 1);
- refuses, with a message naming the first mismatching array, to restore a checkpoint written by a
  model of other shapes (instead of failing deep inside Orbax or silently broadcasting).
"""

from collections.abc import Sequence
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from vlalign import pytrees
from vlalign import workdir as workdir_lib

STATE = "state"
DATA = "data"


class IncompatibleCheckpointError(ValueError):
  """The checkpoint in the workdir does not fit the configured model or state."""


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """`{"params/img/kernel": shape}`; dict keys, attributes and indices all print alike."""
  return {name: tuple(leaf.shape) for name, leaf in pytrees.named_leaves(tree).items()}


def _to_plain(tree: Any) -> Any:
  """A TrainState or other dataclass pytree as the nested dicts Orbax stores it as."""
  if hasattr(tree, "__dataclass_fields__"):
    return {name: _to_plain(getattr(tree, name)) for name in tree.__dataclass_fields__}
  if isinstance(tree, dict):
    return {k: _to_plain(v) for k, v in tree.items()}
  return tree


def check_compatible(stored: Any, target: Any, where: str) -> None:
  """Raises IncompatibleCheckpointError when the array names or shapes of `stored` and `target`
  differ (both as nested dicts)."""
  stored_shapes = _flat_shapes(stored)
  target_shapes = _flat_shapes(target)
  missing = sorted(set(target_shapes) - set(stored_shapes))
  extra = sorted(set(stored_shapes) - set(target_shapes))
  wrong = [
    k for k in sorted(target_shapes) if k in stored_shapes and stored_shapes[k] != target_shapes[k]
  ]
  if missing or extra or wrong:
    lines = [f"the checkpoint at {where} does not fit the configured model:"]
    if wrong:
      k = wrong[0]
      lines.append(
        f"  {len(wrong)} arrays differ in shape, e.g. {k}: checkpoint {stored_shapes[k]} vs "
        f"config {target_shapes[k]}"
      )
    if missing:
      lines.append(f"  {len(missing)} arrays missing from the checkpoint, e.g. {missing[0]}")
    if extra:
      lines.append(f"  {len(extra)} arrays only in the checkpoint, e.g. {extra[0]}")
    lines.append("  Use a fresh --workdir, or the config the checkpoint was written with.")
    raise IncompatibleCheckpointError("\n".join(lines))


def _pytree_restore(abstract: Any, partial: bool = False) -> ocp.args.PyTreeRestore:
  """Restore args placing every array on the sharding of its ShapeDtypeStruct in `abstract`."""
  restore_args = jax.tree.map(
    lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype),
    abstract,
  )
  return ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args, partial_restore=partial)


class Checkpointer:
  """Saves and restores `(train_state, grain_iterator)` under `directory/<step>/`."""

  def __init__(
    self,
    directory: str,
    keep: int = 3,
    keep_period: int | None = None,
    async_save: bool = True,
    create: bool = True,
  ):
    """Opens (with `create`, creates) the checkpoint directory; `create=False` opens it read-only
    (another run's checkpoints, which this process must never change)."""
    self.directory = workdir_lib.as_path(directory)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      keep_period=keep_period or None,
      enable_async_checkpointing=async_save,
      create=create,
      read_only=not create,
    )
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=options,
      item_handlers={
        STATE: ocp.PyTreeCheckpointHandler(),
        DATA: grain.checkpoint.CheckpointHandler(),
      },
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any = None, force: bool = False) -> bool:
    items = {STATE: ocp.args.PyTreeSave(state)}
    if data_iterator is not None:
      items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
      logging.info("checkpoint: saving step %d to %s (async)", step, self.directory)
    return saved

  def _stored_state(self, step: int) -> Any:
    meta = self.manager.item_metadata(step)
    stored = meta.get(STATE)
    if stored is None:
      raise IncompatibleCheckpointError(f"step {step} in {self.directory} has no '{STATE}' item")
    return stored

  def restore(self, step: int, abstract_state: Any, data_iterator: Any = None) -> Any:
    """Restores the full state onto the shardings of `abstract_state` (ShapeDtypeStructs with
    `.sharding`), and the iterator's position in place."""
    check_compatible(_to_plain(self._stored_state(step)), _to_plain(abstract_state), self._at(step))
    items = {STATE: _pytree_restore(abstract_state)}
    if data_iterator is not None:
      items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    logging.info("checkpoint: restored step %d from %s", step, self.directory)
    return restored[STATE]

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """Restores only `params` (no optimizer state, no iterator): what evaluation needs."""
    stored = _to_plain(self._stored_state(step))
    check_compatible(stored.get("params", {}), _to_plain(abstract_params), self._at(step))
    args = _pytree_restore({"params": abstract_params}, partial=True)
    restored = self.manager.restore(step, args=ocp.args.Composite(**{STATE: args}))
    return restored[STATE]["params"]

  def restore_subtree(self, step: int, path: Sequence[str], abstract_subtree: Any) -> Any:
    """Restores only `params/<path...>` of step `step` onto the shardings of `abstract_subtree`.

    Args:
      step: a step of this directory.
      path: keys below the `params` collection, e.g. `("text_encoder",)`.
      abstract_subtree: ShapeDtypeStructs (with `.sharding`) of the target sub-tree; names and
        shapes must equal the stored ones.
    """
    stored = _to_plain(self._stored_state(step)).get("params", {})
    stored = stored.get(pytrees.PARAMS, stored)
    for key in path:
      if not isinstance(stored, dict) or key not in stored:
        raise IncompatibleCheckpointError(
          f"{self._at(step)} has no parameters under {'/'.join(path)!r}"
        )
      stored = stored[key]
    check_compatible(stored, _to_plain(abstract_subtree), f"{self._at(step)} ({'/'.join(path)})")
    item = abstract_subtree
    for key in reversed((pytrees.PARAMS, *path)):
      item = {key: item}
    args = _pytree_restore({"params": item}, partial=True)
    restored = self.manager.restore(step, args=ocp.args.Composite(**{STATE: args}))
    out = restored[STATE]["params"][pytrees.PARAMS]
    for key in path:
      out = out[key]
    return out

  def _at(self, step: int) -> str:
    return str(self.directory / str(step))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings, for `Checkpointer.restore`."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
  )
