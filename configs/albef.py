"""ALBEF: ITC with momentum distillation against feature queues, ITM on hard negatives, MLM.

Li et al., "Align before Fuse: Vision and Language Representation Learning with Momentum
Distillation", NeurIPS 2021 (salesforce/ALBEF `configs/Pretrain.yaml`, `Pretrain.py`).
`--config=configs/albef.py:tiny|demo|full|published|coco|flickr` (`published_recipe`: the
paper's 4M pre-training and retrieval fine-tuning runs, field by field; `tiny_published`,
`tiny_retrieval`: their switches on the tiny model). `configs/tcl.py` builds on both.

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
    # (and the 0-d temperature: the published variants decay `temp`; here it is a logit_scale).
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
  else:  # The published model, data and length (ViT-B/16 at 256 px, BERT-base 6 + 6, batch 512,
    # 30 epochs) at our defaults: global loss groups, bfloat16, per-step cosine, logit_scale, the
    # fixed MLM form. `published_recipe` below is the official run field by field.
    steps_per_epoch = PAIRS_4M // 512
    c.total_steps = 30 * steps_per_epoch
    c.batch_size = 512
    c.log_every = 100
    c.checkpoint_every = 2_000
    c.teacher.alpha_warmup_steps = steps_per_epoch
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.model.scan_layers = True  # one compiled block per tower: ~3x faster compiles
    # ALBEF's 4M mixture and COCO / Flickr30k tests, from `data.paths.*` (README, "Train on your
    # data"): unset or missing paths stop the run.
    c.data = common.files_data(common.shapes_data(image_size=256, max_len=30), "4m")
    c.data.augment = dict(name=method)
    published_init(c)
    c.evals = common.retrieval_and_zeroshot_evals(every_steps=10_000)
    c.evals["retrieval_itm_test"] = dict(type="retrieval_itm", split="test", k=128, every_steps=0)
    c.evals = common.file_evals(c.evals, "4m")
  return c


# --- The published runs, field by field ---------------------------------------------------------
# `configs/Pretrain.yaml`, `configs/Retrieval_{coco,flickr}.yaml`, `Pretrain.py`, `Retrieval.py` of
# salesforce/ALBEF and uta-smile/TCL; docs/methods.md ("ALBEF and TCL as published") maps every
# field of those files to the config field here and lists what still differs.

GPUS = 8
PER_GPU_BATCH = {"pretrain": 64, "coco": 32, "flickr": 32}  # batch_size / batch_size_train
EPOCHS = {"pretrain": 30, "coco": 5, "flickr": 10}  # schedular.epochs
# Image-text pairs per epoch: ALBEF's 4M json files and its retrieval training files. An epoch of
# the official loader is floor(pairs / GPUs / per-GPU batch) steps; with other copies of the data
# set `optim.steps_per_epoch`, `teacher.alpha_warmup_steps` and `total_steps` from their count.
TRAIN_PAIRS = {"pretrain": PAIRS_4M, "coco": 566_747, "flickr": 145_000}
# schedular: lr, min_lr, warmup_lr, warmup_epochs (timm warm-up intervals of 100 iterations).
SCHEDULE = {
  "pretrain": dict(lr=1e-4, min_lr=1e-5, warmup_lr=1e-5, warmup_intervals=20),
  "coco": dict(lr=1e-5, min_lr=1e-6, warmup_lr=1e-5, warmup_intervals=1),
  "flickr": dict(lr=1e-5, min_lr=1e-6, warmup_lr=1e-5, warmup_intervals=1),
}
K_TEST = {"coco": 256, "flickr": 128}  # ITM re-ranking depth of each test (`k_test`)
# config variant -> stage; `tiny_*` run the same switches on the tiny model and embedded data.
PUBLISHED = {
  "published": "pretrain",
  "coco": "coco",
  "flickr": "flickr",
  "tiny_published": "pretrain",
  "tiny_retrieval": "coco",
}


def published_recipe(variant: str, method: str, ita: dict) -> ml_collections.ConfigDict:
  """ALBEF (`ita` = `{"cma": {}}`) or TCL (`{"tcl_ita": {"grid": 4}}`) as the papers ran it.

  Stages: "pretrain" (4M, 30 epochs from DeiT-B/16 + bert-base-uncased), "coco" / "flickr"
  (retrieval fine-tuning from a pre-training run's checkpoint, `init.model.workdir`; COCO's run
  also reports zero-shot Flickr30k, ALBEF's protocol: the COCO fine-tuned model on Flickr's test).
  """
  stage, tiny = PUBLISHED[variant], variant.startswith("tiny")
  retrieval = stage != "pretrain"
  c = albef_config("tiny" if tiny else "full", method)
  c.name, c.variant = f"{method}_{variant}", variant
  # Per-GPU losses (in-batch columns, LMI negatives, ITM candidates); the queues see every GPU.
  c.batch_size = 16 if tiny else GPUS * PER_GPU_BATCH[stage]
  c.loss_group_size = 4 if tiny else PER_GPU_BATCH[stage]
  steps_per_epoch = 2 if tiny else TRAIN_PAIRS[stage] // c.batch_size
  c.total_steps = 2 * steps_per_epoch if tiny else EPOCHS[stage] * steps_per_epoch
  c.checkpoint_every = steps_per_epoch  # the official scripts save once per epoch
  c.teacher.alpha_warmup_steps = steps_per_epoch  # alpha ramps over epoch 0 (warm_up: True)
  c.teacher.queue_image_id = retrieval  # `idx_queue` of model_retrieval.py
  # float32 everywhere (the official runs use no autocast), no activation recomputation.
  c.model.update(dtype="float32", remat=False, temperature="tau")
  c.model.scan_layers = not tiny  # the same function, compiled once per tower
  # tau itself is learned; pre-training clamps it in place to [0.001, 0.5] before every forward,
  # retrieval fine-tuning never does (model_retrieval.py has no clamp).
  c.model.temperature_range = None if retrieval else (0.001, 0.5)
  schedule = SCHEDULE[stage]
  lr = 1e-3 if tiny else schedule["lr"]
  c.optim.update(
    schedule="albef",
    steps_per_epoch=steps_per_epoch,
    lr=lr,
    min_lr_ratio=schedule["min_lr"] / schedule["lr"],
    warmup_lr=lr * schedule["warmup_lr"] / schedule["lr"],
    warmup_intervals=1 if tiny else schedule["warmup_intervals"],
    warmup_interval_steps=1 if tiny else 100,
    warmup_steps=0,
    weight_decay=0.02,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    grad_clip=0.0,
    # timm's add_weight_decay: every parameter that is not 1-d and not a bias, the 0-d temp too.
    decay=(*common.DECAY, ".*pos_embedding", "(.*/)?cls", "temp"),
  )
  c.optim.clamp = () if retrieval else (("temp", 0.001, 0.5),)
  # Captions: pre_caption (30 words), then 25 tokens at pre-training, 30 at fine-tuning and at
  # every evaluation (`max_length` of the tokenizer calls).
  c.data.caption_preprocess = "albef"
  c.data.max_len = (30 if retrieval else 25) if not tiny else (24 if retrieval else 20)
  c.data.eval_max_len = 30 if not tiny else 24
  # ITM negatives: pre-training excludes only the pair itself, fine-tuning every pair of the
  # image (`idx`); MLM only at pre-training, with the soft-label form the papers trained with.
  c.itm = dict(hard_negatives=True, exclude_same_image=retrieval)
  losses = {name: dict(weight=1.0, **kwargs) for name, kwargs in ita.items()}
  if retrieval:
    del c["mlm"]
    for entry in losses.values():
      entry["match_image_id"] = True
    c.losses = dict(**losses, itm=dict(weight=1.0))
  else:
    c.losses = dict(**losses, itm=dict(weight=1.0), mlm=dict(weight=1.0, distill_form="published"))
  if tiny:
    return c
  if retrieval:
    image_size = 384
    c.model.image.image_size = image_size  # the 256 px grid is resized bicubically on load
    c.init = {"model": dict(loader="checkpoint", target="/", workdir="")}
    c.data = common.files_data(
      common.shapes_data(image_size=image_size, max_len=30, eval_max_len=30), stage
    )
    c.data.update(caption_preprocess="albef", tokenizer="tokenizer_json", tokenizer_path=BERT_BASE)
    # train_transform: crops of 50-100% of the image (pre-training: 20-100%).
    c.data.augment = dict(name=method, crop_scale=(0.5, 1.0))
    k = K_TEST[stage]
    c.evals = {
      "retrieval_itm_val": dict(
        type="retrieval_itm", split="val", k=k, every_steps=steps_per_epoch
      ),
      "retrieval_itm_test": dict(type="retrieval_itm", split="test", k=k, every_steps=0),
    }
    if stage == "coco":  # zero-shot Flickr30k: this model on Flickr's 1k test images, k_test 128
      c.evals["retrieval_itm_test_flickr"] = dict(
        type="retrieval_itm", split="flickr_test", k=K_TEST["flickr"], every_steps=0
      )
  return c


@common.with_data_suffixes
def get_config(variant: str = "demo") -> ml_collections.ConfigDict:
  if variant in PUBLISHED:
    return published_recipe(variant, "albef", {"cma": {}})
  return albef_config(variant, "albef")
