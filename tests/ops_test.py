"""The generator's hand-written gradients of elementwise/resampling ops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seq2seq_jax.models import ops


def _dense_upsample_1d(n: int) -> np.ndarray:
  """torch's ×2 linear upsampling (align_corners=False) of n samples as a [2n, n] matrix:
  output i reads source (i + .5)/2 - .5, clamped at 0, from its two neighbours."""
  u = np.zeros((2 * n, n))
  for i in range(2 * n):
    s = max((i + 0.5) / 2 - 0.5, 0.0)
    lo = min(int(np.floor(s)), n - 1)
    hi = min(lo + 1, n - 1)
    u[i, lo] += 1 - (s - lo)
    u[i, hi] += s - lo
  return u


@pytest.mark.parametrize("shape", [(2, 5, 3), (1, 1, 4, 2), (2, 3, 1, 4, 2)],
                         ids=["1d", "2d-edge", "3d"])
def test_upsample2x_and_its_gradient_equal_the_dense_operator(shape):
  """Forward and VJP against the explicit (Kronecker) matrix of the separable upsampling,
  including axes of length 1, where both borders clamp to the same sample."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal(shape)
  spatial = shape[1:-1]
  dense = _dense_upsample_1d(spatial[0])
  for n in spatial[1:]:
    dense = np.kron(dense, _dense_upsample_1d(n))
  flat = np.moveaxis(x, -1, 1).reshape(shape[0], shape[-1], -1)  # [b, c, voxels]
  want = np.einsum("ov,bcv->bco", dense, flat)
  y, vjp = jax.vjp(ops.upsample2x, jnp.asarray(x, jnp.float32))
  got = np.moveaxis(np.asarray(y), -1, 1).reshape(want.shape)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  dy = rng.standard_normal(y.shape)
  dflat = np.moveaxis(dy, -1, 1).reshape(shape[0], shape[-1], -1)
  want_dx = np.einsum("ov,bco->bcv", dense, dflat)
  dx = vjp(jnp.asarray(dy, jnp.float32))[0]
  got_dx = np.moveaxis(np.asarray(dx), -1, 1).reshape(want_dx.shape)
  np.testing.assert_allclose(got_dx, want_dx, rtol=0, atol=1e-5)
