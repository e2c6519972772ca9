"""ALBEF: ITC with momentum distillation against feature queues, ITM on hard negatives, MLM.

Li et al., "Align before Fuse: Vision and Language Representation Learning with Momentum
Distillation", NeurIPS 2021 (salesforce/ALBEF `configs/Pretrain.yaml`, `Pretrain.py`).
`--config=configs/albef.py:tiny|demo|full`. `configs/tcl.py` builds on `albef_config`.

Method `momentum` (`vlalign/methods/momentum.py`): EMA teacher, queues, alpha ramp, ITM on hard
negatives, MLM. Loss: `cma` (ALBEF's `loss_ita`: i2t + t2i with soft targets against
[teacher | queue]) + `itm` + `mlm`, each with weight 1, as `loss_mlm + loss_ita + loss_itm` in
`Pretrain.py`.
"""

import math

import ml_collections

from configs import common

# The published 4M pre-training set (COCO, VG, SBU, CC3M): 5.1M image-text pairs.
PAIRS_4M = 5_100_000

# Augmentation for the embedded dataset: the published recipe's ops at strengths that keep the
# captions true (captions name colours and left/right relations: no hue shift, no grayscale, no
# flip; crops keep most of the image; blur and translation scaled to 64 px).
DEMO_AUGMENT = dict(
  crop_scale=(0.5, 1.0),
  flip_prob=0.0,
  jitter_hue=0.0,
  grayscale_prob=0.0,
  blur_sigma=(0.1, 0.5),
  randaug_translate_const=2.5,
)


# The weights ALBEF and TCL start from (Hugging Face layouts; fetched into the Hugging Face cache
# when online, or give a local directory holding config.json + model.safetensors).
DEIT_B16 = "hf:facebook/deit-base-patch16-224"
BERT_BASE = "hf:bert-base-uncased"


def published_init(c: ml_collections.ConfigDict) -> None:
  """DeiT-B/16 (ImageNet, 224 px; its position grid interpolated bicubically to 256 px as ALBEF's
  `interpolate_pos_embed` does) and `bert-base-uncased` with its WordPiece tokenizer: layers 0-5
  the text encoder, layers 6-11 (post-LN, cross-attention added, fresh) the fusion encoder."""
  c.data.tokenizer = "tokenizer_json"
  c.data.tokenizer_path = BERT_BASE
  c.model.image = common.image_tower(
    "B",
    image_size=256,
    patch_size=16,
    cls_pos_embed=True,
    layer_norm_eps=1e-12,
    pos_interpolation="bicubic",
  )
  c.model.text = dict(
    kind="bert",
    vocab_size=30_522,
    max_len=512,
    layer_norm_eps=1e-12,
    pool="first",
    dropout=0.1,
    attention_dropout=0.1,
    **{**common.SIZES["B"], "depth": 6},
  )
  c.model.fusion_depth = 6
  c.model.fusion_style = "post_ln"
  c.init = dict(
    image=dict(loader="hf", target="image_encoder", path=DEIT_B16),
    text=dict(loader="hf", target="text_encoder", path=BERT_BASE, layers="0:6"),
    fusion=dict(loader="hf", target="fusion", tower="fusion", path=BERT_BASE, layers="6:12"),
  )


def albef_config(variant: str, method: str) -> ml_collections.ConfigDict:
  """Model, teacher, MLM, data and recipe shared by ALBEF and TCL; losses are ALBEF's."""
  c = common.base_config(variant)
  c.name = f"{method}_{variant}"
  c.method = "momentum"
  c.model = dict(
    name="albef",
    embed_dim=256,
    dtype="float32",
    logit_scale_init=math.log(1 / 0.07),  # temp 0.07, clamped to [0.001, 0.5] in the losses
    logit_bias_init=None,
    proj_hidden=None,
    proj_bias=True,
    tie_mlm=True,
    remat=False,
  )
  c.teacher = dict(
    momentum=0.995,
    queue_size=65_536,
    alpha=0.4,
    alpha_warmup_steps=1,  # set per variant: one epoch of steps
    image_key="image",
    dropout=True,
  )
  c.itm = dict(hard_negatives=True)  # negatives sampled from the ITC softmax
  c.mlm = dict(prob=0.15)  # mask_id / special_ids ([CLS], [PAD]) come from the tokenizer
  c.losses = dict(
    cma=dict(weight=1.0),
    itm=dict(weight=1.0),
    mlm=dict(weight=1.0),
  )
  # ALBEF: AdamW (torch defaults), wd 0.02, no gradient clipping, cosine to min_lr 1e-5.
  c.optim.update(
    lr=1e-4,
    warmup_steps=2_000,
    weight_decay=0.02,
    b2=0.999,
    eps=1e-8,
    grad_clip=0.0,
    min_lr_ratio=0.1,
    # timm's `create_optimizer` (ALBEF `optim/`): decay on every parameter with 2+ dimensions that
    # is not a bias, which includes ViT's position embedding and CLS token and BERT's embeddings
    # (the temperature, a 0-d parameter there, is parameterised differently here).
    decay=(*common.DECAY, ".*pos_embedding", "(.*/)?cls"),
  )

  if variant == "tiny":
    common.tiny_two_tower(c)
    c.model.fusion_depth = 1
    c.model.embed_dim = 16
    c.teacher.queue_size = 32
    c.teacher.alpha_warmup_steps = 2
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 1
    c.evals["retrieval_itm_test"] = dict(type="retrieval_itm", split="test", k=4, every_steps=0)
  elif variant == "demo":
    c.total_steps = 400  # ~9 minutes on 2 CPU cores (a step costs ~2.3 CLIP demo steps)
    c.batch_size = 64
    c.log_every = 25
    c.checkpoint_every = 200
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.05
    c.optim.grad_clip = 1.0
    c.teacher.queue_size = 2_048
    c.teacher.alpha_warmup_steps = 100  # the demo sees 1/8 of an epoch: ramp over its first 1/4
    c.data = common.shapes_data(image_size=64, max_len=24, num_threads=1)
    c.data.augment = dict(name=method, **DEMO_AUGMENT)
    c.model.embed_dim = 128
    c.model.image = common.image_tower("demo", image_size=64, patch_size=8)
    # The demo text tower's 3 layers split BERT-style: 2 text-only + 1 fusion; dropout 0.1 as
    # BERT (the teacher's text view in TCL is its own dropout noise).
    c.model.text = common.text_tower(
      "demo", common.SHAPES_VOCAB_SIZE, max_len=24, depth=2, dropout=0.1
    )
    c.model.fusion_depth = 1
    c.evals = common.retrieval_and_zeroshot_evals(every_steps=200)
    c.evals["retrieval_itm_test"] = dict(type="retrieval_itm", split="test", k=16, every_steps=0)
  else:  # The published recipe: ViT-B/16 at 256 px, BERT-base split 6 + 6, batch 512, 30 epochs.
    steps_per_epoch = PAIRS_4M // 512
    c.total_steps = 30 * steps_per_epoch
    c.batch_size = 512
    c.log_every = 100
    c.checkpoint_every = 2_000
    c.teacher.alpha_warmup_steps = steps_per_epoch
    c.model.dtype = "bfloat16"
    c.model.remat = True
    # ALBEF's 4M mixture and COCO / Flickr30k tests, from `data.paths.*` (README, "Train on your
    # data"): unset or missing paths stop the run.
    c.data = common.files_data(common.shapes_data(image_size=256, max_len=30), "4m")
    c.data.augment = dict(name=method)
    published_init(c)
    c.evals = common.retrieval_and_zeroshot_evals(every_steps=10_000)
    c.evals["retrieval_itm_test"] = dict(type="retrieval_itm", split="test", k=128, every_steps=0)
    c.evals = common.file_evals(c.evals, "4m")
  return c


@common.with_data_suffixes
def get_config(variant: str = "demo") -> ml_collections.ConfigDict:
  return albef_config(variant, "albef")
