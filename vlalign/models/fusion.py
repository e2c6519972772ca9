"""ALBEF / TCL fusion encoder: text blocks that cross-attend to image tokens, and ITM / MLM heads.

Behaviour follows salesforce/ALBEF `models/xbert.py` (BERT-base with `fusion_layer=6`: layers 0-5
text only, layers 6-11 add cross-attention to the image tokens, keys/values projected from the image
width) and `models/model_pretrain.py` (ITM = Linear(width, 2) on the fused CLS; MLM = BERT
prediction head: Dense + GELU + LayerNorm, then a decoder to the vocabulary tied to the word
embeddings, plus a per-word bias). Two styles: `pre_ln` (our default: pre-LN blocks, as our text
tower, and a final LayerNorm) and `post_ln` (BERT's layers with cross-attention added, as ALBEF
builds them, with no final LayerNorm: the style whose self-attention and MLP load from a BERT
checkpoint's upper layers). All image tokens (CLS included) are valid keys unless a mask says
otherwise.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlalign.errors import ConfigError
from vlalign.models import scan
from vlalign.models.heads import dense_init
from vlalign.models.layers import (
  BERT_KERNEL_INIT,
  PARAM_DTYPE,
  Dtype,
  MlpBlock,
  apply_blocks_at_rows,
  attention,
  gelu,
  kernel_init_option,
  key_padding_mask,
  query_rows_mask,
  take_rows,
)

STYLES = ("pre_ln", "post_ln")


def attention_to_images(image_index: jax.Array | None) -> Any:
  """`nn.dot_product_attention` whose keys and values, projected once per image, `[M, T, H, Dh]`,
  are first gathered to the queries' rows, `key[image_index]` `[B, T, H, Dh]` (None:
  `nn.dot_product_attention` itself). The projection is linear per token, so this is the function
  of projecting `image_tokens[image_index]`, for M instead of B images' projections (ITM pairs
  each image with 3 texts)."""
  if image_index is None:
    return None

  # `wraps` gives `attend` the signature by which Flax's attention picks the arguments it passes.
  @functools.wraps(nn.dot_product_attention)
  def attend(query, key, value, **kwargs):
    return nn.dot_product_attention(query, key[image_index], value[image_index], **kwargs)

  return attend


class CrossAttentionBlock(nn.Module):
  """Fusion block, each sub-layer with dropout and a residual; `[B, L, D] -> [B, L, D]`.

  `pre_ln`: `x + Drop(SelfAttn(LN(x)))`, then `x + Drop(CrossAttn(LN(x), image))`, then
  `x + Drop(Mlp(LN(x)))`. `post_ln` (BERT, ALBEF's `BertLayer` with cross-attention):
  `LN(x + Drop(SelfAttn(x)))`, then `LN(x + Drop(CrossAttn(x, image)))`, then
  `LN(x + Drop(Mlp(x)))`.
  The cross-attention maps the image tokens' width Di to D in its key/value projections.
  `post_ln` blocks are BERT's layers and start as BERT's (`layers.BERT_KERNEL_INIT`, normal(0.02)
  kernels), so a cross-attention no checkpoint holds starts as ALBEF's; `pre_ln` kernels start
  from Flax's LeCun normal.
  """

  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  attention_dropout: float = 0.0
  dtype: Dtype = jnp.float32
  style: str = "pre_ln"
  layer_norm_eps: float = 1e-6

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    image_tokens: jax.Array,
    self_mask: jax.Array | None = None,
    cross_mask: jax.Array | None = None,
    image_index: jax.Array | None = None,
    train: bool = False,
    rows: jax.Array | None = None,
  ) -> jax.Array:
    """x `[B, L, D]`; image_tokens `[B, T, Di]`; masks boolean, `[B, 1, 1 or L, L or T]`.

    `image_index` (int `[B]`, optional): text row b attends to image `image_index[b]` of
    image_tokens `[M, T, Di]`; the cross-attention projects each image's keys and values once
    and gathers them (`attention_to_images`), instead of once per text row.

    `rows` (int `[B, K]`, optional): compute the block's output at these positions only,
    `[B, K, D]`: the self-attention's queries come from them, its keys and values from every
    token, and the cross-attention and MLP run on these rows alone, so each output row equals
    the full block's row at that position (a last block whose other rows nobody reads).
    """
    drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=not train)
    layer_norm = lambda name: nn.LayerNorm(
      epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=PARAM_DTYPE, name=name
    )
    kernel_init = BERT_KERNEL_INIT if self.style == "post_ln" else None
    attn = lambda name, fn=None: attention(
      self.num_heads, self.attention_dropout, self.dtype, train, name, fn, kernel_init
    )
    mlp = MlpBlock(self.mlp_dim, self.dropout, self.dtype, kernel_init=kernel_init, name="mlp")
    cross_attn = lambda: attn("cross_attn", attention_to_images(image_index))
    image = image_tokens.astype(self.dtype)
    pick = (lambda y: y) if rows is None else (lambda y: take_rows(y, rows))
    if rows is not None:
      self_mask, cross_mask = query_rows_mask(self_mask, rows), query_rows_mask(cross_mask, rows)
    if self.style == "post_ln":
      x_rows = pick(x)
      x = layer_norm("ln_self")(x_rows + drop(attn("self_attn")(x_rows, x, x, mask=self_mask)))
      x = layer_norm("ln_cross")(x + drop(cross_attn()(x, image, mask=cross_mask)))
      return layer_norm("ln_mlp")(x + drop(mlp(x, train)))
    y = layer_norm("ln_self")(x)
    x = pick(x) + drop(attn("self_attn")(pick(y), y, y, mask=self_mask))
    y = layer_norm("ln_cross")(x)
    x = x + drop(cross_attn()(y, image, mask=cross_mask))
    y = layer_norm("ln_mlp")(x)
    return x + drop(mlp(y, train))


class FusionEncoder(nn.Module):
  """`depth` `CrossAttentionBlock`s, then (`pre_ln` only) a final LayerNorm.

  Attributes:
    depth: number of fusion blocks.
    num_heads, mlp_dim, dropout, attention_dropout, dtype, style, layer_norm_eps: as in
      `CrossAttentionBlock`.
    remat: recompute each block's activations in the backward pass (`nn.remat`).
    remat_policy: what `remat` may keep (`vlalign.models.scan.REMAT_POLICIES`).
    scan_layers: the blocks as one `nn.scan` (parameters `blocks`, a leading layer axis) instead
      of unrolled (`block_{i}`); see `vlalign/models/scan.py`.
  """

  depth: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  attention_dropout: float = 0.0
  dtype: Dtype = jnp.float32
  remat: bool = False
  style: str = "pre_ln"
  layer_norm_eps: float = 1e-6
  remat_policy: str = "full"
  scan_layers: bool = False

  @nn.compact
  def __call__(
    self,
    text_tokens: jax.Array,
    text_mask: jax.Array,
    image_tokens: jax.Array,
    image_mask: jax.Array | None = None,
    train: bool = False,
    rows: jax.Array | None = None,
    image_index: jax.Array | None = None,
  ) -> jax.Array:
    """Fuses text with image tokens.

    Args:
      text_tokens: `[B, L, D]` text encoder output.
      text_mask: `[B, L]`, 1 on real tokens, 0 on padding (padded keys are never attended to).
      image_tokens: `[B, T, Di]` image tokens (ALBEF: CLS + patches).
      image_mask: optional `[B, T]`, 1 on valid image tokens; None: all valid.
      train: enables dropout.
      rows: optional int `[B, K]`: compute only these positions of the output, `[B, K, D]`, equal
        to the full output's rows there (ITM reads the CLS row alone): the last block runs its
        queries, cross-attention and MLP on these rows only (`CrossAttentionBlock`'s `rows`).
      image_index: optional int `[B]`: text row b is fused with image `image_index[b]` of
        image_tokens (and image_mask) `[M, T, Di]`, each image's keys and values projected once
        per block (`attention_to_images`); None: image_tokens is `[B, T, Di]`, one per text row.

    Returns:
      `[B, L, D]` fused tokens after the final LayerNorm (`[B, K, D]` with `rows`).
    """
    if self.style not in STYLES:
      raise ConfigError(f"unknown fusion style {self.style!r}; choose one of {STYLES}")
    self_mask = key_padding_mask(text_mask)
    if image_mask is not None and image_index is not None:
      image_mask = image_mask[image_index]
    cross_mask = None if image_mask is None else key_padding_mask(image_mask)
    block = dict(
      num_heads=self.num_heads,
      mlp_dim=self.mlp_dim,
      dropout=self.dropout,
      attention_dropout=self.attention_dropout,
      dtype=self.dtype,
      style=self.style,
      layer_norm_eps=self.layer_norm_eps,
    )
    x = text_tokens.astype(self.dtype)
    options = dict(remat=self.remat, policy=self.remat_policy)
    # train_argnum counts `self` as 0:
    # (self, x, image_tokens, self_mask, cross_mask, image_index, train).
    blocks = scan.make_blocks(
      CrossAttentionBlock,
      block,
      self.depth,
      scan_layers=self.scan_layers,
      train_argnum=6,
      **options,
    )
    x = apply_blocks_at_rows(
      self,
      blocks,
      x,
      image_tokens,
      self_mask,
      cross_mask,
      image_index,
      depth=self.depth,
      train=train,
      rows=rows,
      **options,
    )
    if self.style == "post_ln":
      return x
    return nn.LayerNorm(
      epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=PARAM_DTYPE, name="ln_final"
    )(x)


class ITMHead(nn.Module):
  """Image-text matching: `[B, D]` fused CLS -> `[B, 2]` float32 logits (class 1 = match).
  `torch_init`: the classifier starts as PyTorch's `nn.Linear` (ALBEF's `itm_head`)."""

  dtype: Dtype = jnp.float32
  torch_init: bool = False

  @nn.compact
  def __call__(self, cls: jax.Array) -> jax.Array:
    classifier = nn.Dense(
      2,
      dtype=self.dtype,
      param_dtype=PARAM_DTYPE,
      name="classifier",
      **dense_init(self.torch_init, cls.shape[-1]),
    )
    logits = classifier(cls)
    return logits.astype(jnp.float32)


class MLMHead(nn.Module):
  """BERT prediction head: Dense(D) -> GELU -> LayerNorm -> decoder to V words, `[B, L, V]` float32.

  With `embedding` (`[V, D]`, the text token table) the decoder is tied to it, as in BERT:
  `logits = h @ embedding.T + bias`; without it, the decoder is an untied Dense(V).

  Attributes:
    vocab_size: V.
    dtype: compute dtype; the logits are returned in float32.
    layer_norm_eps: the transform's LayerNorm epsilon (BERT: 1e-12).
    kernel_init: the Dense kernels' initialiser (BERT's: `layers.BERT_KERNEL_INIT`); None:
      Flax's default.
  """

  vocab_size: int
  dtype: Dtype = jnp.float32
  layer_norm_eps: float = 1e-6
  kernel_init: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, embedding: jax.Array | None = None) -> jax.Array:
    """x `[B, L, D]`, embedding `[V, D]` or None -> logits `[B, L, V]` float32."""
    width = x.shape[-1]
    dense = dict(dtype=self.dtype, param_dtype=PARAM_DTYPE, **kernel_init_option(self.kernel_init))
    h = gelu(nn.Dense(width, **dense, name="transform")(x))
    h = nn.LayerNorm(
      epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=PARAM_DTYPE, name="ln"
    )(h)
    if embedding is None:
      logits = nn.Dense(self.vocab_size, **dense, name="decoder")(h)
      return logits.astype(jnp.float32)
    if embedding.shape != (self.vocab_size, width):
      raise ValueError(
        f"tied MLM decoder: embedding table {embedding.shape} != (vocab_size, width) "
        f"{(self.vocab_size, width)}"
      )
    bias = self.param("bias", nn.initializers.zeros, (self.vocab_size,), PARAM_DTYPE)
    logits = jnp.einsum("bld,vd->blv", h, embedding.astype(self.dtype))
    return logits.astype(jnp.float32) + bias
