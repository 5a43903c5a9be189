"""Elementwise and resampling building blocks shared by the generator's layers.

All functions take channels-last arrays `[n, *spatial, c]`. They are plain jnp code so that
XLA fuses them with the surrounding convolutions.
"""

from __future__ import annotations

from jax import lax
import jax.numpy as jnp

NEG_SLOPE = 0.2
NORM_EPS = 1e-5


def leaky_relu(x: jnp.ndarray) -> jnp.ndarray:
  return jnp.where(x >= 0, x, NEG_SLOPE * x)


def reflect_pad(x: jnp.ndarray, pad: int) -> jnp.ndarray:
  """Reflect-pads every spatial axis by `pad` (torch ReflectionPad / padding_mode='reflect')."""
  if pad == 0:
    return x
  widths = [(0, 0)] + [(pad, pad)] * (x.ndim - 2) + [(0, 0)]
  return jnp.pad(x, widths, mode="reflect")


def instance_norm(x: jnp.ndarray) -> jnp.ndarray:
  """Per-sample, per-channel normalisation over the spatial axes, no affine, eps 1e-5.

  Statistics are computed in float32 even when `x` is bf16, then cast back.
  """
  axes = tuple(range(1, x.ndim - 1))
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean = jnp.mean(xf, axis=axes, keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), axis=axes, keepdims=True)
  return ((xf - mean) * jnp.reciprocal(jnp.sqrt(var + NORM_EPS))).astype(x.dtype)


def maybe_norm(x: jnp.ndarray, norm: str | None) -> jnp.ndarray:
  return instance_norm(x) if norm == "InstanceNorm" else x


def upsample2x(x: jnp.ndarray) -> jnp.ndarray:
  """×2 (bi/tri)linear upsampling of every spatial axis, align_corners=False.

  Separable per axis: output 2i = .25·x[i-1] + .75·x[i], 2i+1 = .75·x[i] + .25·x[i+1], with
  edge replication at the borders, which is what torch's clamped source index gives.
  """
  for axis in range(1, x.ndim - 1):
    n = x.shape[axis]
    prev = jnp.concatenate([lax.slice_in_dim(x, 0, 1, axis=axis),
                            lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis=axis)
    nxt = jnp.concatenate([lax.slice_in_dim(x, 1, n, axis=axis),
                           lax.slice_in_dim(x, n - 1, n, axis=axis)], axis=axis)
    even = 0.25 * prev + 0.75 * x
    odd = 0.75 * x + 0.25 * nxt
    y = jnp.stack([even, odd], axis=axis + 1)
    x = y.reshape(x.shape[:axis] + (2 * n,) + x.shape[axis + 1:])
  return x
