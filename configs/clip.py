"""CLIP: two towers trained with symmetric InfoNCE and a learnable temperature.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", ICML 2021.
`--config=configs/clip.py:tiny|demo|full|finetune`; `finetune` starts both towers, the
projections and the temperature from the released ViT-B/16 (`openai/clip-vit-base-patch16`).
"""

import math

import ml_collections

from configs import common

OPENAI_B16 = "hf:openai/clip-vit-base-patch16"


def finetune_from(c: ml_collections.ConfigDict, path: str) -> ml_collections.ConfigDict:
  """`c` (a two-tower config) starting from a whole Hugging Face CLIP checkpoint at `path`: both
  towers in CLIP's layout, the projections and the temperature, and its BPE tokenizer."""
  c.data.tokenizer = "tokenizer_json"
  c.data.tokenizer_path = path
  c.model.image.update(cls_pos_embed=True, ln_pre=True, patch_bias=False)
  c.model.image.update(layer_norm_eps=1e-5, activation="quick_gelu")
  c.model.text.update(causal=True, pool="eos", layer_norm_eps=1e-5, activation="quick_gelu")
  linear = lambda name: {"out/kernel": (name, "linear")}
  c.init = dict(
    image=dict(loader="hf", target="image_encoder", path=path),
    text=dict(loader="hf", target="text_encoder", path=path),
    image_proj=dict(
      loader="hf_tensors",
      target="image_proj",
      path=path,
      tensors=linear("visual_projection.weight"),
    ),
    text_proj=dict(
      loader="hf_tensors", target="text_proj", path=path, tensors=linear("text_projection.weight")
    ),
    logit_scale=dict(
      loader="hf_tensors", target="logit_scale", path=path, tensors={"": ("logit_scale", "copy")}
    ),
  )
  return c


@common.with_data_suffixes
def get_config(variant: str = "demo") -> ml_collections.ConfigDict:
  if variant == "finetune":
    # Fine-tuning the released model at the full config's sizes: a starting point (learning rate
    # and length as in common CLIP fine-tuning), not a published recipe.
    c = finetune_from(get_config("full"), OPENAI_B16)
    c.name, c.variant = "clip_finetune", "finetune"
    c.batch_size = 1024
    c.total_steps = 5_000
    c.optim.update(lr=1e-5, warmup_steps=500, weight_decay=0.1)
    return c
  c = common.base_config(variant)
  c.name = f"clip_{variant}"
  c.model = dict(
    name="two_tower",
    embed_dim=128,
    dtype="float32",
    logit_scale_init=math.log(1 / 0.07),
    logit_bias_init=None,
    proj_hidden=None,
    remat=False,
  )
  c.losses = dict(itc=dict(weight=1.0))

  if variant == "tiny":
    common.tiny_two_tower(c)
  elif variant == "demo":
    c.total_steps = 900  # ~4 minutes on 2 CPU cores, evaluation included
    c.batch_size = 64
    c.log_every = 50
    c.checkpoint_every = 300
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 0.05
    c.data = common.shapes_data(image_size=64, max_len=24)
    c.model.image = common.image_tower("demo", image_size=64, patch_size=8)
    c.model.text = common.text_tower("demo", common.SHAPES_VOCAB_SIZE, max_len=24)
    c.evals = common.retrieval_and_zeroshot_evals(every_steps=300)
  else:  # The published ViT-B/16 recipe (Radford et al. 2021, table 20).
    c.total_steps = 390_625  # 32 epochs of 400M pairs at batch 32,768.
    c.batch_size = 32_768
    c.log_every = 100
    c.checkpoint_every = 2_000
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 2_000
    c.optim.weight_decay = 0.2
    c.model.embed_dim = 512
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.model.scan_layers = True  # one compiled block per tower: ~3x faster compiles
    c.mesh = dict(data=-1, fsdp=1)
    # Image-text tar shards (`data.paths.web`: WIT is not public; CC12M / LAION as img2dataset
    # writes them) and COCO / Flickr30k tests; unset or missing paths stop the run.
    c.data = common.files_data(common.shapes_data(image_size=224, max_len=77), "web")
    c.data.resize = "center_crop"
    c.model.image = common.image_tower("B", image_size=224, patch_size=16)
    c.model.text = common.text_tower(
      "B",
      vocab_size=49_408,
      max_len=77,
      causal=True,
      pool="eos",
      width=512,
      num_heads=8,
      mlp_dim=2048,
    )
    c.evals = common.file_evals(common.retrieval_and_zeroshot_evals(every_steps=10_000), "web")
  return c
