"""The decoder's upsample + reflect pad + 3×3 conv as one low-resolution conv
(`upsample_conv`) against the direct computation, values and gradients, in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seq2seq_jax.models import conv
from seq2seq_jax.models import hyperconv
from seq2seq_jax.models import ops
from seq2seq_jax.models import upsample_conv


def _direct(x, kernel):
  return conv.reflect_conv(ops.upsample2x(x), kernel, 1, 1)


@pytest.mark.parametrize("shape", [(1, 10, 10, 3), (2, 5, 7, 4), (1, 2, 3, 2), (1, 6, 2, 1),
                                   (1, 4, 4, 4, 2), (2, 3, 5, 2, 3), (1, 2, 2, 3, 1)])
def test_equals_the_direct_layer_with_gradients(shape):
  """2D and 3D: square, oblong and the smallest images (2 lines along an axis: the border
  strips are the whole image); the interior and every border line or plane, values and both
  gradients."""
  rng = np.random.default_rng(0)
  nd = len(shape) - 2
  with jax.enable_x64(True):
    x = jnp.asarray(rng.standard_normal(shape), jnp.float64)
    k = jnp.asarray(rng.standard_normal((3,) * nd + (shape[-1], 5)), jnp.float64)
    want, vjp_want = jax.vjp(_direct, x, k)
    got, vjp_got = jax.vjp(upsample_conv.upsampled_reflect_conv, x, k)
    assert got.shape == want.shape == (shape[0],) + tuple(2 * n for n in shape[1:-1]) + (5,)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    dy = jnp.asarray(rng.standard_normal(want.shape), jnp.float64)
    for g, w in zip(vjp_got(dy), vjp_want(dy)):
      np.testing.assert_allclose(g, w, rtol=0, atol=1e-11)


def test_phase_kernel_of_a_centre_tap_is_the_bilinear_weights():
  """A kernel with only its centre tap (1) gives each phase the upsampling weights: even
  rows .25 x[i-1] + .75 x[i], odd rows .75 x[i] + .25 x[i+1], per axis."""
  k = jnp.zeros((3, 3, 1, 1)).at[1, 1].set(1.0)
  p = np.asarray(upsample_conv.phase_kernel(k))[:, :, 0, :]  # [3, 3, 4]
  even, odd = np.array([.25, .75, 0.]), np.array([0., .75, .25])
  for i, (a, b) in enumerate([(even, even), (even, odd), (odd, even), (odd, odd)]):
    np.testing.assert_allclose(p[:, :, i], np.outer(a, b), atol=1e-7)
  # 3D: the eight phases in (depth, row, column) phase order, trilinear weights.
  p3 = np.asarray(upsample_conv.phase_kernel(jnp.zeros((3, 3, 3, 1, 1)).at[1, 1, 1].set(1.0)))
  for i, w in enumerate([(a, b, c) for a in (even, odd) for b in (even, odd)
                         for c in (even, odd)]):
    np.testing.assert_allclose(p3[..., 0, i], np.einsum("i,j,k->ijk", *w), atol=1e-7)


def test_which_layers_take_it(monkeypatch):
  """brats2d's two upsampling layers (96² 128→64 and 48² 256→128 from the low side) and
  brats3d's (32³ 32→16, 16³ 64→32) do; the toy model's 8 × 16² 32→32 does not (slower
  there), nor small 3D layers, 1-row images, other kernels, strides or pads, XLA's forms, or
  a spatially sharded step."""
  assert upsample_conv.wanted((1, 96, 96, 128), (3, 3, 128, 64), 1, 1)
  assert upsample_conv.wanted((2, 48, 48, 256), (3, 3, 256, 128), 1, 1)
  assert not upsample_conv.wanted((8, 16, 16, 32), (3, 3, 32, 32), 1, 1)
  assert not upsample_conv.wanted((4096, 1, 96, 128), (3, 3, 128, 64), 1, 1)
  assert not upsample_conv.wanted((1, 96, 96, 128), (5, 5, 128, 64), 1, 2)
  assert not upsample_conv.wanted((1, 96, 96, 128), (3, 3, 128, 64), 2, 1)
  assert not upsample_conv.wanted((1, 96, 96, 128), (3, 3, 128, 64), 1, 0)
  assert upsample_conv.wanted((1, 32, 32, 32, 32), (3, 3, 3, 32, 16), 1, 1)
  assert upsample_conv.wanted((1, 16, 16, 16, 64), (3, 3, 3, 64, 32), 1, 1)
  assert not upsample_conv.wanted((1, 8, 8, 8, 32), (3, 3, 3, 32, 16), 1, 1)
  assert not upsample_conv.wanted((1, 32, 32, 32, 32), (5, 5, 5, 32, 16), 1, 2)
  assert not upsample_conv.wanted((1, 32, 32, 1, 32), (3, 3, 3, 32, 16), 1, 1)
  with conv.forms("xla"):
    assert not upsample_conv.wanted((1, 96, 96, 128), (3, 3, 128, 64), 1, 1)
  monkeypatch.setattr(upsample_conv.sharded_conv, "spatial_mesh", lambda: object())
  assert not upsample_conv.wanted((1, 96, 96, 128), (3, 3, 128, 64), 1, 1)


@pytest.mark.parametrize("codes,ndims", [(1, 2), (2, 2), (1, 3)])
def test_hyperconv_with_upsampling_is_unchanged(codes, ndims, monkeypatch):
  """A decoder layer (`pre=ops.upsample2x`) with the phase form forced on equals it forced
  off, outputs and every parameter's and the input's gradients; per-example codes (2) keep
  the direct path either way."""
  rng = np.random.default_rng(1)
  m = hyperconv.HyperConv(6, 3, c_w=4, pad=1, ndims=ndims, pre=ops.upsample2x, post=jnp.tanh)
  with jax.enable_x64(True):
    m = m.clone(dtype=jnp.float64)
    x = jnp.asarray(rng.standard_normal((2, 7, 5, 3) if ndims == 2 else (2, 3, 4, 5, 3)),
                    jnp.float64)
    s = jnp.asarray(rng.standard_normal((codes, 8)), jnp.float64)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64),
                                    m.init(jax.random.PRNGKey(0), x, s))
    loss = lambda p, x: jnp.sum(jnp.sin(m.apply(p, x, s)))
    results = []
    for min_macs in (0, 1 << 62):
      monkeypatch.setattr(upsample_conv, "MIN_MACS", min_macs)
      monkeypatch.setattr(upsample_conv, "MIN_MACS_3D", min_macs)
      assert upsample_conv.wanted(x.shape, (3,) * ndims + (3, 6), 1, 1) == (min_macs == 0)
      results.append(jax.value_and_grad(loss, argnums=(0, 1))(params, x))
    (v_on, g_on), (v_off, g_off) = results
    np.testing.assert_allclose(v_on, v_off, rtol=1e-12)
    for a, b in zip(jax.tree_util.tree_leaves(g_on), jax.tree_util.tree_leaves(g_off)):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-11 * max(1.0, float(jnp.abs(b).max())))
