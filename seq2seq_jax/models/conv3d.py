"""3D convolutions as 2D convolutions of depth slices (XLA CPU's 3D convs are slow).

XLA CPU runs 3D convolutions at 1-20 GFLOP/s, and the input gradients of strided ones far
slower: the 16→32 stride-2 conv of `configs/brats3d.py` at 64³ takes 1.8 s for its input
gradient, 74 ms for both gradients as folded 2D convs here (experiments/README.md, "3D").
With y[d] = sum_j conv2d(x[stride·d + j], W[j]) the depth slices go into the 2D conv's
batch (depth-major, so that a depth-sharded volume stays sharded) and the k depth offsets j
into its channels, so the 2D forms of `conv.conv_nd` serve 3D too.

Large stride-1 layers (the decoder's at full resolution) run in chunks of output depth in a
loop (`gemm_conv.map_concat`), with a custom VJP that loops over the same chunks, so a
chunk's stacked inputs and GEMM columns stay small (brats3d: XLA temporaries 2.19 → 1.14 GB
at the same step time). Chunking under GSPMD would gather a depth-sharded volume onto every
device, so on spatially sharded steps those layers run per shard instead
(`sharded_conv.sharded_reflect_conv`), each shard chunking its own slab as one device would.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
from jax import lax
import jax.numpy as jnp

from seq2seq_jax.models import conv
from seq2seq_jax.models import gemm_conv
from seq2seq_jax.models import sharded_conv

# Chunk when a layer's stacked inputs exceed this (the 32→16 decoder conv at 64³: 107 MB).
STACK_BYTES_TO_CHUNK = 16 << 20
# Rows (slices × pixels) per chunk at least: with fewer, the 2D kernel gradients fall back
# to XLA's, 10× slower on these shapes (e.g. 4,096 rows of the 32→16 conv: 3.4 s a step).
MIN_CHUNK_ROWS = 1 << 14


def conv3d(x: jnp.ndarray, kernel: jnp.ndarray, stride: int,
           pads: Sequence[tuple[int, int]]) -> jnp.ndarray:
  """`conv.conv_nd` for `x` `[b, d, h, w, cin]`, `kernel` `[k, k, k, cin, cout]`, zero pads."""
  chunk = chunk_size(x.shape, kernel.shape, stride, pads)
  sharded = sharded_conv.spatial_mesh() is not None
  if chunk is None or not sharded and not gemm_conv.loops_enabled():
    return depth_folded_conv(x, kernel, stride, pads)
  if sharded:
    # A layer that one device chunks, on a depth-sharded volume but not through
    # `sharded_conv.sharded_reflect_conv`: unchunked, its stacked slices and GEMM columns would be
    # whole-volume temporaries; XLA's own conv is slower but needs none.
    return conv._xla_conv(x, kernel, stride, pads)
  x = jnp.pad(x, ((0, 0),) + tuple(pads) + ((0, 0),))
  return _chunked_conv(x, kernel, chunk)


def chunk_size(x_shape, kernel_shape, stride: int,
               pads: Sequence[tuple[int, int]]) -> int | None:
  """Output slices per chunk for a stride-1 conv with large stacked inputs, else None."""
  k, cin = kernel_shape[0], kernel_shape[-2]
  b = x_shape[0]
  padded = [n + lo + hi for n, (lo, hi) in zip(x_shape[1:-1], pads)]
  out = [n - k + 1 for n in padded]
  stack_bytes = b * out[0] * padded[1] * padded[2] * k * cin * 4  # as float32 (a heuristic)
  if stride != 1 or stack_bytes <= STACK_BYTES_TO_CHUNK:
    return None
  return _chunk_for(out[0], b * out[1] * out[2])


def _chunk_for(depth: int, rows_per_slice: int) -> int | None:
  """The smallest divisor of `depth` with at least MIN_CHUNK_ROWS rows; None if only depth."""
  for c in range(1, depth):
    if depth % c == 0 and c * rows_per_slice >= MIN_CHUNK_ROWS:
      return c
  return None


def depth_folded_conv(x: jnp.ndarray, kernel: jnp.ndarray, stride: int,
                      pads: Sequence[tuple[int, int]]) -> jnp.ndarray:
  """The whole volume as one folded 2D conv (per residue of the depth offset for stride > 1).

  - stride 1: the k depth offsets go into the input channels, the k shifted slices side by
    side (one 2D conv with k·cin inputs, faster in XLA than k·cout outputs and leaner);
  - stride > 1: into the output channels, one 2D conv per residue of j mod stride (a slice
    is read by the offsets of one residue only, so no product is wasted), then a sum of
    depth-shifted channel groups (stacking inputs would copy the volume k/stride times).
  Autodiff of this composition gives both gradients through the 2D convs' forms.
  """
  (dlo, dhi), plane_pads = pads[0], tuple(pads[1:])
  if dlo or dhi:
    x = jnp.pad(x, ((0, 0), (dlo, dhi), (0, 0), (0, 0), (0, 0)))
  b, depth = x.shape[:2]
  k, cout = kernel.shape[0], kernel.shape[-1]
  out_depth = (depth - k) // stride + 1
  unfold = lambda a: jnp.moveaxis(a.reshape((-1, b) + a.shape[1:]), 0, 1)
  if stride == 1:
    return unfold(conv.conv_nd(_stacked(x, k, out_depth), _stacked_kernel(kernel), 1,
                               plane_pads))
  y = None
  for r in range(min(stride, k)):
    offsets = range(r, k, stride)
    n = out_depth + len(offsets) - 1  # the slices r, r + stride, ... that these offsets read
    xr = lax.slice_in_dim(x, r, r + stride * (n - 1) + 1, stride, axis=1)
    z = conv.conv_nd(_fold(xr), jnp.concatenate([kernel[j] for j in offsets], -1), stride,
                     plane_pads)
    z = unfold(z.reshape(z.shape[:-1] + (len(offsets), cout)))
    for i in range(len(offsets)):
      term = z[:, i:i + out_depth, ..., i, :]
      y = term if y is None else y + term
  return y


def _fold(a: jnp.ndarray) -> jnp.ndarray:
  """`[b, d, ...]` → `[d·b, ...]`, depth-major."""
  return jnp.moveaxis(a, 1, 0).reshape((-1,) + a.shape[2:])


def _stacked(x: jnp.ndarray, k: int, out_depth: int) -> jnp.ndarray:
  """The k depth-shifted views side by side on channels, folded: `[out_depth·b, h, w, k·c]`."""
  return _fold(jnp.concatenate([x[:, j:j + out_depth] for j in range(k)], -1))


def _stacked_kernel(kernel: jnp.ndarray) -> jnp.ndarray:
  """`[k, kh, kw, cin, cout]` → `[kh, kw, k·cin, cout]`, matching `_stacked`'s channels."""
  k, cin, cout = kernel.shape[0], kernel.shape[-2], kernel.shape[-1]
  return jnp.moveaxis(kernel, 0, 2).reshape(kernel.shape[1:3] + (k * cin, cout))


def _map_conv(x: jnp.ndarray, kernel: jnp.ndarray, chunk: int) -> jnp.ndarray:
  """VALID stride-1 conv, `chunk` output slices at a time, each a stacked 2D conv."""
  b, k = x.shape[0], kernel.shape[0]
  out_depth = x.shape[1] - k + 1
  w = _stacked_kernel(kernel)

  def body(i):
    xs = lax.dynamic_slice_in_dim(x, i * chunk, chunk + k - 1, axis=1)
    return conv.conv_nd(_stacked(xs, k, chunk), w, 1)  # [chunk·b, h, w, cout], depth-major
  y = gemm_conv.map_concat(body, out_depth // chunk, axis=0, like=x)
  return jnp.moveaxis(y.reshape((out_depth, b) + y.shape[1:]), 0, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _chunked_conv(x: jnp.ndarray, kernel: jnp.ndarray, chunk: int) -> jnp.ndarray:
  return _map_conv(x, kernel, chunk)


def _chunked_fwd(x, kernel, chunk):
  return _map_conv(x, kernel, chunk), (x, kernel)


def _chunked_bwd(chunk, res, dy):
  x, kernel = res
  b, k = x.shape[0], kernel.shape[0]
  cin, cout = kernel.shape[-2:]
  n, frame = dy.shape[1] // chunk, x.shape[2:4]
  acc = gemm_conv.acc_dtype(dy)
  # Both gradients from one set of GEMM columns per chunk: D[s, q, (a, o)] = dy[s, q - a, o],
  # dy shifted to every in-plane offset a. With W_j the kernel at depth offset j as a
  # [cin, (a, o)] matrix, dW_j = x[s + j]ᵀ D and dx[s + j] += D W_jᵀ. Stacking x (and dy)
  # k times on channels, as the forward does, cost 2.5× more here (32→16 at 64³: 730 vs
  # 290 ms).
  w = [jnp.moveaxis(kernel[j], -2, 0).reshape(cin, -1) for j in range(k)]

  def body(carry, start):
    gw_sum, dx = carry
    d = gemm_conv.shifted_columns(
        _fold(lax.dynamic_slice_in_dim(dy, start, chunk, axis=1)), k, frame)
    d = d.reshape(-1, d.shape[-1])  # [chunk·b·plane, k²·cout]
    xs = lax.dynamic_slice_in_dim(x, start, chunk + k - 1, axis=1)
    gw = jnp.stack([gemm_conv.dot_t(_fold(xs[:, j:j + chunk]).reshape(-1, cin), d)
                    for j in range(k)])
    # The chunk's dx covers its chunk + k - 1 input slices: D W_jᵀ lands j slices down. It is
    # added into the one dx buffer the loop carries (in place): stacking each chunk's slices
    # and overlap-adding them after the loop held dx about three times over (brats3d's
    # 32→16 conv: 34 + 17 + 35 MB).
    dxs = sum(jnp.pad(lax.dot_general(d, w[j], (((1,), (1,)), ((), ())),
                                      preferred_element_type=acc
                                      ).reshape((chunk, b) + x.shape[2:]),
                      ((j, k - 1 - j),) + ((0, 0),) * 4)
              for j in range(k))
    old = lax.dynamic_slice_in_dim(dx, start, chunk + k - 1, axis=0)
    dx = lax.dynamic_update_slice_in_dim(dx, old + dxs.astype(dx.dtype), start, axis=0)
    return (gw_sum + gw, dx), None

  dx0 = gemm_conv.fresh_zeros((n * chunk + k - 1, b) + x.shape[2:], acc, dy)
  gw0 = jnp.zeros((k, cin, kernel.shape[1] * kernel.shape[2] * cout), acc)
  (gw, dx), _ = lax.scan(body, (gw0, dx0), jnp.arange(n) * chunk)
  dx = jnp.moveaxis(dx, 0, 1)  # [b, depth, ...]
  # gw [k, cin, (a1, a2, o)] → [k, a1, a2, cin, cout]
  dw = jnp.moveaxis(gw.reshape((k, cin) + kernel.shape[1:3] + (cout,)), 1, 3)
  return dx.astype(x.dtype), dw.astype(kernel.dtype)


_chunked_conv.defvjp(_chunked_fwd, _chunked_bwd)
