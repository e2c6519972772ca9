"""Pre-LN transformer pieces shared by the image, text and fusion encoders.

Every module takes `dtype` (the compute dtype, e.g. `jnp.bfloat16`) and keeps its parameters in
float32 (`param_dtype`). Dropout is active only with `train=True` and draws from the `"dropout"`
rng.

Attention masks are boolean, True where a query may attend to a key, and broadcastable to
`[B, num_heads, Lq, Lk]`: a key-padding mask is `[B, 1, 1, Lk]`, a causal mask `[1, 1, L, L]`.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlalign.errors import ConfigError
from vlalign.models import scan

Dtype = Any
PARAM_DTYPE = jnp.float32


def key_padding_mask(mask: jax.Array) -> jax.Array:
  """`[B, L]` (nonzero on real tokens) -> boolean `[B, 1, 1, L]`: queries see real keys only."""
  return (mask > 0)[:, None, None, :]


def causal_mask(length: int) -> jax.Array:
  """Boolean `[1, 1, L, L]`, True where key index <= query index."""
  return jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]


def take_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
  """`x[b, rows[b, k]]`: `[B, L, ...]`, int `[B, K]` -> `[B, K, ...]`."""
  index = rows.reshape(rows.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


def query_rows_mask(mask: jax.Array | None, rows: jax.Array) -> jax.Array | None:
  """The attention mask of the queries at `rows` only: `mask` broadcastable to
  `[B, H, Lq, Lk]`, rows int `[B, K]` -> broadcastable to `[B, H, K, Lk]` (a mask that is the same
  for every query, `[., ., 1, Lk]`, is returned as it is)."""
  if mask is None or mask.shape[-2] == 1:
    return mask
  batch, heads, queries, keys = rows.shape[0], mask.shape[1], mask.shape[2], mask.shape[3]
  mask = jnp.broadcast_to(mask, (batch, heads, queries, keys))
  return jnp.take_along_axis(mask, rows[:, None, :, None], axis=2)


_SQRT_HALF = 0.7071067811865476  # 1 / sqrt(2)


def gelu(x: jax.Array) -> jax.Array:
  """The exact (erf) GELU, `0.5 x (1 + erf(x / sqrt(2)))`: PyTorch's `nn.GELU()` formula.

  Equal to `jax.nn.gelu(x, approximate=False)` up to float rounding (within 1e-6 in float32), and
  cheaper on the CPU: `jax.nn.gelu` computes `erfc`, which XLA expands into both of its polynomial
  branches and selects, where `erf` is one polynomial (docs/results.md, "Side by side with
  open_clip").
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * _SQRT_HALF))


# BERT's initialisation of its linear layers' kernels (`initializer_range` 0.02; biases start at
# zero, as Flax's do). BERT-style layers (the `bert` tower, `post_ln` fusion blocks) start from it,
# so the ones a checkpoint does not hold, such as ALBEF's cross-attention, start as in ALBEF.
BERT_KERNEL_INIT = nn.initializers.normal(0.02)


def kernel_init_option(kernel_init: Any) -> dict[str, Any]:
  """`{"kernel_init": kernel_init}`, or `{}` for None (the Flax module's default)."""
  return {} if kernel_init is None else {"kernel_init": kernel_init}


ATTENTION_IMPLEMENTATIONS = ("flax", "xla", "cudnn")


def dot_product_attention_fn(implementation: str) -> Any:
  """An `attention_fn` for `nn.MultiHeadDotProductAttention` computing through
  `jax.nn.dot_product_attention(implementation=...)`: "xla" (the same function as Flax's, any
  backend) or "cudnn" (cuDNN's fused flash attention on NVIDIA GPUs, bfloat16/float16 inputs).
  Neither drops attention probabilities: with a dropout rate and `deterministic=False` it raises
  ConfigError. "flax" returns None (Flax's own `nn.dot_product_attention`, with dropout).

  query `[B, Lq, H, Dh]`, key and value `[B, Lk, H, Dh]`, mask boolean broadcastable to
  `[B, H, Lq, Lk]` -> `[B, Lq, H, Dh]`."""
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ConfigError(
      f"attention_implementation={implementation!r}; choose one of {ATTENTION_IMPLEMENTATIONS}"
    )
  if implementation == "flax":
    return None

  # Flax passes only the keyword arguments this signature names.
  def attention_fn(query, key, value, bias=None, mask=None, dropout_rate=0.0, deterministic=True):
    if dropout_rate > 0 and not deterministic:
      raise ConfigError(
        f"attention_implementation={implementation!r} has no dropout on the attention "
        "probabilities: set the tower's attention dropout to 0 or use 'flax'"
      )
    return jax.nn.dot_product_attention(
      query, key, value, bias=bias, mask=mask, implementation=implementation
    )

  return attention_fn


def attention(
  num_heads: int,
  dropout: float,
  dtype: Dtype,
  train: bool,
  name: str | None = None,
  attention_fn: Any = None,
  kernel_init: Any = None,
) -> nn.MultiHeadDotProductAttention:
  """Multi-head attention with float32 parameters and a float32 softmax; `attention_fn` replaces
  `nn.dot_product_attention` on the projected queries, keys and values (same arguments);
  `kernel_init` the projections' kernel initialiser (None: Flax's default, LeCun normal).

  The dropout on the attention probabilities `[B, H, Lq, Lk]` draws each element on its own, as
  PyTorch's `nn.Dropout` on BERT's `attention_probs` does; Flax's default (`broadcast_dropout`)
  would share one `[Lq, Lk]` mask across the batch and the heads."""
  return nn.MultiHeadDotProductAttention(
    num_heads=num_heads,
    dtype=dtype,
    param_dtype=PARAM_DTYPE,
    dropout_rate=dropout,
    broadcast_dropout=False,
    deterministic=not train,
    force_fp32_for_softmax=True,
    name=name,
    **({} if attention_fn is None else {"attention_fn": attention_fn}),
    **kernel_init_option(kernel_init),
  )


ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")


def activation_fn(name: str):
  """`gelu`: exact (erf) GELU (BERT, ViT); `gelu_tanh`: its tanh approximation; `quick_gelu`:
  `x sigmoid(1.702 x)` (OpenAI CLIP)."""
  if name == "gelu":
    return gelu
  if name == "gelu_tanh":
    return lambda x: nn.gelu(x, approximate=True)
  if name == "quick_gelu":
    return lambda x: x * nn.sigmoid(1.702 * x)
  raise ConfigError(f"unknown activation {name!r}; choose one of {ACTIVATIONS}")


@jax.custom_vjp
def _matmul_transposed_weight_grad(x: jax.Array, w: jax.Array) -> jax.Array:
  """`x @ w` for x `[..., K]`, w `[K, N]`, whose weight gradient contracts a materialised
  transpose (see `dense_dot_general`)."""
  return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _matmul_fwd(x, w):
  return _matmul_transposed_weight_grad(x, w), (x, w)


def _matmul_bwd(residuals, g):
  x, w = residuals
  k, n = w.shape
  dx = jax.lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())))
  rows_x, rows_g = x.reshape(-1, k), g.reshape(-1, n)
  if k <= n:  # transpose the narrower operand: [K, M] @ [M, N]
    dw = jax.lax.optimization_barrier(rows_x.T) @ rows_g
  else:  # ([N, M] @ [M, K]).T; the second barrier keeps XLA from folding the small transpose
    # back into the dot (which would contract both operands along dimension 0 again)
    barrier = jax.lax.optimization_barrier
    dw = barrier(barrier(rows_g.T) @ rows_x).T
  return dx, dw.astype(w.dtype)


_matmul_transposed_weight_grad.defvjp(_matmul_fwd, _matmul_bwd)


def dense_dot_general(x, w, dimension_numbers, precision=None, preferred_element_type=None):
  """`nn.Dense(dot_general=...)`: the same values and gradients as `lax.dot_general`.

  On the CPU the weight gradient `x^T dy` (x `[M, K]`, dy `[M, N]`) contracts both operands along
  their first dimension. YNNPACK, XLA's fast CPU matmul, takes no such operand, so XLA leaves these
  dots to Eigen, at 40-67 GFLOP/s inside the peer-bench step against 82-88 for the others. Here
  the backward pass materialises a transpose of the narrower operand first (`[K, M] @ [M, N]`, or
  `([N, M] @ [M, K])^T`), and the dot goes to YNNPACK: the MLP's weight gradients cost one copy
  of a `[M, min(K, N)]` array each instead (docs/results.md, "Weight gradients"). On other
  backends, and for other dimension numbers, it is `lax.dot_general` unchanged.
  """
  dense = dimension_numbers == (((x.ndim - 1,), (0,)), ((), ())) and w.ndim == 2
  if jax.default_backend() == "cpu" and dense and not precision and preferred_element_type is None:
    return _matmul_transposed_weight_grad(x, w)
  return jax.lax.dot_general(
    x, w, dimension_numbers, precision=precision, preferred_element_type=preferred_element_type
  )


class MlpBlock(nn.Module):
  """Dense(mlp_dim) -> activation -> Dropout -> Dense(D): `[..., D] -> [..., D]`
  (`kernel_init`: the kernels' initialiser; None: Flax's default)."""

  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  activation: str = "gelu"
  kernel_init: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    width = x.shape[-1]
    dense = dict(
      dtype=self.dtype,
      param_dtype=PARAM_DTYPE,
      dot_general=dense_dot_general,
      **kernel_init_option(self.kernel_init),
    )
    y = nn.Dense(self.mlp_dim, **dense, name="fc1")(x)
    y = activation_fn(self.activation)(y)
    y = nn.Dropout(self.dropout)(y, deterministic=not train)
    return nn.Dense(width, **dense, name="fc2")(y)


class EncoderBlock(nn.Module):
  """Pre-LN block: `x + Drop(Attn(LN(x)))`, then `x + Drop(Mlp(LN(x)))`; `[B, L, D] -> [B, L, D]`.

  Attributes:
    num_heads: attention heads (must divide D).
    mlp_dim: hidden width of the MLP.
    dropout: rate of the residual-branch and MLP dropouts.
    attention_dropout: rate of the dropout on the attention probabilities.
    dtype: compute dtype.
    layer_norm_eps: LayerNorm epsilon (Flax's 1e-6 by default; BERT/HF ViT 1e-12, CLIP 1e-5).
    activation: the MLP's activation (`ACTIVATIONS`).
    layer_scale: scale each residual branch by a learned per-channel vector before adding it
      (LayerScale, Touvron et al. 2021; DINOv2), initialised to `layer_scale_init`.
    attention_implementation: how attention is computed (`dot_product_attention_fn`): "flax"
      (default), "xla" or "cudnn"; the last two take no attention dropout.
  """

  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  attention_dropout: float = 0.0
  dtype: Dtype = jnp.float32
  layer_norm_eps: float = 1e-6
  activation: str = "gelu"
  layer_scale: bool = False
  layer_scale_init: float = 1.0
  attention_implementation: str = "flax"

  def _scale(self, name: str, y: jax.Array) -> jax.Array:
    if not self.layer_scale:
      return y
    init = nn.initializers.constant(self.layer_scale_init)
    return y * self.param(name, init, (y.shape[-1],), PARAM_DTYPE).astype(y.dtype)

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    mask: jax.Array | None = None,
    train: bool = False,
    rows: jax.Array | None = None,
  ) -> jax.Array:
    """x `[B, L, D]`; mask boolean, broadcastable to `[B, 1, L, L]` (None: attend everywhere).

    `rows` (int `[B, K]`, optional): compute the block's output at these positions only, `[B, K,
    D]`: the queries come from them, the keys and values from every token, so each output row
    equals the full block's row at that position (a last block whose other rows nobody reads).
    """
    ln = dict(epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=PARAM_DTYPE)
    y = nn.LayerNorm(**ln, name="ln_attn")(x)
    queries = y
    if rows is not None:
      x, queries, mask = take_rows(x, rows), take_rows(y, rows), query_rows_mask(mask, rows)
    attention_fn = dot_product_attention_fn(self.attention_implementation)
    y = attention(self.num_heads, self.attention_dropout, self.dtype, train, "attn", attention_fn)(
      queries, y, y, mask=mask
    )
    x = x + nn.Dropout(self.dropout)(self._scale("ls_attn", y), deterministic=not train)
    y = nn.LayerNorm(**ln, name="ln_mlp")(x)
    y = MlpBlock(self.mlp_dim, self.dropout, self.dtype, self.activation, name="mlp")(y, train)
    return x + nn.Dropout(self.dropout)(self._scale("ls_mlp", y), deterministic=not train)


def apply_blocks_at_rows(
  module: nn.Module,
  blocks: Any,
  x: jax.Array,
  *args: Any,
  depth: int,
  train: bool,
  rows: jax.Array | None = None,
  **options: Any,
) -> jax.Array:
  """`scan.apply_blocks` of `module`'s blocks, returning the output at `rows` (int `[B, K]`) only,
  `[B, K, D]`: the last block computes just those rows (its `rows` argument). While `module`
  initialises (every block's parameters are created in full) or without blocks, every row is
  computed and the rows are taken. rows None: `[B, L, D]`, every row."""
  if rows is None or not depth or module.is_initializing():
    x = scan.apply_blocks(blocks, x, *args, depth=depth, train=train, **options)
    return x if rows is None else take_rows(x, rows)
  return scan.apply_blocks(blocks, x, *args, depth=depth, train=train, rows=rows, **options)


class Encoder(nn.Module):
  """`depth` pre-LN `EncoderBlock`s and a final LayerNorm: `[B, L, D] -> [B, L, D]`.

  Attributes:
    depth: number of blocks.
    num_heads, mlp_dim, dropout, attention_dropout, dtype, layer_norm_eps, activation,
      layer_scale, layer_scale_init, attention_implementation: as in `EncoderBlock`.
    remat: recompute each block's activations in the backward pass (`nn.remat`).
    remat_policy: what `remat` may keep (`vlalign.models.scan.REMAT_POLICIES`; "full": nothing).
    scan_layers: run the blocks as one `nn.scan` (parameters `blocks`, leaves `[depth, ...]`)
      instead of unrolled (`block_0` ... `block_{depth-1}`); see `vlalign/models/scan.py`.
  """

  depth: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  attention_dropout: float = 0.0
  dtype: Dtype = jnp.float32
  remat: bool = False
  layer_norm_eps: float = 1e-6
  activation: str = "gelu"
  layer_scale: bool = False
  layer_scale_init: float = 1.0
  remat_policy: str = "full"
  scan_layers: bool = False
  attention_implementation: str = "flax"

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    mask: jax.Array | None = None,
    train: bool = False,
    rows: jax.Array | None = None,
  ) -> jax.Array:
    """x `[B, L, D]`; mask boolean, broadcastable to `[B, 1, L, L]` -> `[B, L, D]`.

    With `rows` (int `[B, K]`) only those positions of the output are computed, `[B, K, D]`, equal
    to the full output's rows there: the last block runs its queries, attention output and MLP on
    these rows only (`EncoderBlock`'s `rows`), which is what a tower pooled from one token needs;
    with scanned blocks the scan runs the layers before it (`scan.scan_blocks`).
    """
    block = dict(
      num_heads=self.num_heads,
      mlp_dim=self.mlp_dim,
      dropout=self.dropout,
      attention_dropout=self.attention_dropout,
      dtype=self.dtype,
      layer_norm_eps=self.layer_norm_eps,
      activation=self.activation,
      layer_scale=self.layer_scale,
      layer_scale_init=self.layer_scale_init,
      attention_implementation=self.attention_implementation,
    )
    options = dict(remat=self.remat, policy=self.remat_policy)
    # train_argnum counts `self` as 0: (self, x, mask, train).
    blocks = scan.make_blocks(
      EncoderBlock, block, self.depth, scan_layers=self.scan_layers, train_argnum=3, **options
    )
    x = apply_blocks_at_rows(
      self, blocks, x, mask, depth=self.depth, train=train, rows=rows, **options
    )
    return nn.LayerNorm(
      epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=PARAM_DTYPE, name="ln_final"
    )(x)


class MAPHead(nn.Module):
  """Multihead attention pooling (Lee et al. 2019; SigLIP, big_vision `MAPHead`):
  `[B, N, D] -> [B, D]`.

  A learned probe attends to the tokens, `y = Attn(probe, x)`, then `y + Mlp(LN(y))`.
  """

  num_heads: int
  mlp_dim: int
  layer_norm_eps: float = 1e-6
  activation: str = "gelu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, x.shape[-1]), PARAM_DTYPE)
    probe = jnp.broadcast_to(probe, (x.shape[0], 1, x.shape[-1])).astype(x.dtype)
    y = attention(self.num_heads, 0.0, self.dtype, False, "attn")(probe, x)
    z = nn.LayerNorm(
      epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=PARAM_DTYPE, name="ln"
    )(y)
    y = y + MlpBlock(self.mlp_dim, 0.0, self.dtype, self.activation, name="mlp")(z)
    return y[:, 0]
