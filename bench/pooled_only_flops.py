r"""FLOPs per sample of a config's train step with and without the pooled-only last block.

  PYTHONPATH=. .venv/bin/python bench/pooled_only_flops.py --configs=clip,siglip --variant=full

The plain two-tower method (CLIP, SigLIP) asks its model for no token outputs, so each tower pooled
from one token computes its last block for that token only (docs/architecture.md, "Outputs
without tokens"). This compiles the step both ways on one CPU device at a batch of 2 (abstract
state and batch, nothing allocated) and prints XLA's FLOPs per sample (`trainer.step_flops`, which
also counts every layer of scanned towers) and their ratio.
"""

import importlib

import jax
from absl import app, flags

from vlalign import trainer

_CONFIGS = flags.DEFINE_list("configs", ["clip", "siglip"], "Config modules under configs/.")
_VARIANT = flags.DEFINE_string("variant", "full", "Config variant.")
_BATCH = 2


def step_flops_asking_tokens(setup, student_tokens: bool) -> float:
  """XLA's FLOPs of one step (`trainer.step_flops`), the method asking its model for the token
  outputs (every row of every block) or not; `setup.method` is left as it was."""
  before = setup.method.student_tokens
  setup.method.student_tokens = student_tokens
  try:
    with jax.set_mesh(setup.mesh):
      step = jax.jit(lambda state, batch: setup.step_fn(state, batch))  # traced afresh each time
      lowered = step.lower(setup.abstract_state, setup.spec)
    return trainer.step_flops(setup, lowered, lowered.compile())
  finally:
    setup.method.student_tokens = before


def main(argv) -> None:
  del argv
  print("| config | GFLOP/sample, every row | GFLOP/sample, pooled-only last block | ratio |")
  print("|---|---|---|---|")
  for name in _CONFIGS.value:
    config = importlib.import_module(f"configs.{name}").get_config(_VARIANT.value)
    config.batch_size, config.evals = _BATCH, {}
    setup = trainer.build(config, data=False)
    full, pruned = (step_flops_asking_tokens(setup, tokens) / _BATCH for tokens in (True, False))
    print(
      f"| {name}:{_VARIANT.value} | {full / 1e9:.2f} | {pruned / 1e9:.2f} | {pruned / full:.3f} |"
    )


if __name__ == "__main__":
  app.run(main)
