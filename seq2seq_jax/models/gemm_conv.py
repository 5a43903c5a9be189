"""XLA CPU's fast convolutions: 2D convs and their kernel gradients as GEMMs.

The CPU-tuned forms (`conv.forms`) of `conv.conv_nd` and `conv3d.conv3d`: which form suits a
conv (`forward_form`, `grad_form`), the forwards (`row_stacked_conv`, `shifted_gemm_conv`), the
kernel gradients (`kernel_grad`), per-example narrow convs (`per_example_narrow_conv`), and the
loops they tile with (`map_concat`, `map_sum`, each into zeros of its own: `fresh_zeros`).
Every form is checked against XLA's own conv in `tests/gemm_conv_test.py`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
import math
from typing import Any, Callable, Iterator, Sequence

import jax
from jax import lax
import jax.numpy as jnp

from seq2seq_jax import host_memory

_LOOPS = contextvars.ContextVar("seq2seq_jax_conv_loops", default=True)


@contextlib.contextmanager
def loops(enabled: bool) -> Iterator[None]:
  """Whether convs traced inside may loop over tiles or depth chunks (`map_concat`).

  Off, each such conv is one op with the same multiply-adds (the row-stacked forward in one
  tile, a depth-chunked 3D conv as one folded conv) and more memory. For XLA's cost analysis,
  which counts a loop's body once, not once per trip (`experiments.benchmark.count_flops`).
  """
  token = _LOOPS.set(bool(enabled))
  try:
    yield
  finally:
    _LOOPS.reset(token)


def loops_enabled() -> bool:
  return _LOOPS.get()


def fresh_zeros(shape: Sequence[int], dtype: Any, like: jnp.ndarray) -> jnp.ndarray:
  """Zeros in a buffer of this call's own, for a loop to write into.

  A plain zero broadcast (`jnp.zeros`, or the output buffer `lax.map` starts from) is the
  same instruction in every call with the same shape: XLA merges them into one (CSE) and
  copies that template into each loop, so it stays alive from the first call to the last,
  across the whole backward pass (brats3d at 96³: 260 MB of templates live at the step's
  peak). Made by a conditional on `like` (see `materialized`), the zeros are per call.
  """
  return materialized(lambda _: jnp.zeros(shape, dtype), like)


def map_concat(fn: Callable[[jnp.ndarray], jnp.ndarray], count: int, axis: int,
               like: jnp.ndarray) -> jnp.ndarray:
  """`concatenate([fn(i) for i in range(count)], axis)` as a loop: as `lax.map`, but each
  result is written in place along `axis`, into `fresh_zeros` made on `like`."""
  if count == 1:
    return fn(jnp.int32(0))
  out = jax.eval_shape(fn, jnp.int32(0))
  size = out.shape[axis]
  shape = list(out.shape)
  shape[axis] = count * size

  def body(y, i):
    return lax.dynamic_update_slice_in_dim(y, fn(i), i * size, axis), None
  y, _ = lax.scan(body, fresh_zeros(shape, out.dtype, like),
                  jnp.arange(count, dtype=jnp.int32))
  return y


def map_sum(fn: Callable[[jnp.ndarray], jnp.ndarray], count: int,
            like: jnp.ndarray) -> jnp.ndarray:
  """`sum(fn(i) for i in range(count))` as a loop, summed into `fresh_zeros` made on `like`
  (not `lax.map(...).sum(0)`, which stores every result before the sum)."""
  if count == 1:
    return fn(jnp.int32(0))
  out = jax.eval_shape(fn, jnp.int32(0))
  total, _ = lax.scan(lambda acc, i: (acc + fn(i), None),
                      fresh_zeros(out.shape, out.dtype, like),
                      jnp.arange(count, dtype=jnp.int32))
  return total


# Below MIN_ROWS_MACS `row_stacked_conv` is no faster than XLA's conv (the toy model's
# 32-channel layers) but compiles to more code and temporaries.
MIN_ROWS_MACS = 1 << 27
# Stacked rows per tile of `row_stacked_conv` (1-4 MB were within 10% of each other).
ROWS_TILE_BYTES = 1 << 20


# With Eigen's convs, the narrow forms stay where they still win: k²·cout columns at most.
EIGEN_NARROW_COLUMNS = 160


def forward_form(x_shape, kernel_shape, stride: int, eigen: bool | None = None) -> str:
  """Which forward suits a 2D conv (static shapes): 'narrow', 'rows' or 'xla'.

  With XLA CPU's Eigen convolutions (`eigen`, default `host_memory.eigen_cpu_convs()`), XLA's
  own conv is the fastest forward measured on every layer (brats2d's at 222-307 GFLOP/s,
  against 168-227 as rows) but the narrowest (a quarter or fewer of the inputs, k²·cout ≤
  EIGEN_NARROW_COLUMNS: the 7×7 →3 and folded 5×5×5 16→1 output convs, 3× faster as
  narrow). Otherwise (YNNPACK's convs, XLA CPU's default):

  - narrow (`shifted_gemm_conv`): stride 1 and few outputs (k²·cout ≤ 1024 columns, at most a
    quarter of the inputs), where XLA CPU's convolution runs at 2-3 GFLOP/s;
  - rows (`row_stacked_conv`): other stride-1 convs with 16 or more inputs and at least
    MIN_ROWS_MACS multiply-adds. XLA CPU's forward conv is slowest where it narrows the
    channels (192→64 on 16 × 18²: 27 GFLOP/s, 256→128 on 96²: 52, 128→64 on 192²: 45); this
    form was 1.2-3.5× faster on every such layer measured;
  - xla: strided convs, few inputs (3→64 7×7 on 192²: 51 GFLOP/s against 19 as rows), and
    small layers.
  3D convs never get here: `conv3d` folds them into these 2D convs.
  """
  k = kernel_shape[0]
  cin, cout = kernel_shape[-2:]
  if len(x_shape) != 4 or stride != 1 or k == 1:
    return "xla"
  if _eigen(eigen):
    return "narrow" if 4 * cout <= cin and cout * k * k <= EIGEN_NARROW_COLUMNS else "xla"
  if 4 * cout <= cin and cout * k * k <= 1024:
    return "narrow"
  macs = x_shape[0] * math.prod(n - k + 1 for n in x_shape[1:3]) * k * k * cin * cout
  if cin >= 16 and macs >= MIN_ROWS_MACS:
    return "rows"
  return "xla"


def row_stacked_conv(x: jnp.ndarray, kernel: jnp.ndarray,
                     pads: Sequence[tuple[int, int]], tiled: bool = True) -> jnp.ndarray:
  """Stride-1 2D conv as one GEMM over row-stacked inputs and a shifted sum over columns.

  R[n, i, j] = (x[n, i + a, j] for a < k) side by side on channels, Z = R @ W with W
  `[(a, cin), (b, cout)]`, y[n, i, j] = sum_b Z[n, i, j + b, b]: the k row offsets are the
  GEMM's depth (k·cin) and the k column offsets its width (k·cout), so it is a well-shaped GEMM
  where the k²·cin patches would copy the input k² times. Runs over tiles of output rows
  (`map_concat`) whose stacked rows fit in ROWS_TILE_BYTES: R and Z then stay in cache, 1.9-2.6×
  faster on brats2d's 96² and 192² layers than one tile (`tiled=False`). Accumulates in
  float32 (float64 for float64).
  """
  k = kernel.shape[0]
  cin, cout = kernel.shape[-2:]
  if any(lo or hi for lo, hi in pads):
    x = jnp.pad(x, ((0, 0),) + tuple(pads) + ((0, 0),))
  n, h, w = x.shape[0], x.shape[1] - k + 1, x.shape[2] - k + 1
  wm = jnp.transpose(kernel, (0, 2, 1, 3)).reshape(k * cin, k * cout)  # [(a, cin), (b, cout)]

  def tile(xs):  # xs: [n, th + k - 1, W, cin] → [n, th, w, cout]
    rows = jnp.concatenate([xs[:, a:xs.shape[1] - k + 1 + a] for a in range(k)], -1)
    z = lax.dot_general(rows.reshape(-1, k * cin), wm, (((1,), (0,)), ((), ())),
                        preferred_element_type=acc_dtype(x))
    z = z.reshape(rows.shape[:3] + (k, cout))
    y = None
    for b in range(k):
      term = z[:, :, b:b + w, b, :]
      y = term if y is None else y + term
    return y.astype(x.dtype)

  th = _rows_per_tile(h, n * x.shape[2] * k * cin * 4, ROWS_TILE_BYTES)
  if th == h or not tiled:
    return materialized(tile, x)
  # The loop's output is a buffer of its own, as `materialized` makes the one tile's.
  return map_concat(lambda i: tile(lax.dynamic_slice_in_dim(x, i * th, th + k - 1, axis=1)),
                    h // th, axis=1, like=x)


def _rows_per_tile(h: int, row_bytes: int, tile_bytes: int) -> int:
  """The largest divisor of `h` output rows whose tile fits `tile_bytes` (at least 1)."""
  return max([d for d in range(1, h + 1) if h % d == 0 and d * row_bytes <= tile_bytes],
             default=1)


def materialized(fn, z: jnp.ndarray) -> jnp.ndarray:
  """`fn(z)`, computed on its own and stored, not fused into the consumers of its result.

  XLA fuses a cheap last step such as `row_stacked_conv`'s shifted sum into every consumer,
  in the backward pass too, so that they read its input (the GEMM output, k× the conv
  output), which then stays alive as the activation: +300 MB of temporaries on brats2d. A
  conditional's result is a buffer of its own (an optimization barrier is not: XLA CPU
  removes those before fusion); both branches are `fn`, so the predicate (false only for a
  NaN) changes nothing.
  """
  first = z.reshape(-1)[0]
  return lax.cond(first == first, fn, fn, z)


def shifted_gemm_conv(x: jnp.ndarray, kernel: jnp.ndarray,
                      pads: Sequence[tuple[int, int]]) -> jnp.ndarray:
  """Stride-1 conv as one GEMM and a shifted sum: y[p] = sum_o (x_pad @ W_o)[p + o].

  The GEMM `[pixels, cin] @ [cin, k^d·cout]` does all the multiply-adds; the sum over the k^d
  offsets reads cout-channel slices and fuses into one pass. Products are accumulated in
  float32 (bf16 inputs too; float64 for float64) and cast back to x's dtype.
  """
  ndims = x.ndim - 2
  k = kernel.shape[0]
  cin, cout = kernel.shape[-2:]
  if any(lo or hi for lo, hi in pads):
    x = jnp.pad(x, ((0, 0),) + tuple(pads) + ((0, 0),))
  w = jnp.moveaxis(kernel, -2, 0).reshape(cin, -1)  # [cin, (*k, cout)], offsets row-major
  z = lax.dot_general(x.reshape(-1, cin), w, (((1,), (0,)), ((), ())),
                      preferred_element_type=acc_dtype(x))
  return shifted_sum(z.reshape(x.shape[:-1] + (k ** ndims, cout)), k).astype(x.dtype)


def shifted_sum(z: jnp.ndarray, k: int) -> jnp.ndarray:
  """y[n, p] = sum_o z[n, p + o, o]: `z` `[n, *frame, k^d, cout]` (offsets row-major) →
  the VALID output `[n, *(frame - k + 1), cout]`; XLA fuses the slices and adds."""
  ndims = z.ndim - 3
  out = [n - k + 1 for n in z.shape[1:-2]]
  y = None
  for i, offs in enumerate(itertools.product(range(k), repeat=ndims)):
    sl = tuple(slice(o, o + n) for o, n in zip(offs, out))
    term = z[(slice(None),) + sl + (i, slice(None))]
    y = term if y is None else y + term
  return y


def dot_t(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """a^T @ b over a's and b's leading (row) axis, accumulated in float32 (float64 for float64)."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=acc_dtype(a))


def acc_dtype(a: jnp.ndarray):
  """The accumulation dtype: float32 for float32 and narrower inputs, float64 for float64."""
  return jnp.promote_types(a.dtype, jnp.float32)


# Few-input convs whose patches (k^d·cin columns, at most PATCH_COLUMNS) reach
# PATCHES_TO_TILE bytes get `_patches_grad`: XLA's kernel gradient packs them all at once
# outside its buffers. Below, XLA's is faster (brats2d's 3→64 7×7 at 192², 22 MB of
# patches: 10 vs 22 ms).
PATCH_COLUMNS = 256
PATCHES_TO_TILE = 64 << 20
# Patch bytes per tile of `_patches_grad` (4-32 MB tiles of brats3d's first conv: 51-96 ms).
PATCH_TILE_BYTES = 8 << 20


def grad_form(x_shape, kernel_shape, stride: int, eigen: bool | None = None,
              pads: Sequence[tuple[int, int]] = ()) -> str:
  """Which kernel-gradient form suits a conv (static shapes): 'narrow', 'patches', 'wide',
  'prepadded' or 'xla'.

  With Eigen's convs (`forward_form`), XLA's kernel gradient runs at 213-266 GFLOP/s on
  brats2d's stride-1 layers, faster than 'wide' (89-226) and 'narrow' except on the
  narrowest outputs over 16k rows or more; 'wide' keeps the strided layers (18 vs 23 ms
  with the input gradient on brats2d's 128→256 at 96²), 'patches' the few-input ones.
  Where such a stride-1 conv has zero `pads`, 'prepadded': XLA's kernel gradient of the
  VALID conv of x zero-padded beforehand (`conv._conv_bwd`), as Eigen's is slower with the
  padding in its window (brats2d's ConvLSTM 256→768 at 48²: 31-34 against 25-28 ms alone).
  """
  ndims = len(x_shape) - 2
  k = kernel_shape[0]
  cin, cout = kernel_shape[-2:]
  rows = x_shape[0] * math.prod(-(-n // stride) for n in x_shape[1:-1])
  if ndims != 2:
    return "xla"  # never reached by 3D convs: conv_nd sends them to conv3d (2D convs)
  eigen = _eigen(eigen)
  if eigen:
    narrow = (4 * cout <= cin and cout * k ** ndims <= EIGEN_NARROW_COLUMNS
              and rows >= 1 << 14)
  else:
    # Fewer outputs than inputs over 16k rows; a quarter or fewer over 8k rows (the toy
    # model's 32→3 output conv at 8 × 32²: 1.8 vs 2.9 ms).
    few = cout < cin and rows >= 1 << 14 or 4 * cout <= cin and rows >= 1 << 13
    narrow = cout * k ** ndims <= 1024 and few
  if stride == 1 and narrow:
    return "narrow"
  patch_bytes = rows * cin * k ** ndims * 4
  if stride == 1 and cin * k ** ndims <= PATCH_COLUMNS and patch_bytes >= PATCHES_TO_TILE:
    return "patches"
  wide = cin >= 32 and cout >= 32 and rows * cin * cout >= 1 << 24
  if wide and (stride > 1 or not eigen):
    return "wide"
  if eigen and stride == 1 and any(lo or hi for lo, hi in pads):
    return "prepadded"
  return "xla"


def _eigen(eigen: bool | None) -> bool:
  return host_memory.eigen_cpu_convs() if eigen is None else eigen


def _patches_grad(x: jnp.ndarray, dy: jnp.ndarray, k: int) -> jnp.ndarray:
  """dW = patches(x)ᵀ @ dy, `[k²·cin, cout]`, over tiles of output rows (2D, stride 1).

  For convs with few inputs and many rows (brats3d's first conv, 5 stacked depth offsets ×
  5² over 64³ rows): XLA CPU computes their kernel gradient as a convolution whose window is
  the whole image, and its Eigen kernel packs all the patches at once, outside XLA's
  buffers (there: 131 MB a call and 140-190 ms; as 8 MB tiles here, 61 ms). A tile's
  patches are the k² shifted views of its rows side by side, one GEMM per tile; the tiles'
  partial gradients are summed.
  """
  n, w, cin = x.shape[0], dy.shape[2], x.shape[-1]
  h, cout = dy.shape[1], dy.shape[-1]

  def tile(start, th):
    xs = lax.dynamic_slice_in_dim(x, start, th + k - 1, axis=1)
    cols = jnp.concatenate([xs[:, a:a + th, b:b + w] for a in range(k) for b in range(k)], -1)
    dys = lax.dynamic_slice_in_dim(dy, start, th, axis=1)
    return dot_t(cols.reshape(-1, k * k * cin), dys.reshape(-1, cout))

  th = _rows_per_tile(h, n * w * k * k * cin * 4, PATCH_TILE_BYTES)
  if th == h or not _LOOPS.get():
    return tile(0, h)
  return map_sum(lambda i: tile(i * th, th), h // th, like=dy)


def kernel_grad(x: jnp.ndarray, dy: jnp.ndarray, kernel: jnp.ndarray, stride: int,
                pads: Sequence[tuple[int, int]], form: str) -> jnp.ndarray:
  """d loss / d kernel of `_xla_conv(x, kernel, stride, pads)` given the output cotangent.

  dW[o] = sum_p x_pad[s·p + o] ⊗ dy[p] for each kernel offset o. `form` is `grad_form`'s
  choice ('narrow' or 'wide'; convs it leaves to XLA never get here): narrow outputs (e.g. the
  3-channel output conv) shift dy instead of x, so the k^d offsets become GEMM columns (one
  [cin, k^d·cout] GEMM per tile of input rows, `_narrow_grad`); wide layers with enough work
  (the k^d small GEMMs lose to XLA below about 2^24 multiply-adds per offset, e.g. 8 × 8² ×
  64²): one [cin, cout] GEMM per offset over a strided view of x. 'flat_t' (stride 1, for
  AMX's bf16 tiles: `amx_forms`) takes each offset's GEMM over contiguous slices of
  channel-major copies (`_flat_grad`).
  """
  ndims = x.ndim - 2
  k = kernel.shape[0]
  cin, cout = kernel.shape[-2:]
  if any(lo or hi for lo, hi in pads):
    x = jnp.pad(x, ((0, 0),) + tuple(pads) + ((0, 0),))
  out = dy.shape[1:-1]
  offsets = list(itertools.product(range(k), repeat=ndims))
  if form == "narrow":
    g = _narrow_grad(x, dy, k).reshape(cin, len(offsets), cout)
    return jnp.moveaxis(g, 0, 1).reshape(kernel.shape).astype(kernel.dtype)
  if form == "patches":
    return _patches_grad(x, dy, k).reshape(kernel.shape).astype(kernel.dtype)
  if form == "flat_t":
    return _flat_grad(x, dy, k).reshape(kernel.shape).astype(kernel.dtype)
  if form != "wide":
    raise ValueError("kernel_grad form must be 'narrow', 'patches', 'wide' or 'flat_t', "
                     f"got {form!r}")
  dy2 = dy.reshape(-1, cout)
  grads = []
  for offs in offsets:
    start = (0,) + offs + (0,)
    limit = (x.shape[0],) + tuple(o + (n - 1) * stride + 1 for o, n in zip(offs, out)) + (cin,)
    view = lax.slice(x, start, limit, (1,) + (stride,) * ndims + (1,))
    grads.append(dot_t(view.reshape(-1, cin), dy2))
  return jnp.stack(grads).reshape(kernel.shape).astype(kernel.dtype)


def _flat_grad(x: jnp.ndarray, dy: jnp.ndarray, k: int) -> jnp.ndarray:
  """Stride-1 2D dW `[k, k, cin, cout]` as k² GEMMs over contiguous slices, both operands
  channel-major so that each contracts its minor axis (what AMX's bf16 tiles run).

  With X = x (the padded input, frame Hp × Wp) as `[cin, b·Hp·Wp]` and D = dy zero-padded to
  the same frame as `[cout, b·Hp·Wp]`, dW[a, c] = X[:, o:o + n] Dᵀ with o = a·Wp + c: a pixel
  (i, j) of D pairs with x[i + a, j + c], and D's zero rows and columns cancel the pairs that
  wrap into the next row or image. (Hp·Wp)/(H·W) more products (8.5% at 48²), no strided
  copies: in bf16 on AMX 469-622 GFLOP/s on brats2d's 48² layers, 188 on its 96² and 99 on
  its 192² (the wide form 101 / 58, the narrow 134 / 87); slower than either in float32.
  """
  b, hp, wp, cin = x.shape
  cout = dy.shape[-1]
  n = b * hp * wp
  tail = (k - 1) * wp + k - 1  # the last offset's slice reads this far past the frames
  xt = jnp.pad(jnp.moveaxis(x, -1, 0).reshape(cin, n), ((0, 0), (0, tail)))
  d = jnp.pad(dy, ((0, 0), (0, hp - dy.shape[1]), (0, wp - dy.shape[2]), (0, 0)))
  dt = jnp.moveaxis(d, -1, 0).reshape(cout, n)
  grads = [lax.dot_general(lax.slice_in_dim(xt, a * wp + c, a * wp + c + n, axis=1), dt,
                           (((1,), (1,)), ((), ())), preferred_element_type=acc_dtype(x))
           for a in range(k) for c in range(k)]
  return jnp.stack(grads)


@functools.lru_cache(maxsize=None)
def amx_bf16() -> bool:
  """Whether JAX runs on a CPU with AMX bf16 tiles (Intel Sapphire Rapids and later; Linux).

  There XLA CPU's bfloat16 GEMMs run on the tiles when their contraction is on both
  operands' minor axis: 1.4 TFLOP/s against 0.32 in float32 on a 2-core VM
  (experiments/README.md, "twenty-third session"), while its bf16 convolutions and its GEMMs
  over a transposed operand stay near the float32 speed. False where the default backend is
  not the CPU (the CPU-tuned forms forced on a GPU keep their float32-tuned choices).
  """
  if jax.default_backend() != "cpu":
    return False
  try:
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
      for line in f:
        if line.startswith("flags"):
          return "amx_bf16" in line.split()
  except OSError:
    pass
  return False


def amx_forms(x_shape, kernel_shape, stride: int, grad: str,
              pads: Sequence[tuple[int, int]] = ((0, 0), (0, 0))) -> tuple[str, str]:
  """`(input-gradient form, kernel-gradient form)` of a bfloat16 2D conv on an AMX CPU.

  The input gradient is the full conv of dy with the flipped kernel, whose output frame is
  the zero-padded input's; where that conv (dy's cout channels in, cin out) takes
  `row_stacked_conv` it runs on the tiles ('rows': 514-561 against XLA's 263-292 GFLOP/s on
  brats2d's 256- and 512-channel layers). Stride-1 wide and narrow kernel gradients with 32
  or more channels each way become 'flat_t' (`_flat_grad`). Otherwise `("xla", grad)`.
  """
  k = kernel_shape[0]
  cin, cout = kernel_shape[-2:]
  # dy zero-padded by k - 1 on each side: the padded input's frame plus k - 1.
  frame = tuple(n + lo + hi + k - 1 for n, (lo, hi) in zip(x_shape[1:-1], pads))
  dx = "xla"
  dy_shape = x_shape[:1] + frame + (cout,)
  if stride == 1 and forward_form(dy_shape, (k, k, cout, cin), 1, eigen=False) == "rows":
    dx = "rows"
  if stride == 1 and grad in ("wide", "narrow") and min(cin, cout) >= 32:
    grad = "flat_t"
  return dx, grad


def input_grad_form(x_shape, kernel_shape, stride: int) -> str:
  """Which input gradient suits a 2D conv (static shapes): 'narrow' or 'xla'.

  The input gradient is the full conv of dy (cout channels in) with the flipped kernel (cin
  out). Where that conv is as narrow as `forward_form`'s narrowest (a quarter or fewer of its
  inputs, k²·cin ≤ EIGEN_NARROW_COLUMNS: the first convs, 7×7 from 1-3 channels), the
  shifted GEMM (`shifted_gemm_conv`) beats XLA's (Eigen's, with or without YNNPACK's convs):
  brats2d's 3→64 at 192² 14 against 20-23 ms, the toy model's 3→16 at 8 × 32² 1.5 against
  2.0, 1→64 at 192² 2.9 against 7.9 (jitted alone; `experiments/README.md`, "thirty-first
  session").
  """
  k = kernel_shape[0]
  cin, cout = kernel_shape[-2:]
  if len(x_shape) != 4 or stride != 1 or k == 1:
    return "xla"
  return "narrow" if 4 * cin <= cout and cin * k * k <= EIGEN_NARROW_COLUMNS else "xla"


def input_grad(dy: jnp.ndarray, kernel: jnp.ndarray, pads: Sequence[tuple[int, int]],
               form: str) -> jnp.ndarray:
  """d loss / d x of a stride-1 2D `_xla_conv(x, kernel, 1, pads)`: the full conv of dy with
  the flipped, in/out-swapped kernel, cropped by `pads`, as a `row_stacked_conv` ('rows') or
  a `shifted_gemm_conv` ('narrow')."""
  k = kernel.shape[0]
  flipped = jnp.flip(kernel, (0, 1)).swapaxes(-1, -2)
  full = ((k - 1, k - 1),) * 2
  if form == "rows":
    dxp = row_stacked_conv(dy, flipped, full, tiled=loops_enabled())
  elif form == "narrow":
    dxp = shifted_gemm_conv(dy, flipped, full)
  else:
    raise ValueError(f"input_grad form must be 'rows' or 'narrow', got {form!r}")
  (top, bottom), (left, right) = pads
  return dxp[:, top:dxp.shape[1] - bottom, left:dxp.shape[2] - right]


def _narrow_grad(x: jnp.ndarray, dy: jnp.ndarray, k: int) -> jnp.ndarray:
  """dW = xᵀ @ D, `[cin, k^d·cout]`, with D = `shifted_columns(dy, k, frame)`, over tiles of
  the (padded) input's rows; `x` is the padded input, stride 1.

  D has k^d times dy's size over the whole input frame (brats2d's 128→64 3×3 decoder conv
  at 192²: 83 MB, and XLA kept its nine shifted parts beside it, 83 MB more, at the step's
  peak); a tile of it, built from the dy rows it reads, holds at most PATCH_TILE_BYTES. The
  last tile takes the rows left over, so any frame height tiles.
  """
  ndims = x.ndim - 2
  frame = x.shape[1:-1]
  cin, cout = x.shape[-1], dy.shape[-1]
  columns = k ** ndims * cout
  dy_pad = jnp.pad(dy, ((0, 0),) + ((k - 1, k - 1),) * ndims + ((0, 0),))

  def tile(start, th):  # D's frame rows [start, start + th) read dy_pad's [start, +th+k-1)
    dys = lax.dynamic_slice_in_dim(dy_pad, start, th + k - 1, axis=1)
    d = _padded_columns(dys, k, (th,) + frame[1:]).reshape(-1, columns)
    xs = lax.dynamic_slice_in_dim(x, start, th, axis=1)
    return dot_t(xs.reshape(-1, cin), d)

  h = frame[0]
  row_bytes = x.shape[0] * math.prod(frame[1:]) * columns * 4
  th = max(1, min(h, PATCH_TILE_BYTES // row_bytes))
  if th == h or not _LOOPS.get():
    return tile(0, h)
  full = h // th
  g = map_sum(lambda i: tile(i * th, th), full, like=dy)
  return g if h % th == 0 else g + tile(full * th, h % th)


def shifted_columns(dy: jnp.ndarray, k: int, frame: Sequence[int]) -> jnp.ndarray:
  """D with D[n, q, o] = dy[n, q - o] (zero outside dy): dy placed at every kernel offset o
  inside the input's frame, offsets concatenated on channels: `[n, *frame, k^d·cout]`.

  Built from one zero pad of dy and one fused slice-concatenate: a pad per offset costs a
  kernel launch each (147 on the toy step).
  """
  ndims = dy.ndim - 2
  return _padded_columns(jnp.pad(dy, ((0, 0),) + ((k - 1, k - 1),) * ndims + ((0, 0),)), k,
                         frame)


def _padded_columns(dy_pad: jnp.ndarray, k: int, frame: Sequence[int]) -> jnp.ndarray:
  """`shifted_columns` of a dy already padded with k - 1 zeros before each spatial axis (a
  window of such a dy too: `_narrow_grad`'s row tiles), `[n, *frame, k^d·cout]`."""
  ndims = dy_pad.ndim - 2
  cols = [dy_pad[(slice(None),) + tuple(slice(k - 1 - o, k - 1 - o + n)
                                        for o, n in zip(offs, frame)) + (slice(None),)]
          for offs in itertools.product(range(k), repeat=ndims)]
  return jnp.concatenate(cols, axis=-1)
