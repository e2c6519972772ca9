"""Composite models built from the `model` ConfigDict: `TwoTower` (`name: two_tower`) and
`ALBEFModel` (`name: albef`). Output keys follow docs/architecture.md ("Model outputs").

Model config fields (see configs/common.py):

  name: a registered model ("two_tower" | "albef")          embed_dim: E
  dtype: "float32" | "bfloat16"        (compute dtype; parameters stay float32)
  logit_scale_init: log inverse temperature, e.g. math.log(1 / 0.07)
  temperature: how the temperature tau is learned (for ALBEF / TCL; CLIP, SigLIP and the other
               losses read the output `logit_scale`, which both modes give):
    "logit_scale" (default): the parameter `logit_scale` = log(1 / tau), output unchanged; the
                  ALBEF / TCL losses clamp exp(-logit_scale) to [0.001, 0.5] themselves.
    "tau": the parameter `temp` = tau itself (ALBEF's `self.temp`), float32, initialised to
           exp(-logit_scale_init) (0.07). The forward value is clamped to `temperature_range`
           (default [0.001, 0.5]) with a straight-through gradient (value clamped, derivative 1),
           as the reference's in-place `temp.clamp_(0.001, 0.5)` under `no_grad` before the
           forward: the loss is divided by the clamped value and `temp` receives the plain
           gradient even at a bound. Outputs `temperature` (the clamped tau) and `logit_scale`
           = -log(temperature). To keep the stored `temp` in range as the in-place clamp does, add
           `optim.clamp=(("temp", 0.001, 0.5),)` (`vlalign/optim.py`); to decay it as timm's
           AdamW does, add "temp" to `optim.decay`. Adam moves tau and log(1 / tau) differently
           (a step changes tau by about lr in the first case, by about lr * tau in the second),
           so the two modes train differently even inside the range.
  temperature_range: tau mode only: the forward clamp (lo, hi), default `TEMPERATURE_RANGE`;
                     None: no clamp, as the reference's retrieval fine-tuning model
                     (`models/model_retrieval.py` never clamps `temp`)
  logit_bias_init: None, or the SigLIP bias init (e.g. -10)
  proj_hidden: None (linear projections) or the hidden width of MLP projections
  proj_bias: bias in the projections (default: False for two_tower, True for albef as in ALBEF)
  projection: False: no projections, the towers' pooled outputs are the embeddings (their widths
              must be equal; SigLIP, whose towers end in their own heads); default True
  image: dict(kind, ...) an image tower of `vlalign.models.TOWERS` and its fields, e.g.
         kind="vit": image_size, patch_size, width, depth, num_heads, mlp_dim, dropout
  text: dict(kind, ...) a text tower, e.g. kind="text_transformer": vocab_size, max_len, width,
        depth, num_heads, mlp_dim, causal, pool, dropout
  codebook_size: K > 0 adds a codebook of K learnable centres in the joint space (output
                 `codebook` `[K, E]`, unit rows; CODIS); 0 or absent: none
  remat: recompute block activations in the backward pass
  remat_policy: what remat may keep instead of recomputing (`vlalign.models.scan.REMAT_POLICIES`):
                "full" (default: nothing but each block's inputs, what remat has always done),
                "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable"
                (`jax.checkpoint_policies`); another value than "full" needs remat=True
  scan_layers: every tower's (and the fusion encoder's) blocks run as one `nn.scan` with
               parameters stacked along a leading layer axis (`blocks` instead of
               `block_0..block_{n-1}`; `vlalign/models/scan.py`): the same function, compiled
               once per tower instead of once per block. Default False (the unrolled layout of
               existing checkpoints; `scan.stack_layers` / `unstack_layers` convert)
  albef only: fusion_depth (number of fusion blocks; heads, mlp_dim, dropout and layer_norm_eps
              from `text`), fusion_style ("pre_ln" default, "post_ln": BERT layers with
              cross-attention, for a `bert` text tower), tie_mlm (default True: the MLM decoder
              reuses the text token embedding table)
"""

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlalign.errors import ConfigError
from vlalign.models import MODELS, build_tower, scan, tower_outputs
from vlalign.models.fusion import FusionEncoder, ITMHead, MLMHead
from vlalign.models.heads import Codebook, Projection, l2_normalize
from vlalign.models.layers import BERT_KERNEL_INIT

Batch = dict[str, jax.Array]
Outputs = dict[str, jax.Array]

TEMPERATURE_MODES = ("logit_scale", "tau")
# ALBEF / TCL's `temp.clamp_(0.001, 0.5)`; the same bounds as the ALBEF / TCL losses'
# (`vlalign.losses.momentum.TEMPERATURE_MIN` / `TEMPERATURE_MAX`, not imported: models never
# import losses).
TEMPERATURE_RANGE = (0.001, 0.5)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def clip_straight_through(x: jax.Array, lo: float, hi: float) -> jax.Array:
  """`clip(x, lo, hi)` whose derivative is 1 everywhere (the gradient passes the clip as if it
  were the identity), like a parameter clamped in place before the forward pass.

  Args:
    x: any shape.
    lo, hi: the bounds.

  Returns:
    `clip(x, lo, hi)`, the shape of `x`.
  """
  return jnp.clip(x, lo, hi)


@clip_straight_through.defjvp
def _clip_straight_through_jvp(lo, hi, primals, tangents):
  (x,), (dx,) = primals, tangents
  return clip_straight_through(x, lo, hi), dx


def temperature_mode(config: Any) -> str:
  """`config.temperature` (default "logit_scale"), checked."""
  mode = config.get("temperature", "logit_scale")
  if mode not in TEMPERATURE_MODES:
    raise ConfigError(f"config.model.temperature={mode!r} must be one of {TEMPERATURE_MODES}")
  if mode != "tau" and "temperature_range" in config:
    raise ConfigError(
      "config.model.temperature_range applies to temperature='tau' only (the ALBEF / TCL losses "
      "clamp exp(-logit_scale) to [0.001, 0.5] themselves)"
    )
  return mode


def temperature_range(config: Any) -> tuple[float, float] | None:
  """The tau-mode forward clamp `config.temperature_range` (lo, hi), checked; None: no clamp."""
  bounds = config.get("temperature_range", TEMPERATURE_RANGE)
  if bounds is None:
    return None
  try:
    lo, hi = (float(b) for b in bounds)
  except (TypeError, ValueError):
    raise ConfigError(
      f"config.model.temperature_range={bounds!r} must be (lo, hi) or None"
    ) from None
  if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
    raise ConfigError(f"config.model.temperature_range={bounds!r} needs 0 < lo < hi, finite")
  return lo, hi


@MODELS.register("two_tower")
class TwoTower(nn.Module):
  """An image tower and a text tower (`model.image.kind`, `model.text.kind`), each with a
  projection into the joint space.

  `__call__(batch, train)` returns `img/cls`, `img/tokens`, `txt/cls`, `txt/tokens`, `img/emb`,
  `txt/emb` (`[B, E]` float32, unit norm), `logit_scale` `[]` and, when configured,
  `logit_bias` `[]`; with `temperature="tau"` also `temperature` `[]` (tau clamped to
  `temperature_range`, and then `logit_scale` = -log(temperature); see the module docstring).
  `init` through `__call__` creates every parameter `encode_image` and `encode_text` use.
  """

  config: Any
  default_proj_bias = False

  def torch_heads(self) -> bool:
    """Whether the fresh heads start as the reference PyTorch code's `nn.Linear`s
    (`heads.torch_linear_init`); two towers: Flax's defaults (LeCun normal, as open_clip's
    width^-0.5 projections)."""
    return False

  def setup(self):
    c = self.config
    dtype = jnp.dtype(c.get("dtype", "float32"))
    layers = scan.layer_options(c)
    proj = dict(
      hidden=c.get("proj_hidden"),
      use_bias=bool(c.get("proj_bias", self.default_proj_bias)),
      torch_init=self.torch_heads(),
    )
    self.image_encoder = build_tower(c.image, "model.image", dtype=dtype, **layers)
    self.text_encoder = build_tower(c.text, "model.text", dtype=dtype, **layers)
    if c.get("projection", True):
      self.image_proj = Projection(c.embed_dim, **proj)
      self.text_proj = Projection(c.embed_dim, **proj)
    else:  # The towers' pooled outputs are the embeddings (SigLIP's MAP head and text head).
      self.image_proj = self.text_proj = lambda x: x
    if temperature_mode(c) == "tau":
      temperature_range(c)  # Checked here, before any forward pass.
      self.temp = self.param(
        "temp", nn.initializers.constant(math.exp(-c.logit_scale_init)), (), jnp.float32
      )
    else:
      self.logit_scale = self.param(
        "logit_scale", nn.initializers.constant(c.logit_scale_init), (), jnp.float32
      )
    if c.get("logit_bias_init") is not None:
      self.logit_bias = self.param(
        "logit_bias", nn.initializers.constant(c.logit_bias_init), (), jnp.float32
      )
    if c.get("codebook_size"):
      self.codebook = Codebook(int(c.codebook_size), int(c.embed_dim))

  def encode_image(self, images: jax.Array, train: bool = False, tokens: bool = True) -> Outputs:
    """images `[B, H, W, 3]` -> `img/cls` `[B, Di]`, `img/tokens` `[B, N, Di]`, `img/emb`
    `[B, E]`; without `img/tokens` when `tokens=False` (see `tower_outputs`)."""
    out = tower_outputs(self.image_encoder, images, train=train, tokens=tokens)
    return {
      "img/cls": out["cls"],
      **({"img/tokens": out["tokens"]} if tokens else {}),
      "img/emb": l2_normalize(self.image_proj(out["cls"])),
    }

  def encode_text(
    self, ids: jax.Array, mask: jax.Array, train: bool = False, tokens: bool = True
  ) -> Outputs:
    """ids, mask `[B, L]` -> `txt/cls` `[B, Dt]`, `txt/tokens` `[B, L, Dt]`, `txt/emb` `[B, E]`;
    without `txt/tokens` when `tokens=False` (see `tower_outputs`)."""
    out = tower_outputs(self.text_encoder, ids, mask, train=train, tokens=tokens)
    return {
      "txt/cls": out["cls"],
      **({"txt/tokens": out["tokens"]} if tokens else {}),
      "txt/emb": l2_normalize(self.text_proj(out["cls"])),
    }

  def scalars(self) -> Outputs:
    """`logit_scale` (and `temperature` in tau mode, `logit_bias` when configured), float32
    scalars, and the `codebook` `[K, E]` when configured: what does not depend on the batch."""
    if temperature_mode(self.config) == "tau":
      bounds = temperature_range(self.config)
      tau = self.temp if bounds is None else clip_straight_through(self.temp, *bounds)
      out = {"temperature": tau, "logit_scale": -jnp.log(tau)}
    else:
      out = {"logit_scale": self.logit_scale}
    if self.config.get("logit_bias_init") is not None:
      out["logit_bias"] = self.logit_bias
    if self.config.get("codebook_size"):
      out["codebook"] = self.codebook()
    return out

  def __call__(self, batch: Batch, train: bool = False, tokens: bool = True) -> Outputs:
    """batch with `image`, `text_ids`, `text_mask` -> the output dict (see the class docstring);
    `tokens=False` leaves out `img/tokens` and `txt/tokens`, so that the towers may skip the work
    only they need."""
    return {
      **self.encode_image(batch["image"], train, tokens),
      **self.encode_text(batch["text_ids"], batch["text_mask"], train, tokens),
      **self.scalars(),
    }


@MODELS.register("albef")
class ALBEFModel(TwoTower):
  """ALBEF / TCL: `TwoTower` + a fusion encoder over (text tokens, image tokens) + ITM / MLM heads.

  The text tower is the `config.text.depth` text-only layers; `FusionEncoder(config.fusion_depth)`
  plays BERT's upper cross-attention layers. The temperature is learned as `logit_scale` (the log
  inverse temperature; the ALBEF / TCL losses clamp tau to [0.001, 0.5]) or, with
  `temperature="tau"`, as tau itself, ALBEF's `temp` (see the module docstring).

  On top of `TwoTower`'s keys, `__call__` (and `encode_image` / `encode_text`) return
  `img/all_tokens` `[B, 1+N, Di]` (CLS + patches: the fusion input), `img/tokens_emb` `[B, N, E]`
  and `txt/tokens_emb` `[B, L, E]` (L2-normalised projections of the patch / text tokens with the
  global projections: TCL's local features).

  The fusion passes are separate methods a training method calls explicitly: `itm_pairs` (ITM on
  positives and given hard negatives, `itm/logits` `[3B, 2]`) and `masked_lm` (`mlm/logits`
  `[B, L, V]`). `__call__` runs neither, so evaluation pays nothing extra; `model.init(rngs,
  batch)` creates every parameter.
  """

  default_proj_bias = True

  def setup(self):
    super().setup()
    c = self.config
    dtype = jnp.dtype(c.get("dtype", "float32"))
    text = c.text
    self.fusion = FusionEncoder(
      depth=int(c.fusion_depth),
      num_heads=text.num_heads,
      mlp_dim=text.mlp_dim,
      dropout=text.get("dropout", 0.0),
      attention_dropout=text.get("attention_dropout", text.get("dropout", 0.0)),
      dtype=dtype,
      style=c.get("fusion_style", "pre_ln"),
      **scan.layer_options(c),
      layer_norm_eps=text.get("layer_norm_eps", 1e-6),
    )
    bert_style = self.torch_heads()
    bert_mlm = dict(layer_norm_eps=text.get("layer_norm_eps", 1e-12), kernel_init=BERT_KERNEL_INIT)
    self.itm_head = ITMHead(dtype=dtype, torch_init=bert_style)
    self.mlm_head = MLMHead(text.vocab_size, dtype=dtype, **(bert_mlm if bert_style else {}))

  def torch_heads(self) -> bool:
    """ALBEF's BERT-style model (`fusion_style="post_ln"`) starts as ALBEF's code starts it:
    `vision_proj`, `text_proj`, `itm_head` as PyTorch `nn.Linear`s, the MLM head as BERT's
    (normal(0.02) kernels, LayerNorm epsilon from `model.text`, 1e-12 in BERT). The `pre_ln`
    demos keep Flax's defaults."""
    return self.config.get("fusion_style", "pre_ln") == "post_ln"

  def encode_image(self, images: jax.Array, train: bool = False, tokens: bool = True) -> Outputs:
    """`TwoTower.encode_image` + `img/all_tokens` `[B, 1+N, Di]`, `img/tokens_emb` `[B, N, E]`
    (with `tokens=False`, `TwoTower.encode_image`'s alone)."""
    out = super().encode_image(images, train, tokens)
    if not tokens:
      return out
    out["img/all_tokens"] = jnp.concatenate([out["img/cls"][:, None], out["img/tokens"]], axis=1)
    out["img/tokens_emb"] = l2_normalize(self.image_proj(out["img/tokens"]))
    return out

  def encode_text(
    self, ids: jax.Array, mask: jax.Array, train: bool = False, tokens: bool = True
  ) -> Outputs:
    """`TwoTower.encode_text` + `txt/tokens_emb` `[B, L, E]` (with `tokens=False`,
    `TwoTower.encode_text`'s alone)."""
    out = super().encode_text(ids, mask, train, tokens)
    if not tokens:
      return out
    out["txt/tokens_emb"] = l2_normalize(self.text_proj(out["txt/tokens"]))
    return out

  def fuse(
    self,
    text_tokens: jax.Array,
    text_mask: jax.Array,
    image_tokens: jax.Array,
    train: bool = False,
    rows: jax.Array | None = None,
    image_index: jax.Array | None = None,
  ) -> jax.Array:
    """text_tokens `[B, L, D]`, text_mask `[B, L]`, image_tokens `[B, 1+N, Di]` -> `[B, L, D]`
    (`[B, K, D]`, the fused tokens at those positions only, with `rows` int `[B, K]`). With
    `image_index` int `[B]`, image_tokens is `[M, 1+N, Di]` and text b is fused with image
    `image_index[b]` (`FusionEncoder`'s `image_index`)."""
    return self.fusion(text_tokens, text_mask, image_tokens, None, train, rows, image_index)

  def itm_logits(self, fused: jax.Array) -> jax.Array:
    """fused `[B, L, D]` -> ITM logits `[B, 2]` float32 from position 0 (class 1 = match)."""
    return self.itm_head(fused[:, 0])

  def itm_match_logits(
    self,
    text_tokens: jax.Array,
    text_mask: jax.Array,
    image_tokens: jax.Array,
    train: bool = False,
    image_index: jax.Array | None = None,
  ) -> jax.Array:
    """ITM logits `[B, 2]` of the pairs (text b, image b), or (text b, image `image_index[b]`)
    (see `fuse`); the fusion's last block computes the CLS row alone (`fuse`'s `rows`), the only
    one ITM reads."""
    cls_row = jnp.zeros((text_tokens.shape[0], 1), jnp.int32)
    fused = self.fuse(text_tokens, text_mask, image_tokens, train, cls_row, image_index)
    return self.itm_logits(fused)

  def mlm_logits(self, fused: jax.Array) -> jax.Array:
    """fused `[B, L, D]` -> MLM logits `[B, L, V]` float32 (decoder tied unless `tie_mlm=False`)."""
    tied = bool(self.config.get("tie_mlm", True))
    embedding = self.text_encoder.embedding_table() if tied else None
    return self.mlm_head(fused, embedding)

  def itm_pairs(
    self,
    out: Outputs,
    text_mask: jax.Array,
    neg_text: jax.Array,
    neg_image: jax.Array,
    train: bool = False,
  ) -> Outputs:
    """ITM logits of the B positive pairs and 2B given negatives (ALBEF `forward`).

    Args:
      out: this model's outputs on the batch (`txt/tokens`, `img/all_tokens`).
      text_mask: `[B, L]`.
      neg_text: `[B]` int, the text paired with image b as a negative.
      neg_image: `[B]` int, the image paired with text b as a negative.
      train: enables dropout.

    Returns:
      `itm/logits` `[3B, 2]`: pairs (t_b, v_b), then (t_b, v_{neg_image[b]}), then
      (t_{neg_text[b]}, v_b), the order of `vlalign.losses.matching.itm_labels`.
    """
    text, image = out["txt/tokens"], out["img/all_tokens"]
    own_image = jnp.arange(text.shape[0], dtype=jnp.int32)
    logits = self.itm_match_logits(
      jnp.concatenate([text, text, text[neg_text]]),
      jnp.concatenate([text_mask, text_mask, text_mask[neg_text]]),
      image,  # each image's cross-attention keys and values projected once, not 3 times
      train,
      image_index=jnp.concatenate([own_image, neg_image.astype(jnp.int32), own_image]),
    )
    return {"itm/logits": logits}

  def masked_lm(
    self, out: Outputs, mlm_ids: jax.Array, text_mask: jax.Array, train: bool = False
  ) -> Outputs:
    """`mlm/logits` `[B, L, V]` of the masked text `mlm_ids` `[B, L]`, fused with this model's
    image tokens `out["img/all_tokens"]`."""
    text = self.text_encoder(mlm_ids, text_mask, train)["tokens"]
    return {"mlm/logits": self.mlm_logits(self.fuse(text, text_mask, out["img/all_tokens"], train))}

  def __call__(self, batch: Batch, train: bool = False) -> Outputs:
    """`TwoTower.__call__`'s dict + `img/all_tokens`, `img/tokens_emb`, `txt/tokens_emb`."""
    out = super().__call__(batch, train)
    if self.is_initializing():  # Create the fusion and head parameters.
      fused = self.fuse(out["txt/tokens"], batch["text_mask"], out["img/all_tokens"], train)
      self.itm_logits(fused)
      self.mlm_logits(fused)
    return out
