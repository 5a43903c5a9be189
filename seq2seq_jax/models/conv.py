"""Convolution with reflect padding, channels-last, and the official initialisers."""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from seq2seq_jax.models import gemm_conv
from seq2seq_jax.models import ops

# Official init: kaiming-normal (fan-in, gain sqrt 2) on 2D conv weights; torch's default
# kaiming-uniform(a=sqrt 5), i.e. U(±1/sqrt(fan_in)), on 3D convs and linears; zero biases.
kaiming_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
torch_default_uniform = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
zeros = nn.initializers.zeros


# What `Generator(recompute_elementwise=True)` keeps for the backward pass: each layer's conv
# output (before norm and activation) and the hypernetwork's per-code kernels.
CONV_OUT = "conv_out"
HYPER_KERNELS = "hyper_kernels"


def conv_output(y: jnp.ndarray) -> jnp.ndarray:
  """Marks `y` as a layer's conv output (`CONV_OUT`); the identity otherwise."""
  return checkpoint_name(y, CONV_OUT)


# Which convolutions the model's layers use (`forms`).
FORMS = ("auto", "cpu_tuned", "xla")
_FORMS = contextvars.ContextVar("seq2seq_jax_conv_forms", default="auto")


@contextlib.contextmanager
def forms(name: str) -> Iterator[None]:
  """The convolutions traced inside: `name` is one of FORMS (`config.train.conv_forms`).

  - cpu_tuned: the forms below where XLA CPU's own convs are slow (3D convs as 2D convs of
    depth slices, depth chunks, per-shard 3D convs on depth-sharded volumes, per-example
    kernels as GEMMs, GEMMs over shifted inputs for narrow outputs; with YNNPACK's convs,
    XLA CPU's default, row-stacked GEMMs for most 2D layers too: `gemm_conv.forward_form`);
  - xla: XLA's own convolutions throughout, as GPUs (cuDNN) and TPUs run them fastest: 3D
    convs as 3D convs, per-example kernels as one grouped conv, on a spatially sharded
    array each run per shard with a halo exchange (`sharded_conv.sharded_reflect_conv`);
    their gradients XLA's too, the two of each conv computed together (`xla_conv`);
  - auto: cpu_tuned where JAX's default backend is the CPU, xla elsewhere.
  """
  check_forms(name)
  token = _FORMS.set(name)
  try:
    yield
  finally:
    _FORMS.reset(token)


def check_forms(name: str) -> None:
  if name not in FORMS:
    raise ValueError(f"config.train.conv_forms must be one of {FORMS}, not {name!r}")


def cpu_tuned() -> bool:
  """Whether convs traced here take the CPU-tuned forms (`forms`); read at trace time."""
  name = _FORMS.get()
  if name == "auto":
    return jax.default_backend() == "cpu"
  return name == "cpu_tuned"


def dimension_numbers(ndims: int) -> tuple[str, str, str]:
  if ndims == 2:
    return ("NHWC", "HWIO", "NHWC")
  return ("NDHWC", "DHWIO", "NDHWC")


def _xla_conv(x, kernel, stride, pads):
  ndims = x.ndim - 2
  return lax.conv_general_dilated(
      x, kernel, window_strides=(stride,) * ndims, padding=pads,
      dimension_numbers=dimension_numbers(ndims))


def xla_conv(x: jnp.ndarray, kernel: jnp.ndarray, stride: int,
             pads: Sequence[tuple[int, int]]) -> jnp.ndarray:
  """XLA's conv, whose two gradients are computed together (the `xla` forms' conv).

  The kernel gradient is needed only by the optimizer, after the whole backward pass, and
  XLA's GPU scheduler defers it there, keeping each layer's input alive meanwhile. On a
  depth-sharded volume that input is also halo-extended twice (for the recomputed forward
  conv and for the kernel gradient; XLA fuses the two, so both are made at recompute time):
  brats3d's gradient at 64³ on 2 H200s planned 235 MiB of temporaries with `remat`, more
  than on one (208). Behind one optimization barrier with the input gradient (`_conv`'s VJP)
  it is 149 MiB (205 on one, 76 on 4; experiments/README.md, "eighteenth session").
  """
  return _conv(x, kernel, stride, tuple(pads), "xla", "xla", "xla")


def conv_nd(x: jnp.ndarray, kernel: jnp.ndarray, stride: int = 1,
            padding: str | Sequence[tuple[int, int]] = "VALID") -> jnp.ndarray:
  """Channels-last convolution; `kernel` is `[*k, in, out]`; zero `padding` per side.

  XLA's own convolutions, except, with the CPU-tuned forms (`forms`), where XLA CPU is slow
  (`gemm_conv`): the forward pass of stride-1 convs (`forward_form`: a narrow-output conv
  such as the 3-channel 7×7 output conv is 3-40× faster as `shifted_gemm_conv`; with
  YNNPACK's convs, most others 1.2-3.5× as `row_stacked_conv`) and the kernel gradient of
  narrow, strided wide and few-input layers (`kernel_grad`, GEMMs; with YNNPACK's convs all
  wide layers). With Eigen's convs (`host_memory.eigen_cpu_convs`, `main.py`'s default on
  CPU) XLA's conv is the faster form on every other 2D layer measured, its kernel gradient
  of a zero-padded conv taken with the padding applied first ('prepadded'). The input
  gradient is XLA's, which is Eigen's conv in either case (a padded conv), except where it
  has few outputs (the first convs' 1-3 input channels: `gemm_conv.input_grad_form`). 3D
  convs are 2D convs over depth slices (`conv3d.conv3d`), so they get the same forms. In
  bfloat16 on CPUs with AMX tiles, whose bf16 GEMMs run 2.5-4× faster than XLA's bf16
  convs, the YNNPACK-era forms stay, the input gradient of row-stacked layers is a
  row-stacked conv too, and wide and narrow kernel gradients take GEMMs over channel-major
  copies (`amx_forms`).
  """
  ndims = x.ndim - 2
  if isinstance(padding, str):
    if padding != "VALID":
      raise ValueError(f"conv_nd takes 'VALID' or explicit (lo, hi) pads, not {padding!r}")
    padding = ((0, 0),) * ndims
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  if not cpu_tuned():
    return xla_conv(x, kernel, stride, pads)
  if ndims == 3:
    from seq2seq_jax.models import conv3d  # conv3d builds on this module's 2D convs
    return conv3d.conv3d(x, kernel, stride, pads)
  amx = gemm_conv.amx_bf16() and x.dtype == jnp.bfloat16
  # bf16 on AMX keeps the GEMM forms chosen there (with YNNPACK's convs), Eigen's or not.
  eigen = False if amx else None
  fwd = gemm_conv.forward_form(x.shape, kernel.shape, stride, eigen)
  if fwd == "rows" and not gemm_conv.loops_enabled():
    fwd = "rows_untiled"  # a static argument of the custom VJP, so traces are not shared
  grad = gemm_conv.grad_form(x.shape, kernel.shape, stride, eigen, pads)
  dx = gemm_conv.input_grad_form(x.shape, kernel.shape, stride)
  if amx:
    dx, grad = gemm_conv.amx_forms(x.shape, kernel.shape, stride, grad, pads)
  if fwd == grad == dx == "xla":
    # Both gradients behind one barrier, as everywhere else: with Eigen's convs most of
    # brats2d's layers get here, and without it XLA deferred their kernel gradients (XLA
    # temporaries 748 against 565 MB, peak RSS 3,094 against 2,895 MB, same step time).
    return xla_conv(x, kernel, stride, pads)
  return _conv(x, kernel, stride, pads, fwd, grad, dx)


def reflect_conv(x: jnp.ndarray, kernel: jnp.ndarray, stride: int, pad: int) -> jnp.ndarray:
  """`conv_nd` of `x` reflect-padded by `pad` on every spatial axis (the official
  `padding_mode='reflect'`); per shard where the first spatial axis is sharded
  (`sharded_conv.sharded_reflect_conv` says which layers)."""
  from seq2seq_jax.models import sharded_conv  # builds on this module's convs
  y = sharded_conv.sharded_reflect_conv(x, kernel, stride, pad)
  if y is not None:
    return y
  return conv_nd(ops.reflect_pad(x, pad), kernel, stride)


def _forward(x, kernel, stride, pads, fwd):
  if fwd == "narrow":
    return gemm_conv.shifted_gemm_conv(x, kernel, pads)
  if fwd in ("rows", "rows_untiled"):
    return gemm_conv.row_stacked_conv(x, kernel, pads, tiled=fwd == "rows")
  return _xla_conv(x, kernel, stride, pads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _conv(x, kernel, stride, pads, fwd, grad, dx):
  del grad, dx
  return _forward(x, kernel, stride, pads, fwd)


def _conv_fwd(x, kernel, stride, pads, fwd, grad, dx):
  del grad, dx
  return _forward(x, kernel, stride, pads, fwd), (x, kernel)


def _conv_bwd(stride, pads, fwd, grad, dx_form, res, dy):
  del fwd
  x, kernel = res
  # The forward conv traced here is dead code after the transpose; XLA removes it.
  if grad == dx_form == "xla":
    grads = jax.vjp(lambda x_, k_: _xla_conv(x_, k_, stride, pads), x, kernel)[1](dy)
  else:
    if dx_form in ("rows", "narrow"):
      dx = gemm_conv.input_grad(dy, kernel, pads, dx_form)
    else:
      dx = jax.vjp(lambda x_: _xla_conv(x_, kernel, stride, pads), x)[1](dy)[0]
    if grad == "xla":
      dw = jax.vjp(lambda k_: _xla_conv(x, k_, stride, pads), kernel)[1](dy)[0]
    elif grad == "prepadded":
      # XLA moves the channels of a kernel gradient's input to its major axis first; the
      # padding then goes into that copy, not into the conv's window, where Eigen's kernel
      # gradient is slower (`gemm_conv.grad_form`). A pad right before the conv would be
      # folded back into its window.
      xp = jnp.pad(x, ((0, 0),) + pads + ((0, 0),))
      valid = ((0, 0),) * len(pads)
      dw = jax.vjp(lambda k_: _xla_conv(xp, k_, stride, valid), kernel)[1](dy)[0]
    else:
      dw = gemm_conv.kernel_grad(x, dy, kernel, stride, pads, grad)
    grads = dx, dw
  # dx only once dW is done, so that this layer's x and dy are freed as backprop passes it.
  # The kernel gradient is needed only by the optimizer, after the whole backward pass, and
  # XLA's scheduler otherwise put many layers' off until then, each keeping its x and dy
  # alive meanwhile: brats2d's step held 132 such activations at its peak (XLA temporaries
  # 855 -> 684 MB; experiments/README.md). XLA CPU keeps the barrier only where remat's are
  # kept (`host_memory.keep_remat_barriers`), elsewhere on CPU it is a no-op; XLA GPU keeps
  # it through scheduling (`xla_conv`).
  return lax.optimization_barrier(grads)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_kernel_init(ndims: int):
  return kaiming_normal if ndims == 2 else torch_default_uniform


class Conv(nn.Module):
  """Conv k^ndims with bias; `pad` reflect-pads first (the official `padding_mode='reflect'`).

  Attributes:
    features: output channels.
    kernel_size: odd edge length k.
    stride: 1 or 2.
    pad: reflect padding per side, applied before a VALID convolution.
    ndims: 2 or 3.
    dtype: compute dtype (params stay float32).
    post: applied to the output (norm, activation): inside the module, so that
      `nn.remat(Conv)` recomputes it too and keeps only the layer's input.
  """
  features: int
  kernel_size: int
  stride: int = 1
  pad: int = 0
  ndims: int = 2
  dtype: Any = jnp.float32
  post: Callable[[jnp.ndarray], jnp.ndarray] | None = None

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    in_features = x.shape[-1]
    kshape = (self.kernel_size,) * self.ndims + (in_features, self.features)
    kernel = self.param("kernel", conv_kernel_init(self.ndims), kshape, jnp.float32)
    bias = self.param("bias", zeros, (self.features,), jnp.float32)
    y = reflect_conv(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, self.pad)
    y = conv_output(y + bias.astype(self.dtype))
    return y if self.post is None else self.post(y)


def linear_init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jnp.ndarray:
  """torch.nn.Linear's default weight init for a flax `[in, out]` kernel."""
  return torch_default_uniform(key, shape, dtype)
