"""Loss groups: every loss computed on consecutive groups of G examples and averaged over groups.

The official ALBEF / TCL runs are 8 GPUs x 64 pairs under DistributedDataParallel: each GPU's
losses see only its own 64 pairs (the in-batch columns of ITA / IMC, the LMI negatives, the ITM
hard-negative candidates), only the queues gather across GPUs, and the gradient is the mean of the
per-GPU gradients. `config.loss_group_size = 64` reproduces that on any mesh: the global batch is
cut into groups of 64 consecutive examples, each loss runs on every group (`jax.vmap`) and the
groups' values are averaged. The result depends on the group size only, not on the device count:
8 devices x 64, 1 device x 512 and a pod give the same loss. `loss_group_size = 0` (the default)
is one group of the whole global batch: every loss sees all B pairs ("global loss groups"), so a
result does not depend on how many devices trained it.

What a group sees (the rule a new method or loss relies on):

* `ctx.batch` and `ctx.inputs`: every array is per example (leading axis B) and is cut.
* the student's `outputs` and `ctx.teacher`: keys with a `/` (`img/emb`, `txt/tokens`,
  `itm/logits`, ...) are per example and cut; their leading axis must be a multiple k * B, read as
  k blocks of B rows (`itm/logits` `[3B, 2]`: positives, then two sets of negatives), and a group
  gets its rows of each block. Keys without a `/` (`logit_scale`, `codebook`, the teacher's
  `queue` codes) are shared by all groups.
* `ctx.extras` (queues, teacher parameters), `ctx.schedules` and `ctx.step`: shared.
* `ctx.rngs`: each group gets `fold_in(key, group)`.

Metrics are averaged over the groups like the losses. With one group nothing is cut and the values
are bit-for-bit those of the plain global computation.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from vlalign.errors import ConfigError


def group_size_of(config: Any) -> int | None:
  """`config.loss_group_size` checked against `config.batch_size`; None for one global group.

  Raises:
    ConfigError: a negative size, or one that does not divide the global batch.
  """
  size = int(config.get("loss_group_size", 0) or 0)
  batch_size = int(config["batch_size"])
  if size < 0 or (size and batch_size % size):
    raise ConfigError(
      f"config.loss_group_size={size} must divide config.batch_size={batch_size} (0: one group "
      "of the whole global batch)"
    )
  return None if size in (0, batch_size) else size


def is_per_example(key: str) -> bool:
  """Output / teacher keys with a `/` are per example; the others are shared (module docstring)."""
  return "/" in key


def split(x: jax.Array, batch_size: int, group_size: int, where: str = "array") -> jax.Array:
  """`[k*B, ...]` (k blocks of B rows) -> `[B/G, k*G, ...]`: group g gets rows g*G..(g+1)*G-1 of
  every block, in block order."""
  rows = x.shape[0] if x.ndim else 0
  if rows == 0 or rows % batch_size:
    raise ValueError(
      f"loss groups: {where} has shape {x.shape}; a per-example array needs a leading axis that is "
      f"a multiple of the batch size {batch_size} (keys without '/' are shared, not cut)"
    )
  blocks, groups = rows // batch_size, batch_size // group_size
  x = x.reshape(blocks, groups, group_size, *x.shape[1:])
  return jnp.moveaxis(x, 1, 0).reshape(groups, blocks * group_size, *x.shape[3:])


def group_keys(rng: jax.Array, num_groups: int) -> jax.Array:
  """`[num_groups]` keys `fold_in(rng, g)`."""
  return jax.vmap(lambda g: jax.random.fold_in(rng, g))(jnp.arange(num_groups))


def _split_dict(tree: dict | None, batch_size: int, group_size: int, where: str, cut_all: bool):
  """`(values, in_axes)` for one dict of the outputs / context."""
  if tree is None:
    return None, None
  values, axes = {}, {}
  for key, value in tree.items():
    if cut_all or is_per_example(key):
      values[key] = split(value, batch_size, group_size, f"{where}[{key!r}]")
      axes[key] = 0
    else:
      values[key], axes[key] = value, None
  return values, axes


def batch_size_of(ctx: Any) -> int:
  """The global batch size B: the leading axis of the arrays of `ctx.batch`."""
  leaves = jax.tree.leaves(ctx.batch)
  if not leaves:
    raise ValueError("loss groups need ctx.batch to know the batch size; it is empty")
  return leaves[0].shape[0]


def grouped(
  fn: Callable[..., tuple[jax.Array, dict]],
  outputs: dict[str, jax.Array],
  ctx: Any,
  group_size: int,
) -> tuple[jax.Array, dict]:
  """`fn(outputs, ctx) -> (value, metrics)` on each group of `group_size` examples, averaged.

  Args:
    fn: a loss with its keyword arguments bound.
    outputs: the student's outputs on the global batch.
    ctx: the global `LossContext`.
    group_size: G, a divisor of the global batch size B.

  Returns:
    `(mean over groups of value, mean over groups of each metric)`.
  """
  batch_size = batch_size_of(ctx)
  if batch_size % group_size:
    raise ValueError(f"loss group size {group_size} does not divide the batch size {batch_size}")
  num_groups = batch_size // group_size
  if num_groups == 1:
    return fn(outputs, ctx)
  cut = {"batch_size": batch_size, "group_size": group_size}
  out_values, out_axes = _split_dict(outputs, where="outputs", cut_all=False, **cut)
  batch, batch_axes = _split_dict(ctx.batch, where="ctx.batch", cut_all=True, **cut)
  inputs, inputs_axes = _split_dict(ctx.inputs, where="ctx.inputs", cut_all=True, **cut)
  teacher, teacher_axes = _split_dict(ctx.teacher, where="ctx.teacher", cut_all=False, **cut)
  rngs = {name: group_keys(key, num_groups) for name, key in ctx.rngs.items()}
  values = ctx.replace(batch=batch, inputs=inputs, teacher=teacher, rngs=rngs)
  axes = ctx.replace(
    step=None,
    batch=batch_axes,
    inputs=inputs_axes,
    teacher=teacher_axes,
    extras=None,
    schedules=None,
    rngs=dict.fromkeys(rngs, 0),
  )
  value, metrics = jax.vmap(fn, in_axes=(out_axes, axes))(out_values, values)
  return jnp.mean(value, axis=0), jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
