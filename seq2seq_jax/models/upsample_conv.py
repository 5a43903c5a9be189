"""×2 upsampling, reflect pad and a 3×3 conv as one conv at the low resolution (2D).

The decoder's upsampling layers compute conv3x3(reflect_pad(upsample2x(x), 1)). Per axis,
output 2i takes x[i-1], x[i], x[i+1] with the taps (.75K0 + .25K1, .25K0 + .75K1 + .75K2,
.25K2) and output 2i+1 with (.25K0, .75K0 + .75K1 + .25K2, .25K1 + .75K2), so the whole layer
is one 3×3 conv of x (edge-padded by one) whose four output phases sit side by side on
channels, then a depth-to-space. That conv runs at the low resolution with 4× the outputs,
where XLA CPU's convs are faster (brats2d's 192² 128→64 layer, forward and both gradients:
58.7 ms as before against 39.8 as 96² 128→256; experiments/README.md, "thirty-first
session"), and the upsampled image is never made. On x edge-padded the identity holds except
on the outermost output rows and columns (the reflect pad of the upsampled image is not an
upsampling of any padded x); those four lines are computed the direct way from two-line
strips of x.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from seq2seq_jax.models import conv
from seq2seq_jax.models import ops
from seq2seq_jax.models import sharded_conv

# Low-resolution multiply-adds per tap (b·h·w·cin·cout) from which the phase form is taken:
# brats2d's 96² 128→64 and 48² 256→128 (75 M) gain (forward and both gradients, one image:
# 88.6 → 65.6 and 60.5 → 54.4 ms), the toy model's 8 × 16² 32→32 (2 M) loses (2.5 → 5.5).
MIN_MACS = 1 << 24

# Rows: the even and the odd output phase; for each, the weights of K's taps 0..2 (columns)
# at the input offsets -1, 0, +1 (rows).
_PHASES = np.array([[[.75, .25, 0.], [.25, .75, .75], [0., 0., .25]],
                    [[.25, 0., 0.], [.75, .75, .25], [0., .25, .75]]])


def applies(x_shape, kernel_shape, stride: int, pad: int) -> bool:
  """Whether `upsampled_reflect_conv` computes this layer: 2D, 3×3, stride 1, pad 1, and a
  low-resolution image of at least 2×2."""
  return (len(x_shape) == 4 and tuple(kernel_shape[:2]) == (3, 3) and stride == 1
          and pad == 1 and min(x_shape[1:3]) >= 2)


def wanted(x_shape, kernel_shape, stride: int, pad: int) -> bool:
  """Whether a layer takes `upsampled_reflect_conv`: where it `applies`, large enough
  (MIN_MACS), with the CPU-tuned conv forms (`conv.forms`; not timed on GPUs) and no spatial
  mesh (its border strips assume the whole image)."""
  cin, cout = kernel_shape[-2:]
  return (applies(x_shape, kernel_shape, stride, pad) and conv.cpu_tuned()
          and sharded_conv.spatial_mesh() is None
          and int(np.prod(x_shape[:3])) * cin * cout >= MIN_MACS)


def phase_kernel(kernel: jnp.ndarray) -> jnp.ndarray:
  """`[3, 3, cin, cout]` → `[3, 3, cin, 4·cout]`: the four output phases' kernels over x's
  offsets, outputs ordered (row phase, column phase, cout)."""
  # One axis at a time, as sums of scaled taps: forward and transpose 1.7 + 2.5 ms on
  # brats2d's 256→128 kernel, where an einsum went to a GEMM and a transpose (5.0 + 3.0) and
  # all nine taps summed per phase had a slow transpose (0.9 + 19.3).
  c = _PHASES
  k = kernel.astype(jnp.promote_types(kernel.dtype, jnp.float32))  # mixed in float32
  mix = lambda taps, p, a: sum(float(c[p, a, t]) * taps[t] for t in range(3) if c[p, a, t])
  rows = jnp.stack([jnp.stack([mix(k, p, a) for a in range(3)]) for p in range(2)])
  both = jnp.stack([jnp.stack([mix([rows[:, :, u] for u in range(3)], q, b) for b in range(3)])
                    for q in range(2)])  # [q, b, p, a, cin, cout]
  out = jnp.transpose(both, (3, 1, 4, 2, 0, 5))  # [a, b, cin, p, q, cout]
  return out.reshape(3, 3, kernel.shape[2], 4 * kernel.shape[3]).astype(kernel.dtype)


def upsampled_reflect_conv(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
  """`conv.reflect_conv(ops.upsample2x(x), kernel, 1, 1)` for x `[b, h, w, cin]` and a
  `[3, 3, cin, cout]` kernel (`applies`), as one conv at x's resolution."""
  b, h, w, _ = x.shape
  cout = kernel.shape[-1]
  xe = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  z = conv.conv_nd(xe, phase_kernel(kernel))  # [b, h, w, (2, 2, cout)]
  y = z.reshape(b, h, w, 2, 2, cout).transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, cout)

  # The border lines, the direct way: output row 0 reads the upsampled rows (1, 0, 1), the
  # last row (2h-2, 2h-1, 2h-2); each is the upsampling of two rows of x (columns alike).
  def line(strip, picks, axis):  # two lines of x along `axis` → one output line
    u = ops.upsample2x(strip)[(slice(None),) * axis + (picks,)]
    return conv.conv_nd(ops.reflect_pad(u, 1, axes=(3 - axis,)), kernel)

  top = line(x[:, :2], [1, 0, 1], 1)
  bottom = line(x[:, -2:], [2, 3, 2], 1)
  left = line(x[:, :, :2], [1, 0, 1], 2)
  right = line(x[:, :, -2:], [2, 3, 2], 2)
  y = jnp.concatenate([left[:, 1:-1], y[:, 1:-1, 1:-1], right[:, 1:-1]], axis=2)
  return jnp.concatenate([top, y, bottom], axis=1).astype(x.dtype)
