"""SigLIP: two towers trained with the pairwise sigmoid loss, learnable temperature and bias.

Zhai et al., "Sigmoid Loss for Language Image Pre-Training", ICCV 2023
(big_vision `siglip` configs).
`--config=configs/siglip.py:tiny|demo|full`.
"""

import math

import ml_collections

from configs import clip


def get_config(variant: str = "demo") -> ml_collections.ConfigDict:
  c = clip.get_config(variant)
  c.name = f"siglip_{variant}"
  c.model.logit_scale_init = math.log(10.0)  # t' = log 10 and b = -10, as the paper initialises.
  c.model.logit_bias_init = -10.0
  c.losses = dict(siglip=dict(weight=1.0))
  if variant == "full":  # SigLIP B/16: batch 32k, lr 1e-3, wd 1e-4, text pooled at the last token.
    c.optim.lr = 1e-3
    c.optim.weight_decay = 1e-4
    c.optim.b2 = 0.95
    c.optim.warmup_steps = 5_000
    c.model.text.causal = False
    c.model.text.pool = "eos"
    c.model.text.vocab_size = 32_000
    c.model.text.max_len = 64
    c.data.max_len = 64
    c.model.text.width = 768
    c.model.text.num_heads = 12
    c.model.text.mlp_dim = 3072
    c.model.embed_dim = 768
  return c
