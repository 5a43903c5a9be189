"""Reflect-padded convolutions per spatial shard, with an explicit halo exchange.

The `spatial` mesh axis splits an image's first spatial axis: a 3D volume's depth, a 2D
image's height (`sharding.batch_spec`). Left to GSPMD, a conv on such an array is
partitioned by XLA: a reflect pad of the split axis becomes a select whose two boolean masks
per padded activation were kept from the forward pass to the backward (brats3d's gradient at
128³ on 2 H200s: 114 MiB of temporaries); the CPU-tuned forms' loops over depth chunks
(`conv3d`) would gather the whole volume onto every device, and their 2D forms came out
larger and slower than per shard (the toy model at 256² on 2 host devices: 680 against 463
MB per device). Here each shard takes its neighbours' border slices instead (`ppermute`;
at the array's ends the reflected slices of its own) and convolves its own slab as one
device would (`sharded_reflect_conv`).

The train step sets the mesh around the model (`spatial_sharding`); convs traced inside read
it at trace time.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Callable, Iterator

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from seq2seq_jax.models import conv
from seq2seq_jax.models import ops

_MESH = contextvars.ContextVar("seq2seq_jax_spatial_mesh", default=None)


@contextlib.contextmanager
def spatial_sharding(mesh: Mesh | None) -> Iterator[None]:
  """Convs traced inside see arrays whose first spatial axis (depth in 3D, height in 2D)
  `mesh`'s `spatial` axis shards (None or a one-shard axis: not sharded). Set by the train
  step around the model."""
  token = _MESH.set(mesh if mesh is not None and _shards(mesh) > 1 else None)
  try:
    yield
  finally:
    _MESH.reset(token)


def spatial_mesh() -> Mesh | None:
  """The mesh set by `spatial_sharding` (None where the first spatial axis is not split)."""
  return _MESH.get()


def _shards(mesh: Mesh) -> int:
  return int(mesh.shape.get("spatial", 1))


def sharded_reflect_conv(
    x: jnp.ndarray, kernel: jnp.ndarray, stride: int, pad: int,
    per_example: Callable[[jnp.ndarray, jnp.ndarray, int], jnp.ndarray] | None = None,
) -> jnp.ndarray | None:
  """`conv.reflect_conv` per spatial shard; None where it does not apply (no sharded axis, an
  extent whose slabs do not line up with the conv's outputs; with the CPU-tuned forms, any
  but the 3D layers one device chunks).

  `x` is `[b, d, ...spatial, c]` with `d` (depth, or height in 2D) split over `spatial`.
  `per_example(x, kernels, stride)`, if given, convolves each example with its own kernel
  (`kernel` then `[b, *k, cin, cout]`, split over the `data` axis like `x`), as
  `hyperconv.per_example` does.

  Each shard reflect-pads its other spatial axes, gets `pad` slices from each neighbour
  (`ppermute`; at the ends the reflected slices of its own), then is convolved as on one
  device (chunked where its own stacked inputs are large). Slabs of `pad` slices or fewer
  cannot serve their neighbours' halos (nor reflect the ends) alone: there every shard
  gathers the whole axis and slices out its window (`_gathered_window`); such arrays are at
  most `pad` × shards slices deep.

  Which layers: every one whose output slabs line up with its input's (`_splits_evenly`),
  except in 3D with the CPU-tuned forms, where only the layers one device chunks
  (`conv3d.chunk_size`) do. Under GSPMD alone those were XLA's 3D conv (1-20 GFLOP/s on
  CPU), as chunking there would gather the volume onto every device, and inside brats3d's
  whole step at 64³ over 8 host devices that conv came out wrong (experiments/README.md,
  fifteenth session). XLA's forms lose GSPMD's reflect-pad masks this way (module
  docstring); a 2D model's CPU-tuned forms need less memory and time per shard than under
  GSPMD (the toy model at 256² on 2 host devices: 680 → 463 MB per device, steps about 2×
  faster; experiments/README.md, twentieth session).
  """
  mesh = _MESH.get()
  if mesh is None:
    return None
  n, depth = _shards(mesh), x.shape[1]
  if conv.cpu_tuned() and x.ndim == 5:
    from seq2seq_jax.models import conv3d  # conv3d builds on this module's mesh
    # chunk_size is None for strided layers too.
    if (per_example is not None or depth % n
        or conv3d.chunk_size(x.shape, kernel.shape, stride, ((pad, pad),) * 3) is None):
      return None
  elif not _splits_evenly(depth, n, kernel.shape[-3], stride, pad):
    return None
  data = int(mesh.shape.get("data", 1))
  spec = P("data" if x.shape[0] % data == 0 else None, "spatial")
  kernel_spec = P() if per_example is None else P(spec[0])

  def local(xl, w):
    xl = ops.reflect_pad(xl, pad, axes=tuple(range(2, xl.ndim - 1)))
    if depth // n <= pad:
      xl = _gathered_window(xl, pad)
    elif pad:
      xl = _halo(xl, pad, n)
    with spatial_sharding(None):
      return conv.conv_nd(xl, w, stride) if per_example is None else per_example(xl, w, stride)

  # check_vma off: the chunk loops' carries start from zeros that are not marked as varying
  # over the mesh, which the check rejects; the kernel's gradient is still summed over shards.
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, kernel_spec), out_specs=spec,
                       check_vma=False)(x, kernel)


def _splits_evenly(depth: int, n: int, k: int, stride: int, pad: int) -> bool:
  """Whether a conv of `depth` slices reflect-padded by `pad` splits into `n` depth shards
  that each convolve their own slab and its halos: slabs a multiple of the stride (so that
  each shard's first output starts at its first slice) and as many outputs per shard as
  the whole volume has over `n`."""
  slab = depth // n
  return (depth % n == 0 and slab % stride == 0
          and n * ((slab + 2 * pad - k) // stride + 1) == (depth + 2 * pad - k) // stride + 1)


def _gathered_window(xl: jnp.ndarray, pad: int) -> jnp.ndarray:
  """This shard's slab `[b, d, ...]` with `pad` slices either side, cut from the whole
  reflect-padded depth gathered onto every shard (for slabs of `pad` slices or fewer, whose
  halos span several neighbours). The gradient goes back through `all_gather`'s transpose,
  a reduce-scatter."""
  d = xl.shape[1]
  whole = ops.reflect_pad(lax.all_gather(xl, "spatial", axis=1, tiled=True), pad, axes=(1,))
  return lax.dynamic_slice_in_dim(whole, lax.axis_index("spatial") * d, d + 2 * pad, axis=1)


def _halo_slices(xl: jnp.ndarray, pad: int, n: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The `pad` slices before and after this shard's slab: its neighbours' border slices,
  or at the volume's ends its own, reflected."""
  i, d = lax.axis_index("spatial"), xl.shape[1]
  from_prev = lax.ppermute(xl[:, d - pad:], "spatial", [(j, j + 1) for j in range(n - 1)])
  from_next = lax.ppermute(xl[:, :pad], "spatial", [(j + 1, j) for j in range(n - 1)])
  lo = jnp.where(i == 0, jnp.flip(xl[:, 1:pad + 1], 1), from_prev)
  hi = jnp.where(i == n - 1, jnp.flip(xl[:, d - 1 - pad:d - 1], 1), from_next)
  return lo, hi


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _halo(xl: jnp.ndarray, pad: int, n: int) -> jnp.ndarray:
  """This shard's slab `[b, d, ...]` with `_halo_slices` around it: `[b, d + 2·pad, ...]`."""
  lo, hi = _halo_slices(xl, pad, n)
  return jnp.concatenate([lo, xl, hi], axis=1)


def _halo_fwd(xl, pad, n):
  return _halo(xl, pad, n), None


def _halo_bwd(pad, n, _, dy):
  # Each halo's gradient goes back to the slices it copied, added in place. Autodiff
  # zero-padded every border slice's gradient to the whole slab, four slab-sized buffers
  # (brats3d's decoder conv at 64³ on 2 shards: 4 × 17 MB at the step's peak).
  i, d = lax.axis_index("spatial"), dy.shape[1] - 2 * pad
  g_lo, g_hi = dy[:, :pad], dy[:, pad + d:]
  zero = jnp.zeros((), dy.dtype)
  dx = dy[:, pad:pad + d]
  dx = dx.at[:, d - pad:].add(
      lax.ppermute(g_lo, "spatial", [(j + 1, j) for j in range(n - 1)]))
  dx = dx.at[:, :pad].add(lax.ppermute(g_hi, "spatial", [(j, j + 1) for j in range(n - 1)]))
  dx = dx.at[:, 1:pad + 1].add(jnp.where(i == 0, jnp.flip(g_lo, 1), zero))
  dx = dx.at[:, d - 1 - pad:d - 1].add(jnp.where(i == n - 1, jnp.flip(g_hi, 1), zero))
  return (dx,)


_halo.defvjp(_halo_fwd, _halo_bwd)
