"""SigLIP: two towers trained with the pairwise sigmoid loss, learnable temperature and bias.

Zhai et al., "Sigmoid Loss for Language Image Pre-Training", ICCV 2023
(big_vision `siglip` configs).
`--config=configs/siglip.py:tiny|demo|full`.
"""

import math

import ml_collections

from configs import clip, common

GOOGLE_B16 = "hf:google/siglip-base-patch16-224"


@common.with_data_suffixes
def get_config(variant: str = "demo") -> ml_collections.ConfigDict:
  if variant == "finetune":
    return finetune_config()
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


def finetune_config() -> ml_collections.ConfigDict:
  """Fine-tuning the released SigLIP B/16 (`google/siglip-base-patch16-224`): the MAP-head image
  tower, the text tower pooled at its last position with its head (no projections: those are the
  embeddings), its SentencePiece tokenizer, temperature and bias. A starting point at the full
  config's sizes, not a published recipe."""
  c = get_config("full")
  c.name, c.variant = "siglip_finetune", "finetune"
  path = GOOGLE_B16
  c.data.tokenizer = "sentencepiece"
  c.data.tokenizer_path = path
  c.data.image_size = 224
  c.model.projection = False
  c.model.image.update(class_token=False, pool="map", activation="gelu_tanh")
  c.model.text.update(pool="last", attend_padding=True, head=True, activation="gelu_tanh")
  scalar = lambda name: {"": (name, "copy")}
  c.init = dict(
    image=dict(loader="hf", target="image_encoder", path=path),
    text=dict(loader="hf", target="text_encoder", path=path),
    logit_scale=dict(
      loader="hf_tensors", target="logit_scale", path=path, tensors=scalar("logit_scale")
    ),
    logit_bias=dict(
      loader="hf_tensors", target="logit_bias", path=path, tensors=scalar("logit_bias")
    ),
  )
  c.batch_size = 1024
  c.total_steps = 5_000
  c.optim.update(lr=1e-5, warmup_steps=500, weight_decay=0.1)
  return c
