"""Llama text tower (`kind: llama`): RMSNorm, rotary position embeddings, SwiGLU, grouped-query
causal attention.

The architecture of Hugging Face's `LlamaModel` (Touvron et al. 2023, Llama 2), so its checkpoints
load unchanged (`vlalign/weights/hf.py`): token embedding; per layer `x = x + Attn(RMSNorm(x))`,
`x = x + W_down (silu(W_gate h) * W_up h)` with `h = RMSNorm(x)`; a final RMSNorm. Attention is
causal over the real tokens, `num_kv_heads` key/value heads are shared by groups of query heads,
queries and keys are rotated by RoPE (`rotate_half` convention, base `rope_theta`, positions
0..L-1). No biases. RMSNorm statistics and the softmax run in float32 in any compute dtype
(bf16-friendly).

With `lora` set, the projections it names (`LLAMA_LORA_TARGETS`: `query`, `key`, `value`, `out`,
`gate`, `up`, `down`) get LoRA adapters (`vlalign/models/lora.py`), e.g. `block_0/attn/query_lora`,
`block_0/gate_lora`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlalign.errors import ConfigError
from vlalign.models import TOWERS, scan
from vlalign.models.layers import PARAM_DTYPE, Dtype, causal_mask, key_padding_mask
from vlalign.models.lora import add_lora, check_lora
from vlalign.models.text import pool_tokens

# The projections `lora.targets` may name: attention (in `attn`) and SwiGLU (in the block).
LLAMA_LORA_TARGETS = ("query", "key", "value", "out", "gate", "up", "down")


class RMSNorm(nn.Module):
  """`x / sqrt(mean(x^2) + eps) * scale` over the last axis, statistics in float32."""

  eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), PARAM_DTYPE)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * y.astype(self.dtype)


def rope_tables(length: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """`(cos, sin)`, each `[L, Dh]` float32, for positions 0..L-1 (halves repeated, as in HF)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None]
  angles = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x `[B, L, H, Dh]` rotated: `x cos + rotate_half(x) sin`, in float32, returned in x's dtype."""
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos[None, :, None] + rotated * sin[None, :, None]).astype(x.dtype)


class GroupedQueryAttention(nn.Module):
  """Causal attention, `num_kv_heads` key/value heads, RoPE: `[B, L, D] -> [B, L, D]`.

  `lora`: a checked LoRA config (`check_lora`) whose attention targets get adapters, or None.
  """

  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float
  attention_dropout: float = 0.0
  dtype: Dtype = jnp.float32
  lora: dict | None = None

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, train: bool = False) -> jax.Array:
    """x `[B, L, D]`; mask boolean, broadcastable to `[B, 1, L, L]`."""
    dense = lambda heads, name: nn.DenseGeneral(
      (heads, self.head_dim), use_bias=False, dtype=self.dtype, param_dtype=PARAM_DTYPE, name=name
    )
    adapt = lambda y, name, inputs, in_axes=1: add_lora(
      y, inputs, self.lora, name, train, in_axes, self.dtype
    )
    q = adapt(dense(self.num_heads, "query")(x), "query", x)
    k = adapt(dense(self.num_kv_heads, "key")(x), "key", x)
    v = adapt(dense(self.num_kv_heads, "value")(x), "value", x)
    cos, sin = rope_tables(x.shape[1], self.head_dim, self.rope_theta)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    groups = self.num_heads // self.num_kv_heads
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(self.head_dim)
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = nn.Dropout(self.attention_dropout)(probs, deterministic=not train)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v)
    y = nn.DenseGeneral(
      x.shape[-1],
      axis=(-2, -1),
      use_bias=False,
      dtype=self.dtype,
      param_dtype=PARAM_DTYPE,
      name="out",
    )(out)
    return adapt(y, "out", out, in_axes=2)


class LlamaBlock(nn.Module):
  """`x + Attn(RMSNorm(x))`, then `x + SwiGLU(RMSNorm(x))`: `[B, L, D] -> [B, L, D]`.

  `lora`: a checked LoRA config (`check_lora`) whose targets get adapters, or None.
  """

  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float
  norm_eps: float
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  lora: dict | None = None

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, train: bool = False) -> jax.Array:
    drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=not train)
    y = RMSNorm(self.norm_eps, self.dtype, name="ln_attn")(x)
    y = GroupedQueryAttention(
      self.num_heads,
      self.num_kv_heads,
      self.head_dim,
      self.rope_theta,
      self.dropout,
      self.dtype,
      self.lora,
      name="attn",
    )(y, mask, train)
    x = x + drop(y)
    y = RMSNorm(self.norm_eps, self.dtype, name="ln_mlp")(x)
    dense = lambda width, name: nn.Dense(
      width, use_bias=False, dtype=self.dtype, param_dtype=PARAM_DTYPE, name=name
    )
    adapt = lambda out, name, inputs: add_lora(out, inputs, self.lora, name, train, 1, self.dtype)
    gate = adapt(dense(self.mlp_dim, "gate")(y), "gate", y)
    h = nn.silu(gate) * adapt(dense(self.mlp_dim, "up")(y), "up", y)
    return x + drop(adapt(dense(x.shape[-1], "down")(h), "down", h))


@TOWERS.register("llama")
class Llama(nn.Module):
  """Llama decoder used as a text encoder (Hugging Face `LlamaModel` layout).

  Attributes:
    vocab_size, width, depth, num_heads, mlp_dim: `vocab_size`, `hidden_size`,
      `num_hidden_layers`, `num_attention_heads`, `intermediate_size`.
    num_kv_heads: key/value heads (`num_key_value_heads`; must divide `num_heads`).
    head_dim: per-head width (`head_dim`; default `width // num_heads`).
    max_len: longest input (`max_position_embeddings`; RoPE itself has no table).
    rope_theta: RoPE base (`rope_theta`, 10,000 in Llama 2).
    norm_eps: RMSNorm epsilon (`rms_norm_eps`).
    pool: `cls` from the tokens: "eos" (the last real token: what a causal model has read the
      whole text at), "prompt_end" (the token before it: the last token of a prompt, where the
      model predicts the next word; `data.text_template`) or "mean" over real tokens.
    lm_head: an untied output codebook `lm_head` `[V, D]` (`LlamaForCausalLM`'s `lm_head.weight`),
      read by `output_embedding_table()`; the tower's outputs do not use it.
    dropout: residual and attention dropout (0 in Llama).
    dtype: compute dtype (parameters stay float32).
    remat: recompute block activations in the backward pass.
    remat_policy: what `remat` may keep (`vlalign.models.scan.REMAT_POLICIES`).
    scan_layers: the blocks as one `nn.scan` (parameters `blocks`, a leading layer axis) instead
      of unrolled (`block_{i}`); see `vlalign/models/scan.py`.
    lora: LoRA adapters (`vlalign/models/lora.py`): `dict(rank, alpha, dropout, targets)` with
      targets from `LLAMA_LORA_TARGETS`; None (default): none.
  """

  vocab_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  max_len: int = 4096
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-5
  pool: str = "eos"
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  remat: bool = False
  lora: dict | None = None
  lm_head: bool = False
  remat_policy: str = "full"
  scan_layers: bool = False

  def setup(self):
    lora = check_lora(self.lora, LLAMA_LORA_TARGETS, "model.text.lora")
    kv_heads = self.num_kv_heads or self.num_heads
    if self.num_heads % kv_heads:
      raise ConfigError(f"llama: num_kv_heads={kv_heads} must divide num_heads={self.num_heads}")
    if self.pool not in ("eos", "prompt_end", "mean"):
      raise ConfigError(f"unknown llama pool {self.pool!r}; choose 'eos', 'prompt_end' or 'mean'")
    self.token_embed = nn.Embed(
      self.vocab_size,
      self.width,
      embedding_init=nn.initializers.normal(0.02),
      dtype=self.dtype,
      param_dtype=PARAM_DTYPE,
    )
    block = dict(
      num_heads=self.num_heads,
      num_kv_heads=kv_heads,
      head_dim=self.head_dim or self.width // self.num_heads,
      mlp_dim=self.mlp_dim,
      rope_theta=self.rope_theta,
      norm_eps=self.norm_eps,
      dropout=self.dropout,
      dtype=self.dtype,
      lora=lora,
    )
    # train_argnum counts `self` as 0: (self, x, mask, train).
    self.blocks = scan.make_blocks(
      LlamaBlock,
      block,
      self.depth,
      scan_layers=self.scan_layers,
      remat=self.remat,
      policy=self.remat_policy,
      train_argnum=3,
    )
    self.ln_final = RMSNorm(self.norm_eps, self.dtype)
    if self.lm_head:
      self.output_embed = self.param(
        "lm_head", nn.initializers.normal(0.02), (self.vocab_size, self.width), PARAM_DTYPE
      )

  def embedding_table(self) -> jax.Array:
    """The float32 token embedding table `[V, D]`."""
    return self.token_embed.embedding

  def output_embedding_table(self) -> jax.Array:
    """The float32 output codebook `[V, D]` (needs `lm_head=True`)."""
    if not self.lm_head:
      raise ConfigError("this llama tower has no output codebook: set model.text.lm_head=True")
    return self.output_embed

  def __call__(self, ids: jax.Array, mask: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """ids `[B, L]` int32, mask `[B, L]` (1 real, 0 pad) -> `cls` `[B, D]`, `tokens` `[B, L, D]`."""
    length = ids.shape[1]
    if length > self.max_len:
      raise ConfigError(f"text length {length} exceeds model.text.max_len={self.max_len}")
    x = self.token_embed(ids)
    attn_mask = key_padding_mask(mask) & causal_mask(length)
    x = scan.apply_blocks(
      self.blocks,
      x,
      attn_mask,
      depth=self.depth,
      train=train,
      remat=self.remat,
      policy=self.remat_policy,
    )
    x = self.ln_final(x)
    return {"cls": pool_tokens(x, mask, self.pool), "tokens": x}
