"""LexVLA: unified lexical representations for image and text, with the overuse penalty.

Li et al., "Unified Lexical Representation for Interpretable Visual-Language Alignment", NeurIPS
2024 (no public code; what the paper fixes and what is our choice: docs/methods.md, "LexVLA").
`--config=configs/lexvla.py:tiny|demo|full` with optional suffixes: `_flops` replaces the overuse
penalty by the FLOPs regulariser (the paper's Q(FLOPs) ablation); `_textfrozen` freezes the whole
text tower, LoRA off (`lexvla.freeze_text=True`): the text vectors stay the language model's own.

- `full`: the paper's model. DINOv2 ViT-B/14 frozen, with a trainable adapter (one transformer
  block), mapper and visual codebook; Llama 2 7B with LoRA (rank 8 on all seven projections: the
  paper's 21M adapter parameters; the rank itself is not legible in the paper), read at the last
  position of the paper's in-context prompt and scored against its frozen output codebook; elu1p;
  InfoNCE with a learned temperature (init 0.07, scale capped at 100); overuse penalties 5e-4
  (image) and 1e-3 (text) ramped quadratically over 2k steps; Adam, lr 5e-4 cosine, batch 6,144,
  12 epochs of CC-12M (9.2M pairs: 18k steps), bfloat16. The lexicon is Llama 2's whole vocabulary
  (the paper keeps 17,149 of the 32,000 tokens by a rule it does not give). Weights: `hf:` paths,
  which stop with an error naming the repository when they cannot be found; the data is CC-12M
  as image-text tar shards (`data.paths.web`) with COCO / Flickr30k tests (`data.paths.ann`,
  `coco`, `flickr`), whose absence stops the run with the path named.
- `demo`: the frozen image tower is the CLIP demo's (run `configs/clip.py:demo` into
  `workdirs/clip_demo` first; a missing run stops with an error naming it); the text tower is the
  real all-MiniLM-L6-v2 (`configs/lit.py`) with LoRA, mean-pooled (a bidirectional sentence encoder
  has no prediction position, so no prompt), scored against its word-embedding table (BERT ties its
  MLM decoder to it: its output codebook). The lexicon is the dataset's words plus every 20th
  whole-word token of the WordPiece vocabulary (1,140 words), so that the model must pick the
  right words among many.
- `tiny`: a small Llama-kind LM with an output head, the word tokenizer and the prompt, LoRA, the
  dataset's words as lexicon, everything random: seconds per step, for tests.
"""

import functools
import math

import ml_collections

from configs import common, lit

# The paper's in-context lexical prediction prompt (one worked example, then the caption).
PAPER_PROMPT = (
  'The focus of "The man is riding a white horse." lies on important words:"man", "riding", '
  '"white", "horse". The focus of "{}" lies on important words:'
)
LLAMA2_7B = "hf:meta-llama/Llama-2-7b-hf"
DINOV2_BASE = "hf:facebook/dinov2-base"
LORA_ALL = ("query", "key", "value", "out", "gate", "up", "down")
CLIP_DEMO_WORKDIR = "workdirs/clip_demo"
OPTIONS = ("flops", "textfrozen")  # variant suffixes: `demo_flops`, `demo_textfrozen`, ...
DEMO_DISTRACTOR_EVERY = 20  # every 20th whole-word WordPiece token joins the demo lexicon


def llama2_7b(lora_rank: int = 8) -> dict:
  """Llama 2 7B (its config.json) with an output codebook and LoRA on every projection."""
  return dict(
    kind="llama",
    vocab_size=32_000,
    width=4096,
    depth=32,
    num_heads=32,
    num_kv_heads=32,
    mlp_dim=11_008,
    max_len=4096,
    rope_theta=10_000.0,
    norm_eps=1e-5,
    pool="prompt_end",
    lm_head=True,
    lora=dict(rank=lora_rank, alpha=2 * lora_rank, dropout=0.05, targets=LORA_ALL),
  )


def dinov2_base(image_size: int = 224) -> dict:
  """DINOv2 ViT-B/14 (`facebook/dinov2-base`), position grid resized to `image_size`."""
  return dict(
    kind="vit",
    image_size=image_size,
    patch_size=14,
    width=768,
    depth=12,
    num_heads=12,
    mlp_dim=3072,
    cls_pos_embed=True,
    layer_scale=True,
    pos_interpolation="bicubic",
    dropout=0.0,
  )


@functools.cache
def minilm_demo_lexicon() -> tuple[int, ...]:
  """Token ids of the demo lexicon: the WordPiece tokens of the embedded dataset's words, then
  every `DEMO_DISTRACTOR_EVERY`-th alphabetic whole-word token of the vocabulary (sorted ids)."""
  import json  # noqa: PLC0415

  from vlalign.data import shapes  # noqa: PLC0415
  from vlalign.data.tokenizer import JsonTokenizer  # noqa: PLC0415
  from vlalign.weights import hf  # noqa: PLC0415

  directory = hf.resolve_location(lit.MINILM, "model.lexicon_ids")
  tokenizer = JsonTokenizer(directory)
  vocab = json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"]
  ids = {i for word in shapes.vocabulary() for i in tokenizer.token_ids(word)}
  whole_words = sorted(
    i for token, i in vocab.items() if token.isascii() and token.isalpha() and len(token) > 1
  )
  ids.update(whole_words[::DEMO_DISTRACTOR_EVERY])
  return tuple(sorted(ids))


def shapes_lexicon() -> tuple[int, ...]:
  """Token ids of the embedded dataset's words in its word tokenizer (no special tokens)."""
  from vlalign.data import shapes  # noqa: PLC0415
  from vlalign.data.tokenizer import WordTokenizer  # noqa: PLC0415

  tokenizer = WordTokenizer(shapes.vocabulary())
  return tuple(sorted({i for word in shapes.vocabulary() for i in tokenizer.token_ids(word)}))


def lexical_evals(every_steps: int, threshold: float, topk=(16,)) -> dict:
  """Dense and sparsified retrieval (val periodically, test at the end), PatchDis, word
  precision and zero-shot classification."""
  retrieval = dict(type="lexical_retrieval", thresholds=[threshold], topk=list(topk))
  evals = {
    "lexical_val": dict(retrieval, split="val", every_steps=every_steps),
    "lexical_test": dict(retrieval, split="test", every_steps=0),
    "patchdis_shape": dict(type="patchdis", split="test", task="shape", every_steps=0),
    "patchdis_color": dict(type="patchdis", split="test", task="color", every_steps=0),
    "words_test": dict(type="lexical_words", split="test", k=5, every_steps=0),
  }
  for task in ("shape", "color"):
    evals[f"zeroshot_{task}"] = dict(type="zeroshot", split="test", task=task, every_steps=0)
  return evals


def sparsity_losses(
  image_weight: float, text_weight: float, warmup_steps: int, fn: str = "overuse"
) -> dict:
  """`itc` plus `fn` ("overuse" or "flops") on each modality, weights ramped quadratically."""
  ramp = dict(warmup_steps=warmup_steps, power=2.0)
  return dict(
    itc=dict(weight=1.0),
    **{
      f"{fn}_{modality}": dict(fn=fn, modality=modality, weight=weight, weight_schedule=ramp)
      for modality, weight in (("img", image_weight), ("txt", text_weight))
    },
  )


@common.with_data_suffixes
def get_config(variant: str = "demo") -> ml_collections.ConfigDict:
  base, *options = variant.split("_")
  if not set(options) <= set(OPTIONS):
    raise ValueError(
      f"unknown lexvla variant {variant!r}: tiny, demo or full, optionally with suffixes "
      f"{['_' + o for o in OPTIONS]} (e.g. demo_flops)"
    )
  c = common.base_config(base)
  c.name = f"lexvla_{variant}"
  c.variant = variant
  c.method = "lexvla"
  c.lexvla = dict(freeze_image=True, freeze_text=True if "textfrozen" in options else "lora")
  c.model = dict(
    name="lexvla",
    dtype="float32",
    logit_scale_init=math.log(1 / 0.07),
    activation="elu1p",
    adapter_depth=1,
    text_mapper="none",
    remat=False,
  )
  c.optim.update(weight_decay=0.0, b2=0.999, eps=1e-8)  # Adam, as the paper
  fn = "flops" if "flops" in options else "overuse"

  if base == "tiny":
    common.tiny_two_tower(c)
    del c.model["embed_dim"]
    c.data.text_template = 'the focus of "{}" lies on important words :'
    c.data.max_len = 32
    c.model.image = common.image_tower("mu", image_size=32, patch_size=8)
    c.model.text = dict(
      kind="llama",
      vocab_size=common.SHAPES_VOCAB_SIZE,
      width=32,
      depth=1,
      num_heads=2,
      num_kv_heads=1,
      mlp_dim=64,
      max_len=32,
      pool="prompt_end",
      lm_head=True,
      lora=dict(rank=4, alpha=8, dropout=0.0, targets=("query", "value", "up")),
    )
    c.model.lexicon_ids = shapes_lexicon()
    c.losses = sparsity_losses(5e-4, 1e-3, warmup_steps=2, fn=fn)
    threshold = 1 / math.sqrt(len(c.model.lexicon_ids))
    c.evals = lexical_evals(every_steps=2, threshold=threshold, topk=(8,))
  elif base == "demo":
    c.total_steps = 600
    c.batch_size = 64
    c.log_every = 50
    c.checkpoint_every = 300
    c.optim.update(lr=1e-3, warmup_steps=60)
    c.data = common.shapes_data(image_size=64, max_len=24)
    c.data.tokenizer = "tokenizer_json"
    c.data.tokenizer_path = lit.MINILM
    c.model.image = common.image_tower("demo", image_size=64, patch_size=8)
    c.model.text = dict(
      lit.minilm_tower(),
      lora=dict(rank=8, alpha=16, dropout=0.0, targets=("query", "value")),
    )
    c.model.lexicon_ids = minilm_demo_lexicon()
    c.model.text_codebook = "input"
    c.init = dict(
      image=dict(
        loader="checkpoint",
        target="image_encoder",
        workdir=CLIP_DEMO_WORKDIR,
        source="image_encoder",
      ),
      text=dict(loader="hf", target="text_encoder", path=lit.MINILM),
    )
    c.losses = sparsity_losses(5e-4, 1e-3, warmup_steps=200, fn=fn)
    threshold = 1 / math.sqrt(len(c.model.lexicon_ids))
    c.evals = lexical_evals(every_steps=300, threshold=threshold)
  else:
    c.total_steps = 18_000  # 12 epochs of 9.2M pairs at 6,144
    c.batch_size = 6_144
    c.log_every = 100
    c.checkpoint_every = 1_000
    c.optim.update(lr=5e-4, warmup_steps=500)
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.model.scan_layers = True  # one compiled block per tower: ~3x faster compiles
    # Llama 2 7B's float32 weights (25 GiB) split over 8 devices rather than replicated
    # (bench/lexvla_memory.py: 3.5 GiB of arguments per device instead of 27).
    c.mesh = dict(data=-1, fsdp=8)
    # CC-12M as image-text tar shards (`data.paths.web`) and COCO / Flickr30k tests.
    c.data = common.files_data(common.shapes_data(image_size=224, max_len=96), "web")
    c.data.update(tokenizer="sentencepiece", tokenizer_path=LLAMA2_7B, text_template=PAPER_PROMPT)
    c.model.image = dinov2_base(224)
    c.model.text = llama2_7b()
    c.model.lexicon_ids = None
    c.init = dict(
      image=dict(loader="hf", target="image_encoder", path=DINOV2_BASE),
      text=dict(loader="hf", target="text_encoder", path=LLAMA2_7B),
    )
    c.losses = sparsity_losses(5e-4, 1e-3, warmup_steps=2_000, fn=fn)
    c.evals = lexical_evals(every_steps=2_000, threshold=1 / math.sqrt(32_000), topk=(296,))
    c.evals = common.file_evals(c.evals, "web")
  return c
