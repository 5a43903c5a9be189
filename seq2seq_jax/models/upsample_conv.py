"""×2 upsampling, reflect pad and a 3×3(×3) conv as one conv at the low resolution (2D, 3D).

The decoder's upsampling layers compute conv3x3(reflect_pad(upsample2x(x), 1)). Per axis,
output 2i takes x[i-1], x[i], x[i+1] with the taps (.75K0 + .25K1, .25K0 + .75K1 + .75K2,
.25K2) and output 2i+1 with (.25K0, .75K0 + .75K1 + .25K2, .25K1 + .75K2), so the whole layer
is one 3×3 conv of x (edge-padded by one) whose 2^d output phases sit side by side on
channels, then a depth-to-space. That conv runs at the low resolution with 2^d× the outputs,
where XLA CPU's convs are faster (brats2d's 192² 128→64 layer, forward and both gradients:
58.7 ms as before against 39.8 as 96² 128→256; brats3d's 64³ 32→16: 218.9 against 92.7 as
32³ 32→128; experiments/README.md, "thirty-first" and "thirty-second session"), and the
upsampled image is never made. On x edge-padded the identity holds except on the outermost
output lines (planes in 3D) of each axis (the reflect pad of the upsampled image is not an
upsampling of any padded x); those are computed the direct way from two-line (two-plane)
strips of x.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from seq2seq_jax.models import conv
from seq2seq_jax.models import conv3d
from seq2seq_jax.models import ops
from seq2seq_jax.models import sharded_conv

# Low-resolution multiply-adds per tap (b·h·w·cin·cout) from which the phase form is taken:
# brats2d's 96² 128→64 and 48² 256→128 (75 M) gain (forward and both gradients, one image:
# 88.6 → 65.6 and 60.5 → 54.4 ms), the toy model's 8 × 16² 32→32 (2 M) loses (2.5 → 5.5).
MIN_MACS = 1 << 24
# In 3D (b·d·h·w·cin·cout): brats3d's 16³ 64→32 (8 M) gains, 85.2 → 40.7 ms.
MIN_MACS_3D = 1 << 23

# Rows: the even and the odd output phase; for each, the weights of K's taps 0..2 (columns)
# at the input offsets -1, 0, +1 (rows).
_PHASES = np.array([[[.75, .25, 0.], [.25, .75, .75], [0., 0., .25]],
                    [[.25, 0., 0.], [.75, .75, .25], [0., .25, .75]]])


def applies(x_shape, kernel_shape, stride: int, pad: int) -> bool:
  """Whether `upsampled_reflect_conv` computes this layer: 2D or 3D, 3×3(×3), stride 1, pad
  1, and a low-resolution image of at least 2 along each axis."""
  nd = len(x_shape) - 2
  return (nd in (2, 3) and tuple(kernel_shape[:nd]) == (3,) * nd and stride == 1
          and pad == 1 and min(x_shape[1:-1]) >= 2)


def wanted(x_shape, kernel_shape, stride: int, pad: int) -> bool:
  """Whether a layer takes `upsampled_reflect_conv`: where it `applies`, large enough
  (MIN_MACS, MIN_MACS_3D), with the CPU-tuned conv forms (`conv.forms`; not timed on GPUs)
  and no spatial mesh (its border strips assume the whole image)."""
  cin, cout = kernel_shape[-2:]
  least = MIN_MACS if len(x_shape) == 4 else MIN_MACS_3D
  return (applies(x_shape, kernel_shape, stride, pad) and conv.cpu_tuned()
          and sharded_conv.spatial_mesh() is None
          and int(np.prod(x_shape[:-1])) * cin * cout >= least)


def phase_kernel(kernel: jnp.ndarray) -> jnp.ndarray:
  """`[3, 3, (3,) cin, cout]` → `[3, 3, (3,) cin, 2^d·cout]`: the output phases' kernels over
  x's offsets, outputs ordered (phase of each axis in order, cout)."""
  # One axis at a time, as sums of scaled taps: forward and transpose 1.7 + 2.5 ms on
  # brats2d's 256→128 kernel, where an einsum went to a GEMM and a transpose (5.0 + 3.0) and
  # all nine taps summed per phase had a slow transpose (0.9 + 19.3).
  nd = kernel.ndim - 2
  c = _PHASES
  k = kernel.astype(jnp.promote_types(kernel.dtype, jnp.float32))  # mixed in float32
  mix = lambda taps, p, a: sum(float(c[p, a, t]) * taps[t] for t in range(3) if c[p, a, t])
  for axis in range(nd):  # each adds a leading phase axis; axis `axis` becomes the offsets
    at = axis + (k.ndim - kernel.ndim)
    taps = [jnp.take(k, t, axis=at) for t in range(3)]
    k = jnp.stack([jnp.stack([mix(taps, p, a) for a in range(3)], axis=at) for p in range(2)])
  # [p_{d-1} .. p_0, a_0 .. a_{d-1}, cin, cout] → [a_0 .. a_{d-1}, cin, p_0 .. p_{d-1}, cout]
  perm = (tuple(range(nd, 2 * nd + 1)) + tuple(range(nd - 1, -1, -1)) + (2 * nd + 1,))
  out = jnp.transpose(k, perm)
  return out.reshape((3,) * nd + (kernel.shape[-2], 2 ** nd * kernel.shape[-1])).astype(
      kernel.dtype)


def upsampled_reflect_conv(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
  """`conv.reflect_conv(ops.upsample2x(x), kernel, 1, 1)` for x `[b, *spatial, cin]` (2D or
  3D) and a `[3, 3, (3,) cin, cout]` kernel (`applies`), as one conv at x's resolution."""
  nd = x.ndim - 2
  b, spatial, cout = x.shape[0], x.shape[1:-1], kernel.shape[-1]
  xe = jnp.pad(x, ((0, 0),) + ((1, 1),) * nd + ((0, 0),), mode="edge")
  if nd == 3:
    # Unchunked (`conv3d.chunk_size` would split brats3d's two-frame 32³ layer, at 2.0×
    # the time: 328 against 174 ms with both gradients); its stacked input, 28 MB there,
    # is less than the direct layer's upsampled volume.
    z = conv3d.depth_folded_conv(xe, phase_kernel(kernel), 1, ((0, 0),) * 3)
  else:
    z = conv.conv_nd(xe, phase_kernel(kernel))  # [b, *spatial, (2,) * nd · cout]
  z = z.reshape((b,) + spatial + (2,) * nd + (cout,))
  # depth-to-space: each spatial axis followed by its phase
  perm = (0,) + sum(((1 + i, 1 + nd + i) for i in range(nd)), ()) + (1 + 2 * nd,)
  y = z.transpose(perm).reshape((b,) + tuple(2 * n for n in spatial) + (cout,))

  # The border lines (planes), the direct way: output 0 along an axis reads the upsampled
  # lines (1, 0, 1) there, the last (2n-2, 2n-1, 2n-2); each is the upsampling of two lines
  # of x. Each face spans the whole image; the axes before its own are trimmed to their
  # interior where it joins, as their own faces come after.
  def face(axis, low):
    # With the face's axis first (3 lines, 1 output line), the other axes are the conv's
    # wide ones: brats3d's row and column faces as [b, 3, 66, 66] rather than [64b, 3, 66].
    first = jnp.moveaxis(x, axis, 1)
    strip = first[:, :2] if low else first[:, -2:]
    u = ops.upsample2x(strip)[:, [1, 0, 1] if low else [2, 3, 2]]
    f = conv.conv_nd(ops.reflect_pad(u, 1, axes=tuple(range(2, nd + 1))),
                     jnp.moveaxis(kernel, axis - 1, 0))
    f = jnp.moveaxis(f, 1, axis)
    return f[(slice(None),) + (slice(1, -1),) * (axis - 1)]

  y = y[(slice(None),) + (slice(1, -1),) * nd]
  for axis in range(nd, 0, -1):
    y = jnp.concatenate([face(axis, True), y, face(axis, False)], axis=axis)
  return y.astype(x.dtype)
