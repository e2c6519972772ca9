"""Memory-linear ("ring") forms of CLIP's InfoNCE and SigLIP's sigmoid loss.

The dense losses of `contrastive.py` are written on the global `[B, E]` embeddings: under `jax.jit`
with the batch sharded over D devices, XLA materialises the `[B, B]` logits as `[B/D, B]` row
blocks, so each device holds memory that grows with the *global* batch. Here each device keeps its
n = B/D image rows, and the text embeddings travel around a ring of the D devices of the mesh's
batch axes (`jax.lax.ppermute`, as ring attention; big_vision's chunked sigmoid loss visits the
same blocks, fetched with a psum): every device sees every text block once, in chunks of c texts,
and keeps running statistics:

* InfoNCE: an online log-sum-exp of its image rows over all texts (image->text), and the same for
  the columns of the visiting texts over the images seen so far (text->image); the column
  statistics travel with their text block and are complete when it arrives back home.
* SigLIP: the sum of `log sigmoid(z * logits)` over each `[n, c]` block.
* Both: the running best text of each image and best image of each text (in-batch accuracy), ties
  to the lowest index as `jnp.argmax`.

The gradient is a `jax.custom_vjp` that runs the ring again: it recomputes each block's logits from
the embeddings and the saved `[n, 2]` log-sum-exp statistics (as FlashAttention does); each text
block's gradient travels with it and arrives back home. (Differentiating through the loop instead
would save every block's logits, `[n, B]` per device: as much as the dense loss.)

Per device: O(n * c + n * E) memory, whatever the global batch. Communication: D - 1 sends of the
`[n, E]` texts (plus `[n]` statistics) forward, about twice that backward. Without a mesh, or with
one device on the batch axes, the same passes run on one device as a loop over chunks of c texts:
memory `[B, c]` instead of `[B, B]`.
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vlalign.errors import ConfigError
from vlalign.sharding import BATCH_AXES

DEFAULT_CHUNK_SIZE = 1024  # Texts per block: `[n, 1024]` float32 temporaries per device.


@dataclasses.dataclass(frozen=True)
class Ring:
  """Static layout of the ring passes.

  Attributes:
    axes: the mesh's batch axes the ring runs over; () on one device (no `shard_map`).
    num_devices: D, the product of their sizes (1 with no axes).
    rows: n, the examples per device (B / D).
    chunk_size: c, the texts per block; divides n.
  """

  axes: tuple[str, ...]
  num_devices: int
  rows: int
  chunk_size: int

  @property
  def batch_size(self) -> int:
    return self.rows * self.num_devices

  def index(self) -> jax.Array:
    """`[]` int32, this device's position on the ring (0 on one device)."""
    return jax.lax.axis_index(self.axes) if self.axes else jnp.zeros((), jnp.int32)

  def psum(self, x: Any) -> Any:
    return jax.lax.psum(x, self.axes) if self.axes else x

  def varying(self, x: Any) -> Any:
    """Marks fresh accumulators as per-device values (loop carries must keep one type)."""
    return jax.lax.pcast(x, self.axes, to="varying") if self.axes else x

  def shift(self, tree: Any) -> Any:
    """Sends every array of `tree` to the next device on the ring."""
    if not self.axes:
      return tree
    perm = [(i, (i + 1) % self.num_devices) for i in range(self.num_devices)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, self.axes, perm), tree)

  def on_devices(self, fn: Callable[..., Any], in_specs: Any, out_specs: Any) -> Callable[..., Any]:
    """`fn` on the per-device blocks: specs 'b' (split on the batch axes) or 'r' (replicated)."""
    if not self.axes:
      return fn
    to_spec = lambda s: P(self.axes) if s == "b" else P()
    return jax.shard_map(
      fn,
      in_specs=jax.tree.map(to_spec, in_specs),
      out_specs=jax.tree.map(to_spec, out_specs),
    )


def ring_layout(batch_size: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Ring:
  """The ring over the batch axes of the current mesh (`jax.set_mesh`), or one device.

  Args:
    batch_size: B, the global batch.
    chunk_size: the most texts per block; the block is the largest divisor of the per-device batch
      not above it.

  Raises:
    ConfigError: B does not split evenly over the devices, or `chunk_size` < 1.
  """
  if chunk_size < 1:
    raise ConfigError(f"chunked contrastive loss: chunk_size={chunk_size} must be >= 1")
  mesh = jax.sharding.get_abstract_mesh()
  axes = () if mesh.empty else tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  num_devices = math.prod(mesh.shape[a] for a in axes)
  if num_devices == 1:
    axes = ()
  if batch_size % num_devices:
    raise ConfigError(
      f"chunked contrastive loss: its {batch_size} examples (the global batch, or one group's "
      f"with config.loss_group_size) do not split over the {num_devices} devices of the mesh's "
      f"batch axes {axes}: use a multiple of {num_devices}, or chunked=False"
    )
  rows = batch_size // num_devices
  chunk = max(d for d in range(1, min(chunk_size, rows) + 1) if rows % d == 0)
  return Ring(axes, num_devices, rows, chunk)


def ring_pass(ring: Ring, step: Callable[..., Any], local: Any, travel: Any, txt: jax.Array):
  """Runs `step` on every chunk of the global batch's texts, inside the per-device function.

  Args:
    ring: the layout.
    step: `(local, travel_chunk, txt_chunk [c, E], cols [c]) -> (local, travel_chunk)`; `cols`
      are the chunk's global text indices, `travel_chunk` the chunk's rows of `travel`.
    local: accumulators that stay on this device.
    travel: `[n, ...]` accumulators of this device's texts: they travel with them around the ring.
    txt: `[n, E]` this device's texts.

  Returns:
    `(local, travel)` once every chunk has been seen, `travel` back on its own device.
  """
  me = ring.index()
  c = ring.chunk_size

  def over_chunks(t, local, travel, txt):
    owner = (me - t) % ring.num_devices  # The device whose texts this one holds at ring step t.

    def chunk_step(k, carry):
      local, travel = carry
      start = k * c
      cut = lambda x: jax.lax.dynamic_slice_in_dim(x, start, c)
      cols = owner * ring.rows + start + jnp.arange(c, dtype=jnp.int32)
      local, chunk = step(local, jax.tree.map(cut, travel), cut(txt), cols)
      put = lambda x, v: jax.lax.dynamic_update_slice_in_dim(x, v, start, 0)
      return local, jax.tree.map(put, travel, chunk)

    return jax.lax.fori_loop(0, ring.rows // c, chunk_step, (local, travel))

  def ring_step(t, carry):
    local, travel, txt = carry
    local, travel = over_chunks(t, local, travel, txt)
    return local, *ring.shift((travel, txt))

  local, travel, txt = jax.lax.fori_loop(0, ring.num_devices - 1, ring_step, (local, travel, txt))
  local, travel = over_chunks(ring.num_devices - 1, local, travel, txt)
  return local, ring.shift(travel)  # The last hop takes the accumulators home; texts stay.


# --- Running statistics -------------------------------------------------------------------------


def _best(logits: jax.Array, ids: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
  """Max of `logits` along `axis` and the `ids` entry of its first argmax."""
  return jnp.max(logits, axis=axis), ids[jnp.argmax(logits, axis=axis)]


def _merge_best(best, arg, new_best, new_arg):
  """Running (max, argmax) with ties to the lowest index, as `jnp.argmax` on the whole row."""
  take = (new_best > best) | ((new_best == best) & (new_arg < arg))
  return jnp.where(take, new_best, best), jnp.where(take, new_arg, arg)


def _merge_lse(m, s, logits, axis):
  """Online log-sum-exp: running max `m` and `s = sum exp(x - m)`, updated with `logits`."""
  new_m = jnp.maximum(m, jnp.max(logits, axis=axis))
  shifted = logits - jnp.expand_dims(new_m, axis)
  return new_m, s * jnp.exp(m - new_m) + jnp.sum(jnp.exp(shifted), axis=axis)


def _best_init(ring: Ring) -> tuple[jax.Array, jax.Array]:
  n = ring.rows
  best = jnp.full((n,), -jnp.inf, jnp.float32)
  return ring.varying(best), ring.varying(jnp.full((n,), ring.batch_size, jnp.int32))


def _scaled(img: jax.Array, scale: jax.Array) -> jax.Array:
  """`[n, E]` float32 `scale * img`: every pass computes a block's logits as `_scaled @ txt.T`, so
  the gradient's recomputed logits are bit for bit the forward pass's (a softmax near 1 of logits
  near 100 loses its digits to a one-ulp difference)."""
  return scale * img.astype(jnp.float32)


def _rows(ring: Ring) -> jax.Array:
  """`[n]` int32 global indices of this device's examples."""
  return ring.index() * ring.rows + jnp.arange(ring.rows, dtype=jnp.int32)


def _accuracy(ring: Ring, arg: jax.Array, rows: jax.Array) -> jax.Array:
  hits = ring.psum(jnp.sum(arg == rows, dtype=jnp.int32))
  return hits.astype(jnp.float32) / ring.batch_size


# --- InfoNCE --------------------------------------------------------------------------------------


def _infonce_forward_local(ring: Ring, img, txt, scale):
  """Per device: the loss terms, the accuracies and the `[n, 2]` (max, log sum exp(x - max)) of
  the rows and of the columns of this device's pairs, which the gradient needs."""
  img_scaled, rows = _scaled(img, scale), _rows(ring)

  def step(local, travel, txt_c, cols):
    row_m, row_s, row_best, row_arg, diag = local
    col_m, col_s, col_best, col_arg = travel
    logits = img_scaled @ txt_c.astype(jnp.float32).T  # [n, c]
    diag = diag + jnp.sum(jnp.where(rows[:, None] == cols[None, :], logits, 0.0), axis=1)
    row_m, row_s = _merge_lse(row_m, row_s, logits, axis=1)
    col_m, col_s = _merge_lse(col_m, col_s, logits, axis=0)
    row_best, row_arg = _merge_best(row_best, row_arg, *_best(logits, cols, axis=1))
    col_best, col_arg = _merge_best(col_best, col_arg, *_best(logits, rows, axis=0))
    return (row_m, row_s, row_best, row_arg, diag), (col_m, col_s, col_best, col_arg)

  zeros = ring.varying(jnp.zeros((ring.rows,), jnp.float32))
  lse_init = (ring.varying(jnp.full((ring.rows,), -jnp.inf, jnp.float32)), zeros)
  local = (*lse_init, *_best_init(ring), zeros)
  travel = (*lse_init, *_best_init(ring))
  local, travel = ring_pass(ring, step, local, travel, txt)
  (row_m, row_s, _, row_arg, diag), (col_m, col_s, _, col_arg) = local, travel
  # -log softmax = (max - x) + log sum exp(x - max), summed in that order as log_softmax does:
  # max + log(sum) first would lose the digits of a large max.
  i2t = ring.psum(jnp.sum((row_m - diag) + jnp.log(row_s))) / ring.batch_size
  t2i = ring.psum(jnp.sum((col_m - diag) + jnp.log(col_s))) / ring.batch_size
  outs = (i2t, t2i, _accuracy(ring, row_arg, rows), _accuracy(ring, col_arg, rows))
  row_lse = jnp.stack([row_m, jnp.log(row_s)], axis=1)
  col_lse = jnp.stack([col_m, jnp.log(col_s)], axis=1)
  return outs, row_lse, col_lse


def _infonce_backward_local(ring: Ring, img, txt, scale, row_lse, col_lse, g_i2t, g_t2i):
  """Per device: gradients of `g_i2t * i2t + g_t2i * t2i` w.r.t. img, txt and scale.

  `row_lse`, `col_lse`: `[n, 2]` (max, log sum exp(x - max)) of this device's rows and columns.
  """
  img_scaled, rows = _scaled(img, scale), _rows(ring)
  w_row, w_col = g_i2t / ring.batch_size, g_t2i / ring.batch_size

  def step(local, travel, txt_c, cols):
    d_img, d_scale_logits = local
    d_txt, col_lse_c = travel
    txt32 = txt_c.astype(jnp.float32)
    logits = img_scaled @ txt32.T  # [n, c], bit for bit the forward pass's
    # d(loss) / d(logits): softmax over the row and over the column, minus the positive pair.
    softmax_row = jnp.exp((logits - row_lse[:, None, 0]) - row_lse[:, None, 1])
    softmax_col = jnp.exp((logits - col_lse_c[None, :, 0]) - col_lse_c[None, :, 1])
    d_logits = w_row * softmax_row + w_col * softmax_col
    d_logits = d_logits - jnp.where(rows[:, None] == cols[None, :], w_row + w_col, 0.0)
    d_img = d_img + d_logits @ txt32
    d_txt = d_txt + d_logits.T @ img_scaled
    return (d_img, d_scale_logits + jnp.sum(d_logits * logits)), (d_txt, col_lse_c)

  d_img = ring.varying(jnp.zeros(img.shape, jnp.float32))
  local = (d_img, ring.varying(jnp.zeros((), jnp.float32)))
  travel = (ring.varying(jnp.zeros(txt.shape, jnp.float32)), col_lse)
  (d_img, d_scale_logits), (d_txt, _) = ring_pass(ring, step, local, travel, txt)
  d_scale = ring.psum(d_scale_logits) / scale  # logits = scale * sim: d/d scale = sum(d * sim).
  return (scale * d_img).astype(img.dtype), d_txt.astype(txt.dtype), d_scale.astype(scale.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _infonce(ring: Ring, img, txt, scale):
  return _infonce_fwd(ring, img, txt, scale)[0]


def _infonce_fwd(ring: Ring, img, txt, scale):
  fn = functools.partial(_infonce_forward_local, ring)
  specs = (("r", "r", "r", "r"), "b", "b")
  outs, row_lse, col_lse = ring.on_devices(fn, ("b", "b", "r"), specs)(img, txt, scale)
  return outs, (img, txt, scale, row_lse, col_lse)


def _infonce_bwd(ring: Ring, residuals, cotangents):
  g_i2t, g_t2i, _, _ = cotangents  # The accuracies have no gradient.
  fn = functools.partial(_infonce_backward_local, ring)
  in_specs = ("b", "b", "r", "b", "b", "r", "r")
  return ring.on_devices(fn, in_specs, ("b", "b", "r"))(*residuals, g_i2t, g_t2i)


_infonce.defvjp(_infonce_fwd, _infonce_bwd)


def infonce(img: jax.Array, txt: jax.Array, scale: jax.Array, chunk_size: int = DEFAULT_CHUNK_SIZE):
  """CLIP's two cross-entropies and in-batch accuracies, blockwise.

  Args:
    img: `[B, E]` image embeddings of the global batch (any float dtype; computed in float32).
    txt: `[B, E]` text embeddings; pair (i, i) is positive.
    scale: `[]` the inverse temperature: logits = scale * img @ txt.T.
    chunk_size: the most texts per block (`ring_layout`).

  Returns:
    `(i2t, t2i, acc_i2t, acc_t2i)`, each `[]` float32, as the dense `itc` computes them.
  """
  ring = ring_layout(img.shape[0], chunk_size)
  return _infonce(ring, img, txt, jnp.asarray(scale, jnp.float32))


# --- Sigmoid ------------------------------------------------------------------------------------


def _sign(rows: jax.Array, cols: jax.Array) -> jax.Array:
  """`[n, c]` z: +1 on the positive pairs, -1 elsewhere."""
  return jnp.where(rows[:, None] == cols[None, :], 1.0, -1.0)


def _sigmoid_forward_local(ring: Ring, img, txt, scale, bias):
  """Per device: the loss and the accuracies."""
  img32, rows = img.astype(jnp.float32), _rows(ring)

  def step(local, travel, txt_c, cols):
    total, row_best, row_arg = local
    logits = scale * (img32 @ txt_c.astype(jnp.float32).T) + bias  # [n, c]
    total = total + jnp.sum(jax.nn.log_sigmoid(_sign(rows, cols) * logits))
    row_best, row_arg = _merge_best(row_best, row_arg, *_best(logits, cols, axis=1))
    return (total, row_best, row_arg), _merge_best(*travel, *_best(logits, rows, axis=0))

  local = (ring.varying(jnp.zeros((), jnp.float32)), *_best_init(ring))
  (total, _, row_arg), (_, col_arg) = ring_pass(ring, step, local, _best_init(ring), txt)
  loss = -ring.psum(total) / ring.batch_size
  return loss, _accuracy(ring, row_arg, rows), _accuracy(ring, col_arg, rows)


def _sigmoid_backward_local(ring: Ring, img, txt, scale, bias, g):
  """Per device: gradients of `g * loss` w.r.t. img, txt, scale and bias."""
  img32, rows = img.astype(jnp.float32), _rows(ring)
  weight = g / ring.batch_size

  def step(local, d_txt, txt_c, cols):
    d_img, d_scale, d_bias = local
    txt32 = txt_c.astype(jnp.float32)
    sim = img32 @ txt32.T  # [n, c]
    z = _sign(rows, cols)
    d_logits = -weight * z * jax.nn.sigmoid(-z * (scale * sim + bias))  # d(-log sigmoid(z x))
    d_img = d_img + scale * (d_logits @ txt32)
    d_txt = d_txt + scale * (d_logits.T @ img32)
    return (d_img, d_scale + jnp.sum(d_logits * sim), d_bias + jnp.sum(d_logits)), d_txt

  zero = ring.varying(jnp.zeros((), jnp.float32))
  local = (ring.varying(jnp.zeros(img.shape, jnp.float32)), zero, zero)
  d_txt = ring.varying(jnp.zeros(txt.shape, jnp.float32))
  (d_img, d_scale, d_bias), d_txt = ring_pass(ring, step, local, d_txt, txt)
  return (
    d_img.astype(img.dtype),
    d_txt.astype(txt.dtype),
    ring.psum(d_scale).astype(scale.dtype),
    ring.psum(d_bias).astype(bias.dtype),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sigmoid(ring: Ring, img, txt, scale, bias):
  return _sigmoid_fwd(ring, img, txt, scale, bias)[0]


def _sigmoid_fwd(ring: Ring, img, txt, scale, bias):
  fn = functools.partial(_sigmoid_forward_local, ring)
  outs = ring.on_devices(fn, ("b", "b", "r", "r"), ("r", "r", "r"))(img, txt, scale, bias)
  return outs, (img, txt, scale, bias)


def _sigmoid_bwd(ring: Ring, residuals, cotangents):
  fn = functools.partial(_sigmoid_backward_local, ring)
  in_specs = ("b", "b", "r", "r", "r")
  return ring.on_devices(fn, in_specs, ("b", "b", "r", "r"))(*residuals, cotangents[0])


_sigmoid.defvjp(_sigmoid_fwd, _sigmoid_bwd)


def sigmoid(
  img: jax.Array,
  txt: jax.Array,
  scale: jax.Array,
  bias: jax.Array,
  chunk_size: int = DEFAULT_CHUNK_SIZE,
):
  """SigLIP's loss and in-batch accuracies, blockwise.

  Args:
    img: `[B, E]` image embeddings of the global batch (computed in float32).
    txt: `[B, E]` text embeddings; pair (i, i) is positive.
    scale: `[]` logits = scale * img @ txt.T + bias.
    bias: `[]`.
    chunk_size: the most texts per block (`ring_layout`).

  Returns:
    `(loss, acc_i2t, acc_t2i)`, each `[]` float32, as the dense `siglip` computes them.
  """
  ring = ring_layout(img.shape[0], chunk_size)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  return _sigmoid(ring, img, txt, f32(scale), f32(bias))
