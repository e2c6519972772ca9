"""Pieces shared by every config: encoder sizes, data, optimizer, evaluators, run lengths.

Each method's config file composes these and overrides what its recipe changes. Variants:
`tiny` (seconds on a CPU, for tests), `demo` (the README's job: minutes on 2 CPU cores), `full` (the
published recipe's fields).
"""

import ml_collections

# Transformer sizes (width, depth, heads, mlp_dim), as in ViT / BERT / CLIP.
SIZES = {
  "mu": dict(width=32, depth=1, num_heads=2, mlp_dim=64),  # unit tests
  "Ti": dict(width=192, depth=12, num_heads=3, mlp_dim=768),
  "S": dict(width=384, depth=12, num_heads=6, mlp_dim=1536),
  "B": dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
  "demo": dict(width=128, depth=3, num_heads=4, mlp_dim=512),
}

SHAPES_VOCAB_SIZE = 128  # >= the word tokenizer of the embedded dataset (checked at start-up).


# Weight decay on dense/conv kernels and token-embedding tables only: never on norms, biases,
# scalars, position embeddings or learned tokens (`vlalign/optim.py`).
DECAY = ("(.*/)?kernel", "(.*/)?embedding")


def image_tower(size: str, image_size: int, patch_size: int, **overrides) -> dict:
  """A `vit` tower (`vlalign/models/vit.py`) of transformer size `size`."""
  tower = dict(kind="vit", image_size=image_size, patch_size=patch_size, dropout=0.0)
  return {**tower, **SIZES[size], **overrides}


def text_tower(size: str, vocab_size: int, max_len: int, **overrides) -> dict:
  """A `text_transformer` tower (`vlalign/models/text.py`) of transformer size `size`."""
  tower = dict(
    kind="text_transformer",
    vocab_size=vocab_size,
    max_len=max_len,
    causal=False,
    pool="first",
    dropout=0.0,
  )
  return {**tower, **SIZES[size], **overrides}


def shapes_data(image_size: int, max_len: int = 24, **overrides) -> dict:
  data = dict(
    name="shapes",
    image_size=image_size,
    max_len=max_len,
    tokenizer="shapes_words",
    train_size=200_000,
    val_size=1_000,
    test_size=1_000,
    seed=0,
    num_threads=0,
  )
  return {**data, **overrides}


def retrieval_and_zeroshot_evals(every_steps: int, splits=("val", "test")) -> dict:
  """Retrieval on each split (5 captions per image) and zero-shot shape/colour classification."""
  evals = {
    f"retrieval_{split}": dict(
      type="retrieval", split=split, every_steps=every_steps if split == "val" else 0
    )
    for split in splits
  }
  for task in ("shape", "color"):
    evals[f"zeroshot_{task}"] = dict(type="zeroshot", split="test", task=task, every_steps=0)
  return evals


def base_config(variant: str) -> ml_collections.ConfigDict:
  """Fields every run has; a method's config fills model, losses and the recipe."""
  if variant not in ("tiny", "demo", "full"):
    raise ValueError(f"unknown config variant {variant!r}; choose tiny, demo or full")
  c = ml_collections.ConfigDict()
  c.name = ""
  c.variant = variant
  c.method = "two_tower"  # a registered method (`vlalign/methods/`)
  c.imports = ()  # modules outside vlalign that register methods, losses, towers, evaluators
  c.init = ml_collections.ConfigDict()  # sub-trees loaded from elsewhere (`vlalign/weights/`)
  c.seed = 0
  c.total_steps = 0
  c.batch_size = 0
  c.log_every = 50
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.keep_period = 0  # 0: keep only the last `keep_checkpoints`; M > 0: also every M-th step.
  c.eval_batch_size = 256
  c.mesh = dict(data=-1, fsdp=1)
  c.optim = dict(
    lr=5e-4,
    warmup_steps=0,
    weight_decay=0.1,
    b1=0.9,
    b2=0.98,
    eps=1e-6,
    grad_clip=1.0,
    min_lr_ratio=0.0,
    decay=DECAY,
    frozen=(),  # parameter path patterns that never change
  )
  return c


def tiny_two_tower(c: ml_collections.ConfigDict) -> None:
  """A model and data small enough that a few steps take seconds on one CPU core."""
  c.total_steps = 4
  c.batch_size = 16
  c.log_every = 2
  c.checkpoint_every = 2
  c.eval_batch_size = 64
  c.optim.warmup_steps = 1
  c.data = shapes_data(image_size=32, max_len=24, train_size=512, val_size=32, test_size=32)
  c.model.image = image_tower("mu", image_size=32, patch_size=8)
  c.model.text = text_tower("mu", SHAPES_VOCAB_SIZE, max_len=24)
  c.model.embed_dim = 32
  c.evals = retrieval_and_zeroshot_evals(every_steps=2)
