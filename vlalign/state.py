"""The train state: one pytree holding everything a step reads and writes."""

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training.

  Attributes:
    step: `[]` int32, number of optimizer steps taken.
    params: student parameters.
    opt_state: optax state.
    rng: `[2]` uint32 base key; step `s` uses `fold_in(rng, s)`.
    extras: method-specific state that is not optimised by gradients (EMA teacher parameters,
      feature queues and their pointer, codebooks, ...), a dict of pytrees; empty for CLIP and
      SigLIP.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  extras: dict[str, Any] = flax.struct.field(default_factory=dict)
