"""Names of pytree leaves, and boolean masks from path patterns.

A leaf's name joins its keys with "/" (`params/text_encoder/encoder/block_0/attn/query/kernel`).
Config patterns about parameters (`config.optim.frozen`, `config.optim.decay`, `config.init`) are
written relative to the `params` collection (`text_encoder/.*`) and matched in full
(`re.fullmatch`), as big_vision matches its parameter patterns.
"""

import re
from collections.abc import Sequence
from typing import Any

import jax

from vlalign.errors import ConfigError

PARAMS = "params"


def key_name(key: Any) -> str:
  """One path entry as text: a dict key, an attribute name or a sequence index."""
  for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey (dataclasses), SequenceKey
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_name(path: Sequence[Any]) -> str:
  return "/".join(key_name(k) for k in path)


def named_leaves(tree: Any) -> dict[str, Any]:
  """`{"params/img/kernel": leaf}` in flattening order."""
  return {path_name(p): leaf for p, leaf in jax.tree.flatten_with_path(tree)[0]}


def param_name(name: str) -> str:
  """A leaf name relative to the `params` collection (`params/a/b` -> `a/b`)."""
  prefix = PARAMS + "/"
  return name[len(prefix) :] if name.startswith(prefix) else name


def compile_patterns(patterns: Sequence[str], where: str) -> list[re.Pattern]:
  """Compiled regular expressions, with an error naming the config field for a bad one."""
  if isinstance(patterns, str):
    raise ConfigError(f"config.{where} must be a list of patterns, not the string {patterns!r}")
  compiled = []
  for pattern in patterns:
    try:
      compiled.append(re.compile(pattern))
    except re.error as e:
      raise ConfigError(f"config.{where}: bad pattern {pattern!r}: {e}") from None
  return compiled


def path_mask(tree: Any, patterns: Sequence[str], where: str, require_match: bool = True) -> Any:
  """Boolean pytree like `tree`: True on leaves whose parameter name matches a pattern in full.

  Args:
    tree: a parameter pytree (with or without the top `params` collection).
    patterns: regular expressions on names relative to `params`, e.g. `("text_encoder/.*",)`.
    where: the config field, for messages.
    require_match: a pattern that matches no leaf is an error (a typo would otherwise freeze or
      decay nothing silently).
  """
  compiled = compile_patterns(patterns, where)
  used = [False] * len(compiled)

  def matches(path, _):
    name = param_name(path_name(path))
    hit = False
    for i, pattern in enumerate(compiled):
      if pattern.fullmatch(name):
        used[i] = hit = True
    return hit

  mask = jax.tree.map_with_path(matches, tree)
  unused = [p for p, u in zip(patterns, used, strict=True) if not u]
  if require_match and unused and jax.tree.leaves(tree):
    example = param_name(next(iter(named_leaves(tree))))
    raise ConfigError(
      f"config.{where}: patterns {unused} match no parameter (names look like {example!r})"
    )
  return mask
