"""Text transformer: token + learned position embeddings, bidirectional or causal, pooled."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlalign.errors import ConfigError
from vlalign.models import TOWERS
from vlalign.models.layers import (
  PARAM_DTYPE,
  Dtype,
  Encoder,
  causal_mask,
  key_padding_mask,
  take_rows,
)

POOLS = ("first", "eos", "prompt_end", "mean", "last")


def text_attention_mask(mask: jax.Array, causal: bool) -> jax.Array:
  """`[B, L]` padding mask -> boolean attention mask `[B, 1, 1 or L, L]` (keys: real tokens)."""
  attn = key_padding_mask(mask)
  if causal:
    attn = attn & causal_mask(mask.shape[1])
  return attn


def pool_index(mask: jax.Array, pool: str) -> jax.Array | None:
  """The position each row is pooled from, int32 `[B]`, for the single-token pools (`first`,
  `last`, `eos`, `prompt_end`; see `pool_tokens`); None for `mean`."""
  if pool not in POOLS:
    raise ConfigError(f"unknown text pool {pool!r}; choose one of {POOLS}")
  batch, length = mask.shape
  if pool == "mean":
    return None
  if pool in ("first", "last"):
    return jnp.full((batch,), 0 if pool == "first" else length - 1, jnp.int32)
  before_end = 1 if pool == "eos" else 2
  return jnp.maximum(jnp.sum(mask > 0, axis=1) - before_end, 0).astype(jnp.int32)


def pool_tokens(tokens: jax.Array, mask: jax.Array, pool: str) -> jax.Array:
  """`[B, L, D]` -> `[B, D]`.

  `first`: position 0 (the CLS token); `eos`: the last real token, index `sum(mask) - 1` (clipped
  to 0 for an empty row), as CLIP pools; `prompt_end`: the token before it, index `sum(mask) - 2`
  (the last token of a prompt when the tokenizer appends an EOS); `mean`: the mean over real
  tokens (0 for an empty row);
  `last`: the last position whatever the mask (SigLIP pads to a fixed length and pools there).
  """
  index = pool_index(mask, pool)
  if index is not None:
    return take_rows(tokens, index[:, None])[:, 0]
  weights = (mask > 0).astype(jnp.float32)[..., None]
  total = jnp.sum(tokens.astype(jnp.float32) * weights, axis=1)
  return (total / jnp.maximum(jnp.sum(weights, axis=1), 1.0)).astype(tokens.dtype)


@TOWERS.register("text_transformer")
class TextTransformer(nn.Module):
  """Pre-LN text encoder.

  Attributes:
    vocab_size: size of the token embedding table V.
    width: token width D.
    depth, num_heads, mlp_dim, dropout: transformer sizes; `dropout` also on attention weights.
    max_len: number of learned positions; longer inputs raise ValueError.
    causal: causal attention (plus the padding mask) instead of bidirectional.
    pool: how `cls` is taken from the tokens: "first", "eos" or "mean" (see `pool_tokens`).
    dtype: compute dtype (parameters stay float32).
    remat: recompute block activations in the backward pass.
    remat_policy: what `remat` may keep (`vlalign.models.scan.REMAT_POLICIES`).
    scan_layers: the blocks as one `nn.scan` (parameters `encoder/blocks`, a leading layer axis)
      instead of unrolled (`encoder/block_{i}`); see `vlalign/models/scan.py`.
    layer_norm_eps: LayerNorm epsilon (CLIP: 1e-5).
    activation: MLP activation, `gelu` (exact) or `quick_gelu` (OpenAI CLIP).
    attend_padding: padding tokens are attended to like real ones (SigLIP's text model was trained
      without a mask on text padded to a fixed length).
    head: a Dense(D) on the pooled token (SigLIP's text `head`).

  With `causal=True, pool="eos"` this is CLIP's text transformer (Hugging Face `CLIPTextModel`:
  `tokens` = its `last_hidden_state`, `cls` = its `pooler_output`).
  """

  vocab_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  max_len: int
  causal: bool = False
  pool: str = "first"
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  remat: bool = False
  layer_norm_eps: float = 1e-6
  activation: str = "gelu"
  attend_padding: bool = False
  head: bool = False
  remat_policy: str = "full"
  scan_layers: bool = False

  def setup(self):
    if self.pool not in POOLS:
      raise ConfigError(f"unknown text pool {self.pool!r}; choose one of {POOLS}")
    self.token_embed = nn.Embed(
      self.vocab_size,
      self.width,
      embedding_init=nn.initializers.normal(0.02),
      dtype=self.dtype,
      param_dtype=PARAM_DTYPE,
    )
    self.pos_embedding = self.param(
      "pos_embedding", nn.initializers.normal(0.02), (self.max_len, self.width), PARAM_DTYPE
    )
    self.embed_dropout = nn.Dropout(self.dropout)
    if self.head:
      self.head_proj = nn.Dense(self.width, dtype=self.dtype, param_dtype=PARAM_DTYPE)
    self.encoder = Encoder(
      depth=self.depth,
      num_heads=self.num_heads,
      mlp_dim=self.mlp_dim,
      dropout=self.dropout,
      attention_dropout=self.dropout,
      dtype=self.dtype,
      remat=self.remat,
      layer_norm_eps=self.layer_norm_eps,
      activation=self.activation,
      remat_policy=self.remat_policy,
      scan_layers=self.scan_layers,
    )

  def embedding_table(self) -> jax.Array:
    """The float32 token embedding table `[V, D]` (for an MLM decoder tied to it)."""
    return self.token_embed.embedding

  def __call__(
    self, ids: jax.Array, mask: jax.Array, train: bool = False, tokens: bool = True
  ) -> dict[str, jax.Array]:
    """ids `[B, L]` int32, mask `[B, L]` (1 real, 0 pad) -> `cls` `[B, D]`, `tokens` `[B, L, D]`.

    With `tokens=False` only `cls` is returned; pooled from one token (every pool but `mean`), the
    last block then computes that token's row alone (`Encoder`'s `rows`): the same `cls`, for
    ~1/depth less work.
    """
    length = ids.shape[1]
    if length > self.max_len:
      raise ConfigError(
        f"text length {length} exceeds model.text.max_len={self.max_len}; "
        "truncate the text or raise max_len"
      )
    x = self.token_embed(ids) + self.pos_embedding[:length].astype(self.dtype)
    x = self.embed_dropout(x, deterministic=not train)
    attend = jnp.ones_like(mask) if self.attend_padding else mask
    attention_mask = text_attention_mask(attend, self.causal)
    index = None if tokens else pool_index(mask, self.pool)
    if index is None:
      x = self.encoder(x, attention_mask, train)
      cls = pool_tokens(x, mask, self.pool)
    else:
      cls = self.encoder(x, attention_mask, train, index[:, None])[:, 0]
    if self.head:
      cls = self.head_proj(cls)
    return {"cls": cls, "tokens": x} if tokens else {"cls": cls}
