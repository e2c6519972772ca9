"""A config of `configs/` whose image tower computes attention through
`jax.nn.dot_product_attention` (`model.image.attention_implementation`, `vlalign.models.vit`):

  --config=bench/attention_config.py:clip.full.cudnn   # configs/clip.py:full, cuDNN flash attention
  --config=bench/attention_config.py:clip.tiny.xla     # the same function as Flax's, any backend

For benchmarks (bench/gpu_bench.sh) that compare it with the config's own attention; the field is
not in the configs themselves, so that their workdirs' `config.json` stay as they are.
"""

import importlib

import ml_collections


def get_config(spec: str) -> ml_collections.ConfigDict:
  """`spec` is `config.variant.implementation`, e.g. `clip.full.cudnn`."""
  parts = spec.split(".")
  if len(parts) != 3:
    raise ValueError(f"{spec!r}: give CONFIG.VARIANT.IMPLEMENTATION, e.g. clip.full.cudnn")
  name, variant, implementation = parts
  c = importlib.import_module(f"configs.{name}").get_config(variant)
  c.model.image.attention_implementation = implementation
  c.name = f"{c.name}_{implementation}_attention"
  return c
