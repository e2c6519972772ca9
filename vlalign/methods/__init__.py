"""Training methods: what is specific to CLIP/SigLIP, ALBEF/TCL, ... lives here, not in the step.

`config.method` names a registered `Method` subclass; the trainer builds it with
`build_method(config, model, tokenizer)` and the generic train step calls its hooks (see
`vlalign.methods.base.Method` and docs/architecture.md, "Adding a method"). A method defined outside
this package is found when its module is listed in `config.imports`.
"""

from typing import Any

from vlalign.errors import ConfigError
from vlalign.registry import Registry

METHODS: Registry[type] = Registry("method", "vlalign.methods")
register = METHODS.register


def build_method(config: Any, model: Any, tokenizer: Any) -> Any:
  """The method `config.method`, validated against `config`, for `model` and `tokenizer`."""
  if "method" not in config:
    raise ConfigError(f"config lacks 'method'; registered methods: {METHODS.names()}")
  return METHODS.get(config.method)(config, model, tokenizer)
