"""LoRA adapters (Hu et al. 2021) on a text tower's projections, and their merge into the kernels.

A tower with `lora=dict(rank=r, alpha=a, dropout=p, targets=(...))` adds to the output of each
projection named in `targets` a low-rank branch of its input:

    y = x W (+ bias) + (alpha / r) Drop(x) A B,    A `[*in, r]`, B `[r, *out]`

`A` starts random (PEFT's `kaiming_uniform(a=sqrt(5))`: uniform with bound `1/sqrt(fan_in)`), `B`
at zero, so a fresh adapter changes nothing: the tower starts as its base weights.

Naming convention: the adapter of the projection module `<proj>` is the sibling module
`<proj>_lora` with parameters `a` and `b` (`block_0/attn/query` -> `block_0/attn/query_lora/a`,
`block_0/attn/query_lora/b`). `LORA_PARAM_PATTERN` matches every adapter leaf, so that a config
can freeze the base and train only the adapters:

    config.optim.frozen = ("text_encoder/(?!.*_lora/).*",)

`merge_lora` folds trained adapters into the base kernels (`W + (alpha / r) A B`), giving the
parameters of the same tower without `lora`: what `vlalign.weights.hf.export_tower` writes.
"""

import re
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlalign.errors import ConfigError
from vlalign.models.layers import PARAM_DTYPE, Dtype

LORA_FIELDS = {"rank", "alpha", "dropout", "targets"}
LORA_SUFFIX = "_lora"
# Parameter names (relative to any sub-tree) of adapter leaves, matched in full (`re.fullmatch`).
LORA_PARAM_PATTERN = r".*_lora/.*"
# The projections Hu et al. adapt when `targets` is not given: W_q and W_v.
DEFAULT_TARGETS = ("query", "value")

_LORA_RE = re.compile(LORA_PARAM_PATTERN)


def is_lora_path(path: str) -> bool:
  """Whether the "/"-joined parameter name `path` is a leaf of an adapter (`.../<proj>_lora/a`)."""
  return bool(_LORA_RE.fullmatch(path))


def _is_number(value: Any) -> bool:
  return isinstance(value, int | float) and not isinstance(value, bool)


def check_lora(lora: Any, targets_allowed: Iterable[str], where: str) -> dict[str, Any] | None:
  """The LoRA config `lora` completed with its defaults, or None when there is none.

  Args:
    lora: None, or a mapping with `rank` (required, >= 1), `alpha` (default: `rank`, i.e. scale
      1), `dropout` on the adapter's input (default 0, in [0, 1)) and `targets` (projection names
      of the tower; default `DEFAULT_TARGETS`).
    targets_allowed: the tower's projection names.
    where: the config path, for messages (e.g. "model.text.lora").

  Returns:
    `{"rank": int, "alpha": float, "dropout": float, "targets": tuple[str, ...]}` or None.

  Raises:
    ConfigError: naming every problem (unknown fields, bad values, unknown targets).
  """
  if lora is None:
    return None
  if hasattr(lora, "to_dict"):
    lora = lora.to_dict()
  if not isinstance(lora, Mapping):
    raise ConfigError(f"config.{where} must be a dict with fields {sorted(LORA_FIELDS)} or None")
  allowed = sorted(targets_allowed)
  problems = []
  unknown = sorted(set(lora) - LORA_FIELDS)
  if unknown:
    problems.append(f"unknown fields {unknown} (it takes {sorted(LORA_FIELDS)})")
  rank = lora.get("rank")
  if rank is None:
    problems.append("needs a 'rank' (e.g. 8)")
  elif not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
    problems.append(f"rank={rank!r} must be an integer >= 1")
  alpha = lora.get("alpha")
  if alpha is None:
    alpha = rank
  elif not _is_number(alpha) or alpha <= 0:
    problems.append(f"alpha={alpha!r} must be a number > 0")
  dropout = lora.get("dropout", 0.0)
  if not _is_number(dropout) or not 0.0 <= dropout < 1.0:
    problems.append(f"dropout={dropout!r} must be in [0, 1)")
  targets = lora.get("targets", DEFAULT_TARGETS)
  if isinstance(targets, str) or not isinstance(targets, Iterable):
    problems.append(f"targets={targets!r} must be a list of projection names from {allowed}")
    targets = ()
  targets = tuple(dict.fromkeys(targets))
  if not targets:
    problems.append(f"targets is empty; name projections from {allowed}")
  bad = [t for t in targets if t not in allowed]
  if bad:
    problems.append(f"targets {bad} are not projections of this tower; it has {allowed}")
  if problems:
    raise ConfigError(f"config.{where}: " + "; ".join(problems))
  return dict(rank=rank, alpha=float(alpha), dropout=float(dropout), targets=targets)


def lora_scale(lora: Mapping[str, Any]) -> float:
  """`alpha / rank` (alpha defaults to rank)."""
  alpha = lora.get("alpha")
  return float(lora["rank"] if alpha is None else alpha) / float(lora["rank"])


class LoRA(nn.Module):
  """The low-rank branch `(alpha / rank) Drop(x) A B` of one projection:
  `[..., *in] -> [..., *features]`.

  Attributes:
    features: output shape of the base projection (`(heads, head_dim)` for a query
      DenseGeneral, `(D,)` for a Dense).
    rank: r, the inner width.
    alpha: the branch is scaled by `alpha / rank`.
    dropout: dropout on the branch's input (rng stream "dropout"; only with `train=True`).
    in_axes: how many trailing input axes the base projection contracts (1 for a Dense or the
      query/key/value DenseGeneral, 2 for the attention output over `(heads, head_dim)`).
    dtype: compute dtype (the parameters stay float32).
  """

  features: tuple[int, ...]
  rank: int
  alpha: float
  dropout: float = 0.0
  in_axes: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x `[..., *in]` -> `[..., *features]` in `dtype`."""
    in_shape = x.shape[x.ndim - self.in_axes :]
    a_init = nn.initializers.variance_scaling(
      1 / 3, "fan_in", "uniform", in_axis=tuple(range(self.in_axes)), out_axis=-1
    )
    a = self.param("a", a_init, (*in_shape, self.rank), PARAM_DTYPE)
    b = self.param("b", nn.initializers.zeros, (self.rank, *self.features), PARAM_DTYPE)
    x = nn.Dropout(self.dropout)(x.astype(self.dtype), deterministic=not train)
    h = jnp.tensordot(x, a.astype(self.dtype), axes=self.in_axes)  # [..., r]
    y = jnp.tensordot(h, b.astype(self.dtype), axes=1)  # [..., *features]
    return (y * (self.alpha / self.rank)).astype(self.dtype)


def add_lora(
  y: jax.Array,
  x: jax.Array,
  lora: Mapping[str, Any] | None,
  target: str,
  train: bool = False,
  in_axes: int = 1,
  dtype: Dtype = jnp.float32,
) -> jax.Array:
  """`y + LoRA(x)` with the adapter module `<target>_lora` when `target` is adapted, else `y`.

  Call it in the compact method that made the projection `target` (the adapter becomes its
  sibling).

  Args:
    y: the base projection's output `[..., *features]`.
    x: its input `[..., *in]` (`in_axes` trailing axes contracted).
    lora: the checked LoRA config (`check_lora`), or None.
    target: the projection's module name.
    train: dropout on the adapter's input.
    in_axes: as in `LoRA`.
    dtype: compute dtype.
  """
  if lora is None or target not in lora["targets"]:
    return y
  features = tuple(y.shape[x.ndim - in_axes :])
  adapter = LoRA(
    features=features,
    rank=lora["rank"],
    alpha=lora["alpha"],
    dropout=lora["dropout"],
    in_axes=in_axes,
    dtype=dtype,
    name=target + LORA_SUFFIX,
  )
  return y + adapter(x, train)


def merge_lora(tower_params: Mapping[str, Any], lora: Mapping[str, Any] | None) -> dict[str, Any]:
  """The tower's parameters with every adapter folded into its base kernel and removed.

  For each module `<proj>_lora` (parameters `a` `[*in, r]`, `b` `[r, *out]`) next to a module
  `<proj>` with a `kernel` `[*in, *out]`: `kernel + (alpha / rank) a b`, computed on the host in
  float64 and stored in the kernel's dtype. The result is the parameter tree of the same tower
  without `lora` (same outputs up to rounding), e.g. for `export_tower`.

  Args:
    tower_params: the tower's parameter tree (nested mappings of arrays).
    lora: the tower's LoRA config (`rank`, `alpha`); None when it has none (the tree must then
      hold no adapter).

  Returns:
    A new tree of nested dicts (the input is not modified).

  Raises:
    ConfigError: an adapter without a base kernel of the matching shape, or adapters when `lora`
      is None, or an adapter of another rank.
  """
  scale = None if lora is None else lora_scale(lora)

  def merge(node: Any, path: str) -> Any:
    if not isinstance(node, Mapping):
      return node
    out = {k: merge(v, f"{path}{k}/") for k, v in node.items() if not k.endswith(LORA_SUFFIX)}
    for key, adapter in node.items():
      if not key.endswith(LORA_SUFFIX):
        continue
      where = f"{path}{key}"
      base = out.get(key[: -len(LORA_SUFFIX)])
      if scale is None:
        raise ConfigError(f"parameter {where} is a LoRA adapter but the tower config has no lora")
      if not isinstance(base, Mapping) or "kernel" not in base:
        raise ConfigError(f"LoRA adapter {where} has no sibling projection with a kernel")
      a = np.asarray(jax.device_get(adapter["a"]), np.float64)
      b = np.asarray(jax.device_get(adapter["b"]), np.float64)
      if a.shape[-1] != lora["rank"] or b.shape[0] != lora["rank"]:
        raise ConfigError(f"LoRA adapter {where} has rank {a.shape[-1]}, lora.rank={lora['rank']}")
      kernel = np.asarray(jax.device_get(base["kernel"]))
      delta = scale * np.tensordot(a, b, axes=1)
      if delta.size != kernel.size:
        raise ConfigError(
          f"LoRA adapter {where} ({a.shape} x {b.shape}) does not fit kernel {kernel.shape}"
        )
      merged = kernel.astype(np.float64) + delta.reshape(kernel.shape)
      out[key[: -len(LORA_SUFFIX)]] = {**base, "kernel": merged.astype(kernel.dtype)}
    return out

  return merge(tower_params, "")
