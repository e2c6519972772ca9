"""BERT text tower (`kind: bert`): post-LN blocks, token types, an embedding LayerNorm.

The architecture of Hugging Face's `BertModel` (Devlin et al. 2019), so its checkpoints load
unchanged (`vlalign/weights/hf.py`): word + learned position + token-type embeddings, LayerNorm,
dropout; then per layer `x = LN(x + Drop(Attn(x)))`, `x = LN(x + Drop(Mlp(x)))` with the exact
(erf) GELU; LayerNorm epsilon 1e-12. There is no final LayerNorm (post-LN ends normalised).
Attention is bidirectional over the real tokens. The token type is 0 everywhere (one segment).

With `lora` set, the projections it names (`BERT_LORA_TARGETS`: attention `query`, `key`, `value`,
`out`; MLP `fc1`, `fc2`) get LoRA adapters (`vlalign/models/lora.py`), e.g.
`block_0/attn/query_lora`, `block_0/mlp/fc1_lora`. The blocks then use `SelfAttention` and `Mlp`,
which have the parameters and the arithmetic of `nn.MultiHeadDotProductAttention` and `MlpBlock`
plus the adapters.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlalign.errors import ConfigError
from vlalign.models import TOWERS, scan
from vlalign.models.layers import (
  BERT_KERNEL_INIT,
  PARAM_DTYPE,
  Dtype,
  MlpBlock,
  activation_fn,
  attention,
  dense_dot_general,
  key_padding_mask,
)
from vlalign.models.lora import add_lora, check_lora
from vlalign.models.text import pool_tokens

BERT_POOLS = ("first", "mean", "pooler")
# Dense layers as BERT initialises them (`layers.BERT_KERNEL_INIT`), with float32 parameters.
BERT_DENSE = dict(param_dtype=PARAM_DTYPE, kernel_init=BERT_KERNEL_INIT)
# The projections `lora.targets` may name: attention (in `attn`) and MLP (in `mlp`).
BERT_LORA_TARGETS = ("query", "key", "value", "out", "fc1", "fc2")


class SelfAttention(nn.Module):
  """`nn.MultiHeadDotProductAttention` as `attention()` makes it (same parameters `query`, `key`,
  `value`, `out` and the same operations), with LoRA adapters on the projections `lora` names:
  `[B, L, D] -> [B, L, D]`.

  Attributes:
    num_heads: attention heads (must divide D).
    dropout: rate on the attention probabilities.
    lora: a checked LoRA config (`check_lora`), or None.
    dtype: compute dtype.
  """

  num_heads: int
  dropout: float = 0.0
  lora: dict | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, train: bool = False) -> jax.Array:
    """x `[B, L, D]`; mask boolean, broadcastable to `[B, 1, L, L]`."""
    head_dim = x.shape[-1] // self.num_heads
    adapt = lambda y, name, inputs, in_axes=1: add_lora(
      y, inputs, self.lora, name, train, in_axes, self.dtype
    )
    dense = lambda name: nn.DenseGeneral(
      (self.num_heads, head_dim), name=name, **BERT_DENSE, dtype=self.dtype
    )
    q, k, v = (adapt(dense(name)(x), name, x) for name in ("query", "key", "value"))
    deterministic = not train or self.dropout == 0.0
    y = nn.dot_product_attention(
      q,
      k,
      v,
      mask=mask,
      dropout_rng=None if deterministic else self.make_rng("dropout"),
      dropout_rate=self.dropout,
      broadcast_dropout=False,  # one draw per element, as `attention()`
      deterministic=deterministic,
      dtype=self.dtype,
      force_fp32_for_softmax=True,
    )
    out = nn.DenseGeneral(x.shape[-1], axis=(-2, -1), name="out", **BERT_DENSE, dtype=self.dtype)(y)
    return adapt(out, "out", y, in_axes=2)


class Mlp(nn.Module):
  """`MlpBlock` (exact GELU) with LoRA adapters on `fc1` / `fc2` as `lora` names:
  `[..., D] -> [..., D]`."""

  mlp_dim: int
  dropout: float = 0.0
  lora: dict | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    adapt = lambda y, name, inputs: add_lora(y, inputs, self.lora, name, train, 1, self.dtype)
    dense = lambda width, name: nn.Dense(
      width, dot_general=dense_dot_general, name=name, **BERT_DENSE, dtype=self.dtype
    )
    y = activation_fn("gelu")(adapt(dense(self.mlp_dim, "fc1")(x), "fc1", x))
    y = nn.Dropout(self.dropout)(y, deterministic=not train)
    return adapt(dense(x.shape[-1], "fc2")(y), "fc2", y)


class PostLNBlock(nn.Module):
  """`x = LN(x + Drop(Attn(x)))`, then `x = LN(x + Drop(Mlp(x)))`: `[B, L, D] -> [B, L, D]`.

  Attributes:
    num_heads, mlp_dim: attention heads and MLP hidden width.
    dropout: rate of the residual-branch and MLP dropouts (BERT's `hidden_dropout_prob`).
    attention_dropout: rate on the attention probabilities (`attention_probs_dropout_prob`).
    layer_norm_eps: LayerNorm epsilon.
    dtype: compute dtype.
    lora: a checked LoRA config (`check_lora`): `SelfAttention` and `Mlp` with adapters; None:
      `attention()` and `MlpBlock`.
  """

  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  attention_dropout: float = 0.0
  layer_norm_eps: float = 1e-12
  dtype: Dtype = jnp.float32
  lora: dict | None = None

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, train: bool = False) -> jax.Array:
    """x `[B, L, D]`; mask boolean, broadcastable to `[B, 1, L, L]`."""
    ln = dict(epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=PARAM_DTYPE)
    if self.lora is None:
      attn = attention(
        self.num_heads, self.attention_dropout, self.dtype, train, "attn", None, BERT_KERNEL_INIT
      )
      y = attn(x, mask=mask)
    else:
      attn = SelfAttention(
        self.num_heads, self.attention_dropout, self.lora, self.dtype, name="attn"
      )
      y = attn(x, mask, train)
    x = nn.LayerNorm(**ln, name="ln_attn")(x + nn.Dropout(self.dropout)(y, deterministic=not train))
    if self.lora is None:
      mlp = MlpBlock(
        self.mlp_dim, self.dropout, self.dtype, kernel_init=BERT_KERNEL_INIT, name="mlp"
      )
      y = mlp(x, train)
    else:
      y = Mlp(self.mlp_dim, self.dropout, self.lora, self.dtype, name="mlp")(x, train)
    return nn.LayerNorm(**ln, name="ln_mlp")(
      x + nn.Dropout(self.dropout)(y, deterministic=not train)
    )


@TOWERS.register("bert")
class Bert(nn.Module):
  """BERT encoder (Hugging Face `BertModel` layout).

  Attributes:
    vocab_size: word-piece vocabulary V (`vocab_size` of the checkpoint's config.json).
    width, depth, num_heads, mlp_dim: `hidden_size`, `num_hidden_layers`, `num_attention_heads`,
      `intermediate_size`.
    max_len: learned positions (`max_position_embeddings`); longer inputs are a ConfigError.
    type_vocab_size: token-type embeddings (`type_vocab_size`); every token uses type 0.
    layer_norm_eps: LayerNorm epsilon (`layer_norm_eps`, 1e-12 in BERT).
    pool: `cls` from the tokens: "first" (the [CLS] token), "mean" (over real tokens, as
      sentence-transformers pools), or "pooler" (BERT's `tanh(Dense([CLS]))`).
    dropout: hidden dropout; `attention_dropout` on the attention probabilities.
    dtype: compute dtype (parameters stay float32).
    remat: recompute block activations in the backward pass.
    remat_policy: what `remat` may keep (`vlalign.models.scan.REMAT_POLICIES`).
    scan_layers: the blocks as one `nn.scan` (parameters `blocks`, a leading layer axis) instead
      of unrolled (`block_{i}`); see `vlalign/models/scan.py`.
    lora: LoRA adapters (`vlalign/models/lora.py`): `dict(rank, alpha, dropout, targets)` with
      targets from `BERT_LORA_TARGETS`; None (default): none.
  """

  vocab_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  max_len: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  pool: str = "first"
  dropout: float = 0.0
  attention_dropout: float = 0.0
  dtype: Dtype = jnp.float32
  remat: bool = False
  lora: dict | None = None
  remat_policy: str = "full"
  scan_layers: bool = False

  def setup(self):
    lora = check_lora(self.lora, BERT_LORA_TARGETS, "model.text.lora")
    if self.pool not in BERT_POOLS:
      raise ConfigError(f"unknown bert pool {self.pool!r}; choose one of {BERT_POOLS}")
    embed = dict(
      features=self.width,
      embedding_init=nn.initializers.normal(0.02),
      dtype=self.dtype,
      param_dtype=PARAM_DTYPE,
    )
    self.token_embed = nn.Embed(self.vocab_size, **embed)
    self.position_embed = nn.Embed(self.max_len, **embed)
    self.type_embed = nn.Embed(self.type_vocab_size, **embed)
    self.embed_ln = nn.LayerNorm(
      epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=PARAM_DTYPE
    )
    self.embed_dropout = nn.Dropout(self.dropout)
    block = dict(
      num_heads=self.num_heads,
      mlp_dim=self.mlp_dim,
      dropout=self.dropout,
      attention_dropout=self.attention_dropout,
      layer_norm_eps=self.layer_norm_eps,
      dtype=self.dtype,
      lora=lora,
    )
    # train_argnum counts `self` as 0: (self, x, mask, train).
    self.blocks = scan.make_blocks(
      PostLNBlock,
      block,
      self.depth,
      scan_layers=self.scan_layers,
      remat=self.remat,
      policy=self.remat_policy,
      train_argnum=3,
    )
    if self.pool == "pooler":
      self.pooler = nn.Dense(self.width, **BERT_DENSE, dtype=self.dtype)

  def embedding_table(self) -> jax.Array:
    """The float32 word-piece embedding table `[V, D]` (for an MLM decoder tied to it)."""
    return self.token_embed.embedding

  def embed(self, ids: jax.Array, train: bool = False) -> jax.Array:
    """ids `[B, L]` -> embeddings `[B, L, D]` (words + positions + type 0, LayerNorm, dropout)."""
    length = ids.shape[1]
    if length > self.max_len:
      raise ConfigError(
        f"text length {length} exceeds model.text.max_len={self.max_len} (the checkpoint's "
        "max_position_embeddings); truncate the text (data.max_len)"
      )
    x = self.token_embed(ids)
    x = x + self.position_embed(jnp.arange(length))[None]
    x = x + self.type_embed(jnp.zeros((1, length), jnp.int32))
    return self.embed_dropout(self.embed_ln(x), deterministic=not train)

  def __call__(self, ids: jax.Array, mask: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """ids `[B, L]` int32, mask `[B, L]` (1 real, 0 pad) -> `cls` `[B, D]`, `tokens` `[B, L, D]`."""
    x = self.embed(ids, train)
    attn_mask = key_padding_mask(mask)
    x = scan.apply_blocks(
      self.blocks,
      x,
      attn_mask,
      depth=self.depth,
      train=train,
      remat=self.remat,
      policy=self.remat_policy,
    )
    if self.pool == "pooler":
      cls = jnp.tanh(self.pooler(x[:, 0]))
    else:
      cls = pool_tokens(x, mask, self.pool)
    return {"cls": cls, "tokens": x}
