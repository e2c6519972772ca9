"""Pieces shared by every config: encoder sizes, data, optimizer, evaluators, run lengths.

Each method's config file composes these and overrides what its recipe changes. Variants:
`tiny` (seconds on a CPU, for tests), `demo` (the README's job: minutes on 2 CPU cores), `full` (the
published recipe's fields).
"""

import functools
from collections.abc import Callable

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
    eval_max_len=ml_collections.config_dict.placeholder(int),  # eval texts' length; None: max_len
    caption_preprocess="none",  # "albef": ALBEF / TCL's pre_caption before tokenizing
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


# Evaluator types that run on any captioned image split; the others (zero-shot shape/colour,
# PatchDis, word precision) need the embedded data's labels and masks.
FILE_EVAL_TYPES = ("retrieval", "retrieval_itm", "lexical_retrieval", "codebook")
DATA_SUFFIXES = ("files", "4m")
# `full` variants train on real data: the ALBEF family on its 4M mixture ("4m"), the two-tower and
# lexical methods on image-text tar shards ("web": CC3M/CC12M/LAION as img2dataset writes them).
# "coco" / "flickr": ALBEF / TCL's retrieval fine-tuning files (train, val, test of one dataset;
# "coco" also has Flickr30k's test, for the COCO model's zero-shot Flickr evaluation).
DATA_LAYOUTS = ("files", "4m", "web", "coco", "flickr")

# ALBEF's 4M pre-training files and its COCO / Flickr30k retrieval files (names as released in
# salesforce/ALBEF's data.tar.gz); `{name}` is `data.paths.name`, set on the command line.
ALBEF_4M = (
  ("coco.json", "coco"),
  ("vg.json", "vg"),
  ("cc3m_train.json", "cc3m"),
  ("cc3m_val.json", "cc3m"),  # both official Pretrain.yaml files train on CC3M's val split too
  ("sbu.json", "sbu"),
)


def _albef_file(ann: str, root: str) -> dict:
  return dict(format="albef_json", ann="{ann}/" + ann, image_root="{" + root + "}")


def files_data(data: dict, layout: str) -> dict:
  """`data` (a shapes data config) reading files instead, same image size, length, tokenizer and
  augmentation (`vlalign/data/files.py`, "Train on your data" in the README).

  layout "files": the embedded data as `python -m vlalign.data.shapes_to_files` writes it, under
  `data.paths.root`. layout "4m": ALBEF's 4M mixture (COCO + VG + CC3M + SBU, concatenated) with
  COCO's 5k val/test and Flickr30k's 1k test, under `data.paths.{ann, coco, vg, cc3m, sbu,
  flickr}`. layout "web": tar shards `data.paths.web` (a glob or `{00000..00099}` pattern) with
  the same COCO/Flickr evaluation. layouts "coco" / "flickr": ALBEF's retrieval fine-tuning files
  (`{coco,flickr30k}_{train,val,test}.json` under `data.paths.ann`, images under `data.paths.coco`
  / `data.paths.flickr`); "coco" also has Flickr30k's test split (zero-shot Flickr).
  """
  data = {k: v for k, v in data.items() if not k.endswith("_size") or k == "image_size"}
  data.update(name="files", resize="squash", decoder="pil", num_threads=8)
  # Train crops come from the stored image ("original"; "resized": squash to image_size first, as
  # before); train_decode_min_side B: JPEGs decoded at the smallest DCT scale keeping both sides
  # >= B (2 * image_size is within ~0.2 grey levels of full resolution; vlalign/data/files.py).
  data.update(
    train_decode="original", train_decode_min_side=ml_collections.config_dict.placeholder(int)
  )
  if layout == "files":
    data["paths"] = dict(root="")
    for split in ("train", "val", "test"):
      data[split] = dict(format="albef_json", ann="{root}/" + f"{split}.json", image_root="{root}")
    return data
  if layout in ("coco", "flickr"):
    data["paths"] = (
      dict(ann="", coco="", flickr="") if layout == "coco" else dict(ann="", flickr="")
    )
    prefix = "coco" if layout == "coco" else "flickr30k"
    for split in ("train", "val", "test"):
      data[split] = _albef_file(f"{prefix}_{split}.json", layout)
    if layout == "coco":
      data["flickr_test"] = _albef_file("flickr30k_test.json", "flickr")
    return data
  if layout == "web":
    data["paths"] = dict(web="", ann="", coco="", flickr="")
    data["train"] = dict(format="webdataset", shards="{web}")
  else:
    data["paths"] = dict(ann="", coco="", vg="", cc3m="", sbu="", flickr="")
    data["train"] = dict(mixture=[_albef_file(ann, root) for ann, root in ALBEF_4M])
  data["val"] = _albef_file("coco_val.json", "coco")
  data["test"] = _albef_file("coco_test.json", "coco")
  data["flickr_test"] = _albef_file("flickr30k_test.json", "flickr")
  return data


def file_evals(evals: dict, layout: str) -> dict:
  """The evaluators of `evals` that run on files; with layout "4m" each test one also on
  Flickr30k's test split."""
  kept = {name: dict(e) for name, e in evals.items() if e["type"] in FILE_EVAL_TYPES}
  if layout in ("4m", "web"):
    for name, e in list(kept.items()):
      if e.get("split") == "test":
        kept[f"{name}_flickr"] = dict(e, split="flickr_test")
  return kept


def with_data_suffixes(get_config: Callable[[str], ml_collections.ConfigDict]):
  """Adds the variants `<variant>_files` and `<variant>_4m` (`files_data`) to a config file's
  `get_config`: the same run reading the embedded data exported to files, or ALBEF's 4M."""

  @functools.wraps(get_config)
  def wrapped(variant: str = "demo") -> ml_collections.ConfigDict:
    base, _, suffix = variant.rpartition("_")
    if suffix not in DATA_SUFFIXES:
      return get_config(variant)
    c = get_config(base)
    c.name, c.variant = f"{c.name}_{suffix}", variant
    c.data = files_data(c.data.to_dict(), suffix)
    c.evals = file_evals(c.evals.to_dict(), suffix)
    return c

  return wrapped
