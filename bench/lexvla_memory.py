r"""Memory of the full LexVLA step (DINOv2-B/14 + Llama 2 7B), from reduced compiled steps.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 PYTHONPATH=. \
    .venv/bin/python bench/lexvla_memory.py --per_device_batch=2

Compiling 32 Llama layers of width 4096 and 12 ViT layers on a CPU takes long, so this compiles the
real-width step at reduced depths (image, text) = (1, 1), (2, 1) and (1, 2) layers, reads XLA's
memory analysis of each (per device, nothing is allocated), and extrapolates linearly in each
tower's depth to the real (12, 32): `M(12, 32) = M(1, 1) + 11 (M(2, 1) - M(1, 1)) + 31 (M(1, 2) -
M(1, 1))`. The layers of a tower are identical, so arguments (parameters, optimizer state) are
exactly linear in depth; temporaries are linear too with remat (one layer's activations live at a
time besides the per-layer checkpoints). Everything else is the full config's: widths, the
32,000-word lexicon, text length, bfloat16 compute with remat, data-parallel mesh; the batch is
`--per_device_batch` pairs per device (activations scale with it; parameters do not).
"""

import time

import jax
from absl import app, flags

from configs import lexvla
from vlalign import trainer

_PER_DEVICE = flags.DEFINE_integer("per_device_batch", 2, "Pairs per device.")
_FSDP = flags.DEFINE_integer("fsdp", 1, "mesh.fsdp (parameters and optimizer state split over it).")
_TOKENIZER = flags.DEFINE_string(
  "tokenizer_path",
  "tests/fixtures/tiny_spm/tokenizer.model",
  "A local SentencePiece model standing in for Llama 2's (the step depends on the vocabulary size "
  "of the model, not on the tokenizer's).",
)
REAL_DEPTHS = (12, 32)


def compiled_memory(image_depth: int, text_depth: int) -> tuple[dict[str, float], float]:
  """Per-device MiB of the compiled full step at these depths, and the compile seconds."""
  config = lexvla.get_config("full")
  config.data.tokenizer_path = _TOKENIZER.value
  config.batch_size = _PER_DEVICE.value * jax.device_count()
  config.mesh = dict(data=-1, fsdp=_FSDP.value)
  config.model.image.depth = image_depth
  config.model.text.depth = text_depth
  start = time.perf_counter()
  compiled = trainer.lower_step(trainer.build(config, data=False)).compile()
  return trainer.log_memory_analysis(compiled), time.perf_counter() - start


def main(argv):
  del argv
  points = {}
  for depths in ((1, 1), (2, 1), (1, 2)):
    points[depths], seconds = compiled_memory(*depths)
    shown = ", ".join(f"{k} {v:.0f}" for k, v in points[depths].items() if v)
    print(f"depths (image, text) {depths}: compiled in {seconds:.0f}s; per device MiB: {shown}")
  base, image_step, text_step = points[(1, 1)], points[(2, 1)], points[(1, 2)]
  image_layers, text_layers = REAL_DEPTHS[0] - 1, REAL_DEPTHS[1] - 1
  print(
    f"estimate at depths {REAL_DEPTHS}, {_PER_DEVICE.value} pairs per device, "
    f"{jax.device_count()} devices, fsdp {_FSDP.value} (per device MiB):"
  )
  for key, value in base.items():
    estimate = (
      value + image_layers * (image_step[key] - value) + text_layers * (text_step[key] - value)
    )
    print(f"  {key}: {estimate:,.0f}")


if __name__ == "__main__":
  app.run(main)
