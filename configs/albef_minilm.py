"""ALBEF whose text and fusion encoders start from a pretrained BERT (the real all-MiniLM-L6-v2).

ALBEF (Li et al., NeurIPS 2021) initialises its text encoder with BERT-base's layers 0-5 and its
fusion encoder with layers 6-11, adding cross-attention to the image tokens (randomly initialised)
to each fusion layer. Here the BERT is all-MiniLM-L6-v2 (6 layers, width 384, with its WordPiece
tokenizer; `configs/lit.py`): layers 0-2 become the text encoder, layers 3-5 the fusion encoder
(tiny: layers 0 and 1), as BERT's post-LN layers (`model.fusion_style="post_ln"`). The image tower
trains from scratch, as in the other demos (ALBEF starts it from DeiT-B/16, which does not ship
offline). The MLM decoder is tied to MiniLM's word embeddings (its transform and bias start fresh:
MiniLM ships no MLM head). `--config=configs/albef_minilm.py:tiny|demo|full`; the same recipe works
for TCL (`with_minilm(configs.tcl.get_config(...))`).
"""

import ml_collections

from configs import albef, common, lit


def with_minilm(
  c: ml_collections.ConfigDict, text_layers: int = 3, fusion_layers: int = 3
) -> ml_collections.ConfigDict:
  """A momentum config (ALBEF, TCL, CODIS) with MiniLM's tokenizer, text and fusion layers: its
  layers 0..text_layers-1 as the text encoder, the next `fusion_layers` as the fusion encoder."""
  c.data.tokenizer = "tokenizer_json"
  c.data.tokenizer_path = lit.MINILM
  c.model.text = {**lit.minilm_tower(dropout=0.1), "depth": text_layers, "pool": "first"}
  c.model.fusion_depth = fusion_layers
  c.model.fusion_style = "post_ln"
  fusion = f"{text_layers}:{text_layers + fusion_layers}"
  init = c.init.to_dict() if hasattr(c.init, "to_dict") else dict(c.init)  # keeps an image entry
  c.init = dict(
    init,
    text=dict(loader="hf", target="text_encoder", path=lit.MINILM, layers=f"0:{text_layers}"),
    fusion=dict(loader="hf", target="fusion", tower="fusion", path=lit.MINILM, layers=fusion),
  )
  return c


@common.with_data_suffixes
def get_config(variant: str = "demo") -> ml_collections.ConfigDict:
  c = albef.get_config(variant)
  if variant == "tiny":  # one text and one fusion layer of MiniLM keep the test compile short
    c = with_minilm(c, text_layers=1, fusion_layers=1)
  else:
    c = with_minilm(c)
  c.name = f"albef_minilm_{variant}"
  if variant == "demo":
    # A step costs ~600 GFLOP at batch 64 (XLA's count; the ALBEF demo's ~10x), half of it the MLM
    # logits over MiniLM's 30,522 words: at batch 32, 300 steps take ~14 minutes on 2 CPU cores
    # (0.36 steps/s; docs/results.md).
    c.batch_size = 32
    c.total_steps = 300
    c.checkpoint_every = 150
    c.teacher.queue_size = 1_024
    c.evals["retrieval_val"]["every_steps"] = 150
    c.optim.lr = 1e-4  # pretrained layers: ALBEF's fine-tuning rate, not the from-scratch demo's
    c.optim.warmup_steps = 30
  return c
