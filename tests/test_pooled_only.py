"""`tokens=False`: towers pooled from one token compute their last block for that token only.

The pruned forward must be the same function as the full one on what it returns (the pooled `cls`
and the embeddings), with the same gradients, for the single-token pools, causal or not, with
padding (an empty row included), unrolled or scanned; it must do measurably less work; and the
methods whose losses read no tokens must use it, while those that do must not.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlalign import losses
from vlalign.methods import base
from vlalign.models import layers, scan, text, tower_outputs, vit
from vlalign.models.model import TwoTower

B, L, V = 4, 8, 50


def two_tower() -> TwoTower:
  """CLIP's layout at toy size: CLS-pooled ViT, causal EOS-pooled text, two blocks each."""
  c = ml_collections.ConfigDict()
  c.name, c.embed_dim, c.logit_scale_init = "two_tower", 12, math.log(1 / 0.07)
  c.image = dict(kind="vit", image_size=16, patch_size=8, width=16, depth=2, num_heads=2,
                 mlp_dim=32, pool="cls")  # fmt: skip
  c.text = dict(kind="text_transformer", vocab_size=V, max_len=L, width=16, depth=2, num_heads=2,
                mlp_dim=32, causal=True, pool="eos")  # fmt: skip
  return TwoTower(c)


def make_batch() -> dict[str, jax.Array]:
  ids, mask = text_inputs()
  return {"image": jax.random.normal(jax.random.PRNGKey(5), (B, 16, 16, 3)), "text_ids": ids,
          "text_mask": mask}  # fmt: skip


def tree_max_abs_diff(a, b) -> float:
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def text_inputs():
  ids = jax.random.randint(jax.random.PRNGKey(2), (B, L), 0, V)
  lengths = jnp.array([[L], [3], [1], [0]])  # full, padded, one token, empty
  return ids, (jnp.arange(L)[None] < lengths).astype(jnp.int32)


def assert_same_cls_and_grads(module, params, *inputs):
  full = jax.jit(module.apply)(params, *inputs)
  pruned = jax.jit(lambda p, *a: module.apply(p, *a, tokens=False))(params, *inputs)
  assert set(pruned) == {"cls"}
  np.testing.assert_allclose(pruned["cls"], full["cls"], atol=2e-6, rtol=1e-5)

  def loss(p, tokens):
    cls = module.apply(p, *inputs, tokens=tokens)["cls"]
    return jnp.sum(jnp.sin(3.0 * cls))  # weights every output entry differently

  grad = jax.jit(jax.grad(loss), static_argnums=1)
  g_full, g_pruned = grad(params, True), grad(params, False)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_full))
  assert tree_max_abs_diff(g_full, g_pruned) <= 1e-5 * scale


@pytest.mark.parametrize(
  "pool, causal, scan_layers",
  [("eos", True, False), ("last", True, False), ("eos", False, False), ("prompt_end", True, True)],
)
def test_text_tower_pooled_only_equals_full(pool, causal, scan_layers):
  tower = text.TextTransformer(
    vocab_size=V, width=32, depth=2, num_heads=2, mlp_dim=64, max_len=L, causal=causal,
    pool=pool, scan_layers=scan_layers, head=pool == "last",
  )  # fmt: skip
  ids, mask = text_inputs()
  params = tower.init(jax.random.PRNGKey(3), ids, mask)
  assert_same_cls_and_grads(tower, params, ids, mask)


@pytest.mark.parametrize(
  "fields",
  [
    dict(pool="cls", cls_pos_embed=True, ln_pre=True, num_registers=2, layer_scale=True),
    dict(pool="cls", scan_layers=True),
    dict(pool="map", class_token=False),
  ],
)
def test_vit_pooled_only_equals_full(fields):
  tower = vit.ViT(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=4, image_size=16, **fields)
  images = jax.random.normal(jax.random.PRNGKey(0), (B, 16, 16, 3))
  params = tower.init(jax.random.PRNGKey(1), images)
  assert_same_cls_and_grads(tower, params, images)


def test_scanned_tower_runs_its_last_layer_for_the_pooled_row_only():
  """The scan runs the first depth - 1 layers of the stored stack, then the last layer alone on
  the pooled rows (counted with the scans unrolled: XLA counts a loop's body once)."""
  tower = text.TextTransformer(
    vocab_size=V, width=32, depth=3, num_heads=2, mlp_dim=64, max_len=L, causal=True, pool="eos",
    scan_layers=True,
  )  # fmt: skip
  ids, mask = text_inputs()
  params = tower.init(jax.random.PRNGKey(3), ids, mask)
  with scan.unrolled_scans():
    flops = {
      tokens: step_flops(
        lambda p, tokens=tokens: tower.apply(p, ids, mask, tokens=tokens)["cls"], params
      )
      for tokens in (True, False)
    }
  # The last of 3 layers on 1 of 8 rows, keys and values aside: about a quarter less.
  assert flops[False] < 0.8 * flops[True], flops


def test_encoder_rows_are_the_full_outputs_rows():
  """Several rows per example, in any order, with a per-query (causal) mask."""
  encoder = layers.Encoder(depth=2, num_heads=2, mlp_dim=64)
  x = jax.random.normal(jax.random.PRNGKey(0), (B, L, 32))
  mask = layers.causal_mask(L) & layers.key_padding_mask(text_inputs()[1] + jnp.eye(B, L))
  params = encoder.init(jax.random.PRNGKey(1), x, mask)
  rows = jnp.array([[5, 0, 7], [2, 2, 1], [0, 3, 6], [7, 6, 5]], jnp.int32)
  full = encoder.apply(params, x, mask)
  picked = encoder.apply(params, x, mask, False, rows)
  np.testing.assert_allclose(picked, layers.take_rows(full, rows), atol=2e-6, rtol=1e-5)
  expected = np.stack([np.asarray(full)[b, np.asarray(rows)[b]] for b in range(B)])
  np.testing.assert_allclose(layers.take_rows(full, rows), expected)


def step_flops(fn, *args) -> float:
  return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


def test_two_tower_without_tokens_same_embeddings_and_less_work():
  model = two_tower()
  batch = make_batch()
  params = model.init(jax.random.PRNGKey(0), batch)
  full = model.apply(params, batch)
  pruned = model.apply(params, batch, tokens=False)
  assert set(full) - set(pruned) == {"img/tokens", "txt/tokens"}
  for key in pruned:
    np.testing.assert_allclose(pruned[key], full[key], atol=2e-6, rtol=1e-5)

  def emb_loss(p, tokens):
    out = model.apply(p, batch, tokens=tokens)
    return jnp.sum(out["img/emb"] @ out["txt/emb"].T)

  full_flops = step_flops(jax.grad(lambda p: emb_loss(p, True)), params)
  pruned_flops = step_flops(jax.grad(lambda p: emb_loss(p, False)), params)
  # Each tower's last (second) block runs on 1 of its 5 (image: CLS + 4 patches) or 8 (text) rows,
  # except for the keys and values: well over a quarter of the towers' work goes.
  assert pruned_flops < 0.75 * full_flops, (pruned_flops, full_flops)


def test_tower_without_a_tokens_argument_runs_in_full_and_drops_them():
  class Plain(text.TextTransformer):
    def __call__(self, ids, mask, train=False):
      return super().__call__(ids, mask, train)

  tower = Plain(vocab_size=V, width=16, depth=1, num_heads=2, mlp_dim=32, max_len=L, pool="eos")
  ids, mask = text_inputs()
  params = tower.init(jax.random.PRNGKey(0), ids, mask)
  pooled = lambda module, *inputs: tower_outputs(module, *inputs, train=False, tokens=False)  # noqa: E731
  out = tower.apply(params, ids, mask, method=pooled)
  assert set(out) == {"cls"}
  np.testing.assert_allclose(out["cls"], tower.apply(params, ids, mask)["cls"])


def test_methods_ask_for_tokens_only_when_their_losses_read_them():
  model = two_tower()
  batch = make_batch()
  params = model.init(jax.random.PRNGKey(0), batch)
  method = base.Method.__new__(base.Method)  # the plain two-tower method, without a config
  method.model = model
  ctx = losses.LossContext(step=0, batch=batch, extras={}, rngs={"dropout": jax.random.PRNGKey(1)})
  out = method.forward(params, ctx)
  assert "img/tokens" not in out and "txt/tokens" not in out
  reference = model.apply(params, batch, train=True)
  np.testing.assert_allclose(out["img/emb"], reference["img/emb"], atol=2e-6)
  method.student_tokens = True
  assert {"img/tokens", "txt/tokens"} <= set(method.forward(params, ctx))
  fns = base.Method.predict_fns(method)
  np.testing.assert_allclose(fns["encode_text"](params, batch["text_ids"], batch["text_mask"]),
                             reference["txt/emb"], atol=2e-6)  # fmt: skip
  from vlalign.methods.lexvla import LexVLA
  from vlalign.methods.momentum import MomentumDistillation

  assert LexVLA.student_tokens and not base.Method.student_tokens
  assert MomentumDistillation.forward is not base.Method.forward  # builds its own outputs
