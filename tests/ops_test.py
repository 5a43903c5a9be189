"""The generator's hand-written gradients of elementwise/resampling ops."""

import re

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


def _dense_reflect_1d(n: int, p: int) -> np.ndarray:
  """Reflect padding of n samples by p as a [n + 2p, n] 0/1 matrix (np.pad's 'reflect')."""
  idx = np.pad(np.arange(n), p, mode="reflect")
  m = np.zeros((n + 2 * p, n))
  m[np.arange(n + 2 * p), idx] = 1
  return m


@pytest.mark.parametrize("shape,pad,axes,fold_2d_min_size", [
    ((2, 5, 3), 1, None, None), ((1, 4, 5, 2), 3, None, None), ((1, 4, 5, 2), 3, None, 0),
    ((2, 6, 3, 4, 2), 2, None, None), ((1, 3, 5, 4, 2), 2, (2, 3), None),
    ((1, 4, 5, 2), 2, (2,), None)],
    ids=["1d-p1", "2d-p3", "2d-p3-folded", "3d-p2", "3d-p2-plane", "2d-p2-second"])
def test_reflect_pad_and_its_gradient_equal_the_dense_operator(shape, pad, axes,
                                                               fold_2d_min_size, monkeypatch):
  """The hand-written VJP folds every border slab back onto the sample it copies; with
  `axes`, only those axes are padded (the others' operator is the identity). A 2D array
  takes autodiff's form on its second axis when small, the fold when large ("folded")."""
  if fold_2d_min_size is not None:
    monkeypatch.setattr(ops, "FOLD_2D_MIN_SIZE", fold_2d_min_size)
  rng = np.random.default_rng(1)
  x = rng.standard_normal(shape)
  padded = range(1, len(shape) - 1) if axes is None else axes
  ops_1d = [_dense_reflect_1d(n, pad) if a in padded else np.eye(n)
            for a, n in enumerate(shape[1:-1], start=1)]
  dense = ops_1d[0]
  for m in ops_1d[1:]:
    dense = np.kron(dense, m)
  flat = np.moveaxis(x, -1, 1).reshape(shape[0], shape[-1], -1)
  y, vjp = jax.vjp(lambda a: ops.reflect_pad(a, pad, axes), jnp.asarray(x, jnp.float32))
  want = np.einsum("ov,bcv->bco", dense, flat)
  np.testing.assert_allclose(np.moveaxis(np.asarray(y), -1, 1).reshape(want.shape), want,
                             rtol=0, atol=1e-6)
  dy = rng.standard_normal(y.shape)
  want_dx = np.einsum("ov,bco->bcv", dense, np.moveaxis(dy, -1, 1).reshape(want.shape))
  dx = vjp(jnp.asarray(dy, jnp.float32))[0]
  np.testing.assert_allclose(np.moveaxis(np.asarray(dx), -1, 1).reshape(want_dx.shape),
                             want_dx, rtol=0, atol=1e-5)


def test_reflect_pad_gradient_stays_partitioned_on_a_sharded_depth():
  """On a depth-sharded volume no buffer of the gradient holds the whole depth (autodiff of
  jnp.pad's reflect mode zero-pads each border slice to the whole axis, and GSPMD left those
  pads unpartitioned: [1, 72, ...] buffers for a 64-deep volume on 8 shards)."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  n = jax.device_count()
  assert n >= 2, "conftest sets up several CPU devices"
  depth = 8 * n
  mesh = Mesh(np.asarray(jax.devices()), ("spatial",))  # as sharding.make_mesh: auto axes
  shard = NamedSharding(mesh, P(None, "spatial"))
  x = jax.ShapeDtypeStruct((1, depth, 8, 8, 4), jnp.float32, sharding=shard)
  f = lambda a: jnp.sum(jnp.square(ops.reflect_pad(a, 1)[:, 1:-1] * 2.0))
  hlo = jax.jit(jax.grad(f)).lower(x).compile().as_text()
  depths = {int(d) for d in re.findall(r"f32\[1,(\d+),8", hlo)}
  assert depths and max(depths) < depth, sorted(depths)
  xv = np.random.default_rng(2).standard_normal(x.shape).astype(np.float32)
  np.testing.assert_allclose(np.asarray(jax.jit(jax.grad(f))(jax.device_put(xv, shard))),
                             np.asarray(jax.grad(f)(xv)), rtol=1e-6, atol=1e-6)
