"""Models composed from the `model` ConfigDict: `TwoTower` (CLIP, SigLIP) and `ALBEFModel` (ALBEF,
TCL). Output keys follow docs/architecture.md ("Model outputs").

Model config fields (see configs/common.py):

  name: "two_tower" | "albef"          embed_dim: E
  dtype: "float32" | "bfloat16"        (compute dtype; parameters stay float32)
  logit_scale_init: log inverse temperature, e.g. math.log(1 / 0.07)
  logit_bias_init: None, or the SigLIP bias init (e.g. -10)
  proj_hidden: None (linear projections) or the hidden width of MLP projections
  proj_bias: bias in the projections (default: False for two_tower, True for albef as in ALBEF)
  image: dict(image_size, patch_size, width, depth, num_heads, mlp_dim, dropout)
  text: dict(vocab_size, max_len, width, depth, num_heads, mlp_dim, causal, pool, dropout)
  remat: recompute block activations in the backward pass
  albef only: fusion_depth (number of fusion blocks; heads, mlp_dim and dropout from `text`),
              tie_mlm (default True: the MLM decoder reuses the text token embedding table)
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlalign.losses import matching
from vlalign.losses.momentum import clamped_temperature
from vlalign.models.fusion import FusionEncoder, ITMHead, MLMHead
from vlalign.models.heads import Projection, l2_normalize
from vlalign.models.text import TextTransformer
from vlalign.models.vit import ViT

Batch = dict[str, jax.Array]
Outputs = dict[str, jax.Array]


class TwoTower(nn.Module):
  """ViT image tower + text transformer, each with a projection into the joint space.

  `__call__(batch, train)` returns `img/cls`, `img/tokens`, `txt/cls`, `txt/tokens`, `img/emb`,
  `txt/emb` (`[B, E]` float32, unit norm), `logit_scale` and, when configured, `logit_bias`.
  `init` through `__call__` creates every parameter `encode_image` and `encode_text` use.
  """

  config: Any
  default_proj_bias = False

  def setup(self):
    c = self.config
    dtype = jnp.dtype(c.get("dtype", "float32"))
    remat = bool(c.get("remat", False))
    proj_bias = bool(c.get("proj_bias", self.default_proj_bias))
    self.image_encoder = ViT(**dict(c.image), dtype=dtype, remat=remat)
    self.text_encoder = TextTransformer(**dict(c.text), dtype=dtype, remat=remat)
    self.image_proj = Projection(c.embed_dim, hidden=c.get("proj_hidden"), use_bias=proj_bias)
    self.text_proj = Projection(c.embed_dim, hidden=c.get("proj_hidden"), use_bias=proj_bias)
    self.logit_scale = self.param(
      "logit_scale", nn.initializers.constant(c.logit_scale_init), (), jnp.float32
    )
    if c.get("logit_bias_init") is not None:
      self.logit_bias = self.param(
        "logit_bias", nn.initializers.constant(c.logit_bias_init), (), jnp.float32
      )

  def encode_image(self, images: jax.Array, train: bool = False) -> Outputs:
    """images `[B, H, W, 3]` -> `img/cls` `[B, Di]`, `img/tokens` `[B, N, Di]`, `img/emb`
    `[B, E]`."""
    out = self.image_encoder(images, train)
    return {
      "img/cls": out["cls"],
      "img/tokens": out["tokens"],
      "img/emb": l2_normalize(self.image_proj(out["cls"])),
    }

  def encode_text(self, ids: jax.Array, mask: jax.Array, train: bool = False) -> Outputs:
    """ids, mask `[B, L]` -> `txt/cls` `[B, Dt]`, `txt/tokens` `[B, L, Dt]`, `txt/emb` `[B, E]`."""
    out = self.text_encoder(ids, mask, train)
    return {
      "txt/cls": out["cls"],
      "txt/tokens": out["tokens"],
      "txt/emb": l2_normalize(self.text_proj(out["cls"])),
    }

  def scalars(self) -> Outputs:
    """`logit_scale` (and `logit_bias` when configured), float32 scalars."""
    out = {"logit_scale": self.logit_scale}
    if self.config.get("logit_bias_init") is not None:
      out["logit_bias"] = self.logit_bias
    return out

  def __call__(self, batch: Batch, train: bool = False) -> Outputs:
    """batch with `image`, `text_ids`, `text_mask` -> the output dict (see the class docstring)."""
    return {
      **self.encode_image(batch["image"], train),
      **self.encode_text(batch["text_ids"], batch["text_mask"], train),
      **self.scalars(),
    }


class ALBEFModel(TwoTower):
  """ALBEF / TCL: `TwoTower` + a fusion encoder over (text tokens, image tokens) + ITM / MLM heads.

  The text tower is the `config.text.depth` text-only layers; `FusionEncoder(config.fusion_depth)`
  plays BERT's upper cross-attention layers. `logit_scale` is the log inverse temperature (ALBEF /
  TCL clamp the temperature to [0.001, 0.5] in the loss, not here).

  On top of `TwoTower`'s keys, `__call__` (and `encode_image` / `encode_text`) return
  `img/all_tokens` `[B, 1+N, Di]` (CLS + patches: the fusion input), `img/tokens_emb` `[B, N, E]`
  and `txt/tokens_emb` `[B, L, E]` (L2-normalised projections of the patch / text tokens with the
  global projections: TCL's local features).

  The fusion passes run when the batch asks for them (the train step adds the keys): ITM on
  positives and hard negatives when it holds the teacher's embeddings `teacher/txt/emb` and
  `teacher/img/emb` (`itm/logits` `[3B, 2]`), MLM when it holds masked ids `mlm_ids`
  (`mlm/logits` `[B, L, V]`). Evaluation batches hold neither and pay nothing extra.
  `model.init(rngs, batch)` creates every parameter whatever the batch holds.
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
      attention_dropout=text.get("dropout", 0.0),
      dtype=dtype,
      remat=bool(c.get("remat", False)),
    )
    self.itm_head = ITMHead(dtype=dtype)
    self.mlm_head = MLMHead(text.vocab_size, dtype=dtype)

  def encode_image(self, images: jax.Array, train: bool = False) -> Outputs:
    """`TwoTower.encode_image` + `img/all_tokens` `[B, 1+N, Di]`, `img/tokens_emb` `[B, N, E]`."""
    out = super().encode_image(images, train)
    out["img/all_tokens"] = jnp.concatenate([out["img/cls"][:, None], out["img/tokens"]], axis=1)
    out["img/tokens_emb"] = l2_normalize(self.image_proj(out["img/tokens"]))
    return out

  def encode_text(self, ids: jax.Array, mask: jax.Array, train: bool = False) -> Outputs:
    """`TwoTower.encode_text` + `txt/tokens_emb` `[B, L, E]`."""
    out = super().encode_text(ids, mask, train)
    out["txt/tokens_emb"] = l2_normalize(self.text_proj(out["txt/tokens"]))
    return out

  def fuse(
    self,
    text_tokens: jax.Array,
    text_mask: jax.Array,
    image_tokens: jax.Array,
    train: bool = False,
  ) -> jax.Array:
    """text_tokens `[B, L, D]`, text_mask `[B, L]`, image_tokens `[B, 1+N, Di]` -> `[B, L, D]`."""
    return self.fusion(text_tokens, text_mask, image_tokens, None, train)

  def itm_logits(self, fused: jax.Array) -> jax.Array:
    """fused `[B, L, D]` -> ITM logits `[B, 2]` float32 from position 0 (class 1 = match)."""
    return self.itm_head(fused[:, 0])

  def mlm_logits(self, fused: jax.Array) -> jax.Array:
    """fused `[B, L, D]` -> MLM logits `[B, L, V]` float32 (decoder tied unless `tie_mlm=False`)."""
    tied = bool(self.config.get("tie_mlm", True))
    embedding = self.text_encoder.embedding_table() if tied else None
    return self.mlm_head(fused, embedding)

  def itm_pairs(self, out: Outputs, batch: Batch, train: bool = False) -> Outputs:
    """ITM logits of the B positive pairs and 2B sampled hard negatives (ALBEF `forward`).

    Negatives are drawn with `matching.sample_hard_negatives` from the softmax of the student's
    embeddings against the teacher's (`batch["teacher/img/emb"]`, `batch["teacher/txt/emb"]`
    `[B, E]`) over the clamped temperature, with the `"sample"` rng; pairs with the same
    `image_id` are never negatives.

    Returns:
      `itm/logits` `[3B, 2]`: pairs (t_b, v_b), then (t_b, v_{neg_image[b]}), then
      (t_{neg_text[b]}, v_b), the order of `matching.itm_labels`.
    """
    tau = clamped_temperature(out["logit_scale"])
    sim_i2t = out["img/emb"] @ batch["teacher/txt/emb"].T / tau
    sim_t2i = out["txt/emb"] @ batch["teacher/img/emb"].T / tau
    neg_text, neg_image = matching.sample_hard_negatives(
      sim_i2t, sim_t2i, batch["image_id"], self.make_rng("sample")
    )
    text, mask, image = out["txt/tokens"], batch["text_mask"], out["img/all_tokens"]
    fused = self.fuse(
      jnp.concatenate([text, text, text[neg_text]]),
      jnp.concatenate([mask, mask, mask[neg_text]]),
      jnp.concatenate([image, image[neg_image], image]),
      train,
    )
    return {"itm/logits": self.itm_logits(fused)}

  def masked_lm(self, out: Outputs, batch: Batch, train: bool = False) -> jax.Array:
    """MLM logits `[B, L, V]` of `batch["mlm_ids"]` `[B, L]`, fused with this model's image
    tokens `out["img/all_tokens"]`."""
    text = self.text_encoder(batch["mlm_ids"], batch["text_mask"], train)["tokens"]
    return self.mlm_logits(self.fuse(text, batch["text_mask"], out["img/all_tokens"], train))

  def __call__(self, batch: Batch, train: bool = False) -> Outputs:
    """`TwoTower.__call__`'s dict + `img/all_tokens`, `img/tokens_emb`, `txt/tokens_emb`; with
    `batch["teacher/txt/emb"]` also `itm/logits` (`itm_pairs`), with `batch["mlm_ids"]` also
    `mlm/logits` (`masked_lm`)."""
    out = super().__call__(batch, train)
    if self.is_initializing():
      fused = self.fuse(out["txt/tokens"], batch["text_mask"], out["img/all_tokens"], train)
      self.itm_logits(fused)
      self.mlm_logits(fused)
    if "teacher/txt/emb" in batch:
      out.update(self.itm_pairs(out, batch, train))
    if "mlm_ids" in batch:
      out["mlm/logits"] = self.masked_lm(out, batch, train)
    return out


MODELS = {"two_tower": TwoTower, "albef": ALBEFModel}


def build_model(model_config: Any) -> nn.Module:
  """The model named by `model_config.name` (default "two_tower"), configured by `model_config`."""
  name = model_config.get("name", "two_tower")
  if name not in MODELS:
    raise ValueError(f"unknown model name {name!r}; choose one of {sorted(MODELS)}")
  return MODELS[name](model_config)
