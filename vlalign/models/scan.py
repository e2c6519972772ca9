"""Scanned layers (`model.scan_layers`), recomputation policies (`model.remat_policy`) and the
conversion of parameter trees between unrolled and stacked blocks.

A tower's `depth` identical blocks run either unrolled, one Python call per block with parameters
`block_0` ... `block_{depth-1}` (the default, and the layout of every existing checkpoint), or as
one `nn.scan` over a single block whose parameters carry a leading layer axis: the sub-tree
`blocks` (`STACKED`), each leaf `[depth, *shape]`, layer i at index i. XLA then compiles one block
per tower instead of `depth`, which is what makes the full-size steps compile several times faster
(bench/compile_full.py). The two layouts compute the same function: for parameters converted with
`stack_layers` the outputs and gradients agree to float rounding (tests/test_scan.py). Dropout
masks differ (a scanned block draws from a per-layer split of the `dropout` rng, an unrolled one
from its own name), and so does a fresh initialisation (per-layer splits of the `params` rng): both
come from the same distributions.

`model.remat` recomputes each block's activations in the backward pass (`nn.remat` around a block,
or around the scan body); `model.remat_policy` (`REMAT_POLICIES`) says what may be kept instead of
recomputed: "full" (the default: nothing but the block's inputs, which is what `model.remat` has
always done) or a `jax.checkpoint_policies` name.

`stack_layers` / `unstack_layers` convert whole parameter trees (any nesting; every dict holding
`block_0..block_{n-1}` is converted), e.g. an unrolled run's parameters for a scanned model; the
Hugging Face importer and exporter (`vlalign/weights/hf.py`) use them to read and write the stored
per-layer tensors of a scanned tower.
"""

import contextlib
import contextvars
import functools
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from vlalign.errors import ConfigError

STACKED = "blocks"  # the sub-tree of a scanned block stack; leaves `[depth, *shape]`
UNROLLED = re.compile(r"block_(\d+)")  # one unrolled block's sub-tree, `block_{i}`

# True inside `unrolled_scans()`: `scan_blocks` traces its layers unrolled.
_UNROLL = contextvars.ContextVar("vlalign_unroll_scans", default=False)

# `model.remat_policy` -> the `jax.checkpoint` policy (None: save nothing but the inputs).
REMAT_POLICIES: dict[str, Callable[..., Any] | None] = {
  "full": None,
  "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
  "dots_saveable": jax.checkpoint_policies.dots_saveable,
  "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def checkpoint_policy(name: str) -> Callable[..., Any] | None:
  """The `jax.checkpoint` policy of `model.remat_policy` `name`; ConfigError if unknown."""
  if name not in REMAT_POLICIES:
    raise ConfigError(f"unknown model.remat_policy {name!r}; choose one of {tuple(REMAT_POLICIES)}")
  return REMAT_POLICIES[name]


def layer_options(model_config: Any) -> dict[str, Any]:
  """`remat`, `remat_policy`, `scan_layers` of `config.model` (defaults False, "full", False),
  checked: the fields every tower with blocks receives (`build_tower`'s `common`)."""
  remat = bool(model_config.get("remat", False))
  policy = model_config.get("remat_policy", "full") or "full"
  checkpoint_policy(policy)
  if policy != "full" and not remat:
    raise ConfigError(
      f"model.remat_policy={policy!r} has no effect without model.remat=True; set both, or "
      "leave remat_policy at 'full'"
    )
  return dict(remat=remat, remat_policy=policy, scan_layers=bool(model_config.get("scan_layers")))


def remat_block(block_cls: type[nn.Module], remat: bool, policy: str, static_argnums: tuple):
  """`block_cls`, or with `remat` its `nn.remat` under `policy` (unrolled blocks).

  Args:
    block_cls: the block's Linen class.
    remat: recompute its activations in the backward pass.
    policy: a `REMAT_POLICIES` name.
    static_argnums: the positions of the block's static arguments, `self` counted as 0 (`train`).
  """
  if not remat:
    return block_cls
  return nn.remat(block_cls, static_argnums=static_argnums, policy=checkpoint_policy(policy))


@contextlib.contextmanager
def unrolled_scans() -> Iterator[None]:
  """Within this context `scan_blocks` traces its `depth` layers unrolled (`nn.scan`'s
  `unroll=depth`): the same function of the same stacked parameters, but one copy of the block per
  layer in the program. For counting: XLA's cost analysis counts a loop's body once, so the FLOPs
  of a scanned step are read from a lowering traced here (`trainer.step_flops`)."""
  token = _UNROLL.set(True)
  try:
    yield
  finally:
    _UNROLL.reset(token)


def make_blocks(
  block_cls: type[nn.Module],
  fields: dict[str, Any],
  depth: int,
  *,
  scan_layers: bool,
  remat: bool,
  policy: str,
  train_argnum: int,
) -> nn.Module | list[nn.Module]:
  """A tower's `depth` blocks, created in the calling module (in its `setup`, or inline in a
  compact `__call__`); run them with `apply_blocks`.

  Args:
    block_cls: the block's Linen class, called as `block(x, *args, train)`.
    fields: its constructor's arguments.
    depth: the number of blocks.
    scan_layers: one `block_cls` named `STACKED`, whose parameters `scan_blocks` stacks; else
      `block_0` ... `block_{depth-1}`.
    remat, policy: recompute activations in the backward pass, keeping what `policy` allows.
    train_argnum: the position of the blocks' `train` argument, `self` counted as 0 (static under
      `nn.remat`).
  """
  if scan_layers:
    return block_cls(**fields, name=STACKED)
  block_cls = remat_block(block_cls, remat, policy, (train_argnum,))
  return [block_cls(**fields, name=f"block_{i}") for i in range(depth)]


def apply_blocks(
  blocks: nn.Module | Sequence[nn.Module],
  x: jax.Array,
  *args: Any,
  depth: int,
  train: bool,
  remat: bool = False,
  policy: str = "full",
  rows: jax.Array | None = None,
) -> jax.Array:
  """`x` through the blocks of `make_blocks`: scanned (`scan_blocks`) or one after the other.

  Args:
    blocks: `make_blocks`'s result.
    x: `[B, L, D]` input of the first block.
    *args: the other inputs of every block (masks, image tokens), the same for each.
    depth, train, remat, policy, rows: as in `scan_blocks` (only the scan uses `depth`, `remat`
      and `policy`: unrolled blocks were made with them).
  """
  if isinstance(blocks, nn.Module):
    return scan_blocks(
      blocks, x, *args, depth=depth, train=train, remat=remat, policy=policy, rows=rows
    )
  for i, block in enumerate(blocks):
    last_rows = () if rows is None or i < len(blocks) - 1 else (rows,)
    x = block(x, *args, train, *last_rows)
  return x


def _layers(select: int | slice, variables: Any) -> Any:
  """Layer(s) `select` of stacked variables (every leaf `[depth, ...]`)."""
  return jax.tree.map(lambda leaf: leaf[select], variables)


def scan_blocks(
  block: nn.Module,
  x: jax.Array,
  *args: Any,
  depth: int,
  train: bool,
  remat: bool = False,
  policy: str = "full",
  rows: jax.Array | None = None,
) -> jax.Array:
  """`x` through `depth` layers of `block` in one `nn.scan`: `[B, L, D] -> [B, L, D]`.

  Layer i computes `block(x, *args, train)` with the i-th slice of the block's parameters, which
  are created (and stored) with a leading layer axis; the `params` and `dropout` rngs are split
  per layer. The block must return an array of `x`'s shape (the carry keeps `x`'s dtype).

  Args:
    block: an unbound block module, named `STACKED` (its parameters' sub-tree).
    x: `[B, L, D]` input of the first layer.
    *args: the other inputs of every layer (masks, image tokens), the same for each.
    depth: the number of layers (0: `x` unchanged, no parameters).
    train: the blocks' `train` argument (static).
    remat: recompute each layer's activations in the backward pass.
    policy: what `remat` may keep (`REMAT_POLICIES`).
    rows: int `[B, K]`, or None: the last layer computes only these rows of its output (the
      block's `rows` argument), while the scan runs the layers before it; applying only (the
      parameters must exist: `init` runs without `rows`). The last layer then draws its dropout
      from the block's own rng rather than from the scan's per-layer split.

  Returns:
    The last layer's output, `[B, L, D]` (`[B, K, D]` with `rows`).
  """
  if depth == 0:
    return x

  def body(module: nn.Module, carry: jax.Array, *inputs: Any) -> tuple[jax.Array, None]:
    return module(carry, *inputs, train).astype(carry.dtype), None

  def last(module: nn.Module, carry: jax.Array, *inputs: Any) -> jax.Array:
    return module(carry, *inputs, train, rows).astype(carry.dtype)

  if remat:  # `prevent_cse` is unnecessary inside a scan and costs performance.
    body = nn.remat(body, prevent_cse=False, policy=checkpoint_policy(policy))
    last = nn.remat(last, policy=checkpoint_policy(policy))
  scanned_layers = depth if rows is None else depth - 1
  if scanned_layers:
    scanned = nn.scan(
      body,
      variable_axes={"params": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=(nn.broadcast,) * len(args),
      length=scanned_layers,
      unroll=scanned_layers if _UNROLL.get() else 1,
    )
    if rows is not None:  # the first depth - 1 layers of the stored stack
      scanned = nn.map_variables(
        scanned, "params", trans_in_fn=functools.partial(_layers, slice(0, depth - 1))
      )
    x, _ = scanned(block, x, *args)
  if rows is None:
    return x
  last = nn.map_variables(last, "params", trans_in_fn=functools.partial(_layers, depth - 1))
  return last(block, x, *args)


# --- Parameter trees: unrolled `block_{i}` <-> stacked `blocks`. ---


def _unrolled_depth(node: Mapping[str, Any]) -> int:
  """n when `node` holds `block_0..block_{n-1}` (and no `blocks`), else 0."""
  indices = sorted(int(m.group(1)) for k in node if (m := UNROLLED.fullmatch(str(k))))
  if not indices:
    return 0
  if indices != list(range(len(indices))):
    raise ValueError(f"unrolled blocks are not numbered 0..n-1: {indices}")
  if STACKED in node:
    raise ValueError(f"a tree holds both {STACKED!r} and block_i sub-trees")
  return len(indices)


def _stack_leaves(leaves: list[Any], where: str) -> Any:
  """One stacked leaf from the layers' leaves (arrays, ShapeDtypeStructs, or all None)."""
  if all(leaf is None for leaf in leaves):
    return None
  if any(leaf is None for leaf in leaves):
    raise ValueError(f"{where}: some layers have a value and some have none")
  first = leaves[0]
  if isinstance(first, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype)
  if isinstance(first, jax.Array):
    return jax.numpy.stack(leaves)
  return np.stack([np.asarray(leaf) for leaf in leaves])


def stack_layers(tree: Any) -> Any:
  """`tree` with every dict of unrolled blocks `block_0..block_{n-1}` replaced by one sub-tree
  `blocks` (`STACKED`) whose leaves are the blocks' leaves stacked along a new axis 0.

  Args:
    tree: nested mappings (a whole variable tree `{"params": ...}`, a tower's sub-tree, ...) of
      numpy / jax arrays, `jax.ShapeDtypeStruct`s (stacked without sharding) or None (kept when
      every layer has None).

  Returns:
    A new tree of nested dicts; sub-trees without unrolled blocks are copied as they are.

  Raises:
    ValueError: blocks not numbered 0..n-1, of different structures, or a leaf None in some
      layers only.
  """

  def convert(node: Any, path: str) -> Any:
    if not isinstance(node, Mapping):
      return node
    out = {k: convert(v, f"{path}{k}/") for k, v in node.items() if not UNROLLED.fullmatch(str(k))}
    depth = _unrolled_depth(node)
    if depth:
      blocks = [convert(node[f"block_{i}"], f"{path}block_{i}/") for i in range(depth)]
      structure = jax.tree.structure(blocks[0], is_leaf=lambda x: x is None)
      for i, block in enumerate(blocks[1:], 1):
        if jax.tree.structure(block, is_leaf=lambda x: x is None) != structure:
          raise ValueError(f"{path}block_{i} has other parameters than {path}block_0")
      out[STACKED] = jax.tree.map(
        lambda *leaves: _stack_leaves(list(leaves), f"{path}{STACKED}"),
        *blocks,
        is_leaf=lambda x: x is None,
      )
    return out

  return convert(tree, "")


def _unstack_leaf(leaf: Any, depth: int) -> list[Any]:
  if leaf is None:
    return [None] * depth
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return [jax.ShapeDtypeStruct(tuple(leaf.shape[1:]), leaf.dtype)] * depth
  return [leaf[i] for i in range(depth)]


def unstack_layers(tree: Any) -> Any:
  """The inverse of `stack_layers`: every `blocks` sub-tree (leaves `[depth, *shape]`) becomes
  `block_0..block_{depth-1}`, block i holding index i of each leaf (ShapeDtypeStructs lose the
  leading axis and their sharding)."""

  def convert(node: Any) -> Any:
    if not isinstance(node, Mapping):
      return node
    out = {k: convert(v) for k, v in node.items() if k != STACKED}
    if STACKED in node:
      stacked = node[STACKED]
      leaves = [x for x in jax.tree.leaves(stacked) if x is not None]
      depths = {int(x.shape[0]) for x in leaves}
      if len(depths) != 1:
        raise ValueError(f"{STACKED!r} leaves disagree on the layer count: {sorted(depths)}")
      depth = depths.pop()
      per_leaf = jax.tree.map(
        lambda x: _unstack_leaf(x, depth), stacked, is_leaf=lambda x: x is None
      )
      for i in range(depth):
        out[f"block_{i}"] = jax.tree.map(
          lambda layers, i=i: layers[i], per_leaf, is_leaf=lambda x: isinstance(x, list)
        )
    return out

  return convert(tree)


def has_stacked_layers(tree: Any) -> bool:
  """Whether any mapping in `tree` holds a `blocks` (`STACKED`) sub-tree."""
  if not isinstance(tree, Mapping):
    return False
  return STACKED in tree or any(has_stacked_layers(v) for v in tree.values())


def unrolled_names(name: str, depth: int) -> list[str] | None:
  """The leaf names of layers 0..depth-1 of a stacked leaf name (`encoder/blocks/mlp/fc1/kernel`
  -> `encoder/block_{i}/mlp/fc1/kernel`), or None when `name` is no stacked leaf."""
  parts = name.split("/")
  if STACKED not in parts:
    return None
  at = parts.index(STACKED)
  return ["/".join([*parts[:at], f"block_{i}", *parts[at + 1 :]]) for i in range(depth)]
