"""ViT position-grid resizing (`vit.resize_position_embedding`) against PyTorch's
`F.interpolate(align_corners=False)` outputs (tests/fixtures/make_pos_resize_fixture.py: torch run
in float64, so the references carry no float32 rounding of the sampling positions)."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlalign.models import vit

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "pos_resize_torch.npz"
CASES = ("up_14_16", "up_16_24", "down_16_12", "mixed_5x7_9x4")


@pytest.fixture(scope="module")
def torch_outputs():
  with np.load(FIXTURE) as arrays:
    return dict(arrays)


@pytest.mark.parametrize("method", vit.INTERPOLATIONS)
@pytest.mark.parametrize("case", CASES)
def test_every_method_equals_pytorch(torch_outputs, case, method):
  grid = torch_outputs[f"{case}/input"]
  want = torch_outputs[f"{case}/{method}"]
  rows, cols = want.shape[:2]
  got = np.asarray(vit.resize_position_embedding(jnp.asarray(grid), rows, cols, method))
  assert got.shape == want.shape and got.dtype == np.float32
  # Ours: float64 weights, float32 sums (measured <= 2.4e-7 on these N(0, 1) grids). The
  # `_antialias` methods are `jax.image.resize`, which rounds the sampling positions to float32
  # as PyTorch's own float32 run does (both <= 3.5e-6 here).
  atol = 5e-6 if method.endswith("_antialias") else 5e-7
  np.testing.assert_allclose(got, want, rtol=0, atol=atol)


def test_bicubic_is_not_keys_half():
  """PyTorch's A = -0.75 is not `jax.image.resize`'s a = -0.5 (nor its antialiasing)."""
  grid = np.random.default_rng(0).normal(size=(14, 14, 4)).astype(np.float32)
  ours = np.asarray(vit.resize_position_embedding(grid, 16, 16, "bicubic"))
  keys = np.asarray(jax.image.resize(grid, (16, 16, 4), "bicubic"))
  assert np.abs(ours - keys).max() > 1e-2


def test_bilinear_upsampling_is_the_same_with_and_without_antialiasing(torch_outputs):
  for case in ("up_14_16", "up_16_24"):
    np.testing.assert_allclose(
      torch_outputs[f"{case}/bilinear"], torch_outputs[f"{case}/bilinear_antialias"], atol=2e-6
    )


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
def test_interpolation_rows_sum_to_one_and_same_size_is_identity(method):
  for n_in, n_out in [(14, 16), (16, 24), (16, 12), (7, 3), (1, 4), (4, 1)]:
    weights = vit.interpolation_matrix(n_in, n_out, method)
    assert weights.shape == (n_out, n_in)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-12)
  np.testing.assert_allclose(vit.interpolation_matrix(5, 5, method), np.eye(5), atol=1e-12)


def test_bicubic_keeps_the_dtype_and_runs_under_jit():
  grid = jnp.asarray(np.random.default_rng(1).normal(size=(4, 4, 8)), jnp.bfloat16)
  out = jax.jit(lambda g: vit.resize_position_embedding(g, 6, 5, "bicubic"))(grid)
  assert out.shape == (6, 5, 8) and out.dtype == jnp.bfloat16


def test_unknown_method_names_the_choices():
  with pytest.raises(ValueError, match="unknown pos_interpolation 'nearest'.*bicubic_antialias"):
    vit.resize_position_embedding(np.zeros((2, 2, 1), np.float32), 3, 3, "nearest")
