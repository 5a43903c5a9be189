"""The hyperconvolution: a conv whose kernel and bias are generated from the style code."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from seq2seq_jax.models import ops
from seq2seq_jax.models import conv
from seq2seq_jax.models import gemm_conv
from seq2seq_jax.models import sharded_conv
from seq2seq_jax.models.conv import linear_init, zeros

# Official init of `param`: kaiming-normal with torch's fan-in of a [out, in, *k, c_w] tensor,
# i.e. in · k^ndims · c_w. Flax layout here is [*k, in, out, c_w]: `in` is axis -3, `out` -2,
# and the receptive field (k^ndims · c_w) is every other axis.
hyper_param_init = nn.initializers.variance_scaling(
    2.0, "fan_in", "normal", in_axis=-3, out_axis=-2)


def per_example_conv(x: jnp.ndarray, kernels: jnp.ndarray, stride: int = 1) -> jnp.ndarray:
  """VALID conv of example i with its own kernel i: `x` `[b, *sp, cin]`, `kernels`
  `[b, *k, cin, cout]`.

  As patches (the k^ndims shifted views, concatenated on channels) times each example's
  kernel matrix: one batched matmul, which XLA runs at GEMM speed, where a grouped conv (what
  `vmap` of a conv becomes) is many times slower on CPU.
  """
  b, ndims = x.shape[0], x.ndim - 2
  k = kernels.shape[1]
  out = [(n - k) // stride + 1 for n in x.shape[1:-1]]
  cols = []
  for offs in itertools.product(range(k), repeat=ndims):
    sl = tuple(slice(o, o + (n - 1) * stride + 1, stride) for o, n in zip(offs, out))
    cols.append(x[(slice(None),) + sl + (slice(None),)])
  patches = jnp.concatenate(cols, axis=-1)  # [b, *out, k^ndims·cin], kernel row-major order
  return jnp.einsum("b...i,bio->b...o", patches, kernels.reshape(b, -1, kernels.shape[-1]))


def per_example_narrow(x_shape, kernel_shape, stride: int) -> bool:
  """Whether a per-example conv (one kernel per example, `kernel_shape` `[*k, cin, cout]`)
  takes `per_example_narrow_conv` rather than the patches form (`per_example_conv`): in 2D
  where `gemm_conv.forward_form` says narrow; in 3D for stride 1 and at most half as many
  outputs as inputs (k³·cout ≤ 1024). The patches form's autodiff gradient pads each of the
  k³ slices' gradient to the whole input: `dce4d`'s step (32→16, 16→8 and 8→1 decoder
  convs) 0.614 / 0.647 s with this against 0.708 / 0.683, XLA temporaries 913 → 694 MB.
  """
  if len(x_shape) == 4:  # against the patches form, not XLA's conv: Eigen's changes nothing
    return gemm_conv.forward_form(x_shape, kernel_shape, stride, eigen=False) == "narrow"
  k = kernel_shape[0]
  cin, cout = kernel_shape[-2:]
  return len(x_shape) == 5 and stride == 1 and 2 * cout <= cin and k ** 3 * cout <= 1024


@jax.custom_vjp
def per_example_narrow_conv(x: jnp.ndarray, kernels: jnp.ndarray) -> jnp.ndarray:
  """VALID stride-1 conv of example i with its own kernel i, for narrow outputs.

  `x` `[b, *sp, cin]`, `kernels` `[b, *k, cin, cout]`. Forward as
  `gemm_conv.shifted_gemm_conv` with a batched GEMM; both gradients from the shifted-dy
  columns D of `gemm_conv.shifted_columns`: dW_i = x_iᵀ D_i and dx_i = D_i W_iᵀ, one batched
  GEMM each. Where the patches form (`per_example_conv`) copies k^d·cin channels per pixel
  (1,568 for the 32→3 7×7 output conv), this reads and writes k^d·cout.
  """
  return _pe_narrow_fwd(x, kernels)[0]


def _pe_flat_kernels(kernels):
  b, cin = kernels.shape[0], kernels.shape[-2]
  return jnp.moveaxis(kernels, -2, 1).reshape(b, cin, -1)  # [b, cin, (*k, cout)]


def _pe_narrow_fwd(x, kernels):
  b, ndims = x.shape[0], x.ndim - 2
  k = kernels.shape[1]
  cin, cout = kernels.shape[-2:]
  z = jnp.einsum("bpc,bcq->bpq", x.reshape(b, -1, cin), _pe_flat_kernels(kernels),
                 preferred_element_type=gemm_conv.acc_dtype(x))
  y = gemm_conv.shifted_sum(z.reshape(x.shape[:-1] + (k ** ndims, cout)), k)
  return y.astype(x.dtype), (x, kernels)


def _pe_narrow_bwd(res, dy):
  x, kernels = res
  b, cin = x.shape[0], x.shape[-1]
  d = gemm_conv.shifted_columns(dy, kernels.shape[1], x.shape[1:-1])
  d = d.reshape(b, -1, d.shape[-1])
  w = _pe_flat_kernels(kernels)
  acc = gemm_conv.acc_dtype(x)
  dw = jnp.einsum("bpc,bpq->bcq", x.reshape(b, -1, cin), d, preferred_element_type=acc)
  dw = jnp.moveaxis(dw.reshape((b, cin) + kernels.shape[1:-2] + kernels.shape[-1:]), 1, -2)
  dx = jnp.einsum("bpq,bcq->bpc", d, w, preferred_element_type=acc)
  return dx.reshape(x.shape).astype(x.dtype), dw.astype(kernels.dtype)


per_example_narrow_conv.defvjp(_pe_narrow_fwd, _pe_narrow_bwd)


def grouped_conv(x: jnp.ndarray, kernels: jnp.ndarray, stride: int = 1) -> jnp.ndarray:
  """`per_example_conv` as XLA's own conv: `vmap` over examples and kernels becomes one conv
  with a feature group per example, which cuDNN and TPUs run directly (`conv.forms('xla')`).
  """
  valid = ((0, 0),) * (x.ndim - 2)
  return jax.vmap(lambda xi, wi: conv.xla_conv(xi[None], wi, stride, valid)[0])(x, kernels)


def per_example(x: jnp.ndarray, kernels: jnp.ndarray, stride: int = 1) -> jnp.ndarray:
  """VALID conv of example i with its own kernel i, in the forms traced here (`conv.forms`):
  `grouped_conv` for XLA's; on CPU `per_example_narrow_conv` for narrow outputs
  (e.g. the 3-channel output conv; `per_example_narrow`), else `per_example_conv`."""
  if not conv.cpu_tuned():
    return grouped_conv(x, kernels, stride)
  if per_example_narrow(x.shape, kernels.shape[1:], stride):
    return per_example_narrow_conv(x, kernels)
  return per_example_conv(x, kernels, stride)


# The collection of `norm_probes`: one zero scalar per HyperConv, named as its bank `param`.
NORM_PROBES = "norm_probes"


@jax.custom_vjp
def norm_probe(flat_kernels: jnp.ndarray, w: jnp.ndarray, probe: jnp.ndarray) -> jnp.ndarray:
  """`flat_kernels` (= bank `[m, c_w]` @ `w`ᵀ, `[m, n]`), unchanged; `probe`'s cotangent is
  the Frobenius norm of this use's bank gradient, ‖dK @ w‖, from the factors.

  The bank's gradient is dK @ w, rank n (one row of `w` per code). Its norm straight from
  the gradient is a pass over all of it, which XLA CPU also has to write out for its reduce;
  from the factors it is sqrt(Σ_ij (dKᵀdK)_ij (w wᵀ)_ij), a read of dK only. A module used by
  several renders a step sums its uses' norms: by the triangle inequality that sum bounds the
  norm of the summed gradient, so a finite-gradient guard built on it (`train_step`) stays
  sound; it is exact for a single use.
  """
  del w, probe
  return flat_kernels


def _probe_fwd(flat_kernels, w, probe):
  return flat_kernels, (w, probe)


def _probe_bwd(res, dk):
  w, probe = res
  dk32, w32 = dk.astype(jnp.float32), w.astype(jnp.float32)
  sq = jnp.sum((dk32.T @ dk32) * (w32 @ w32.T))
  # max(·, 0) against rounding below zero; NaN and inf pass through it (jnp.maximum keeps NaN).
  return dk, jnp.zeros_like(w), jnp.sqrt(jnp.maximum(sq, 0.0)).astype(probe.dtype)


norm_probe.defvjp(_probe_fwd, _probe_bwd)


def norm_probes(params: Any) -> Any:
  """Zero probes for every HyperConv in `params` (a dict holding a bank `param` and an `fc`
  Dense), as the `NORM_PROBES` collection: `{..., 'conv1': {'param': 0.0}}`.

  Passed to `apply` beside the params, the gradient of each probe is the summed norm of its
  bank's gradient over the step's uses (`norm_probe`); without them nothing changes.
  """
  out = {}
  for name, sub in params.items():
    if not isinstance(sub, Mapping):
      continue
    if "param" in sub and "fc" in sub:
      out[name] = {"param": jnp.zeros((), jnp.float32)}
    else:
      inner = norm_probes(sub)
      if inner:
        out[name] = inner
  return out


class HyperConv(nn.Module):
  """Conv whose kernel = param · fc(s) and bias = b · fc_bias(s).

  `s` is `[1, c_s]` (one code for the whole batch, as the official model) or `[n, c_s]` with
  n = batch (one code per example). In the per-example case each example is convolved with its
  own kernel, as one batched matmul over patches (see `per_example_conv`), or for narrow
  outputs as `per_example_narrow_conv`; with XLA's own conv forms (`conv.forms`), as
  one grouped conv (`grouped_conv`).

  Attributes:
    features: output channels.
    kernel_size: odd edge length k.
    c_w: size of the weight basis.
    pad: reflect padding per side, applied before a VALID convolution.
    stride: conv stride.
    ndims: 2 or 3.
    dtype: compute dtype for the convolution.
    pre, post: applied to the input (upsampling) and to the output (norm, activation):
      inside the module, so that `nn.remat(HyperConv)` recomputes them too.
  """
  features: int
  kernel_size: int
  c_w: int
  pad: int = 0
  stride: int = 1
  ndims: int = 2
  dtype: Any = jnp.float32
  pre: Callable[[jnp.ndarray], jnp.ndarray] | None = None
  post: Callable[[jnp.ndarray], jnp.ndarray] | None = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, s: jnp.ndarray) -> jnp.ndarray:
    if self.pre is not None:
      x = self.pre(x)
    y = conv.conv_output(self._conv(x, s))
    return y if self.post is None else self.post(y)

  def _conv(self, x: jnp.ndarray, s: jnp.ndarray) -> jnp.ndarray:
    in_features = x.shape[-1]
    kshape = (self.kernel_size,) * self.ndims + (in_features, self.features, self.c_w)
    param = self.param("param", hyper_param_init, kshape, jnp.float32)
    b = self.param("b", zeros, (self.features, self.c_w), jnp.float32)
    w = nn.Dense(self.c_w, kernel_init=linear_init, bias_init=zeros, name="fc")(s)
    wb = nn.Dense(self.c_w, kernel_init=linear_init, bias_init=zeros, name="fc_bias")(s)
    # A GEMV on the bank's own [k^d·in·out, c_w] layout: as einsum("...w,nw->n..."), XLA CPU
    # first copied every bank to [c_w, ...] (brats2d: 12 × 36 MB, 270 ms of kernels a step).
    flat = param.reshape(-1, self.c_w) @ w.T
    if self.has_variable(NORM_PROBES, "param"):
      flat = norm_probe(flat, w, self.get_variable(NORM_PROBES, "param"))
    kernels = jnp.moveaxis(flat, -1, 0)
    kernels = kernels.reshape((w.shape[0],) + kshape[:-1])  # [n, *k, in, out]
    biases = wb @ b.T  # [n, out]
    x = x.astype(self.dtype)
    kernels = checkpoint_name(kernels.astype(self.dtype), conv.HYPER_KERNELS)
    biases = checkpoint_name(biases.astype(self.dtype), conv.HYPER_KERNELS)
    if s.shape[0] == 1:
      return conv.reflect_conv(x, kernels[0], self.stride, self.pad) + biases[0]
    if s.shape[0] != x.shape[0]:
      raise ValueError(f"style has {s.shape[0]} rows but the batch has {x.shape[0]} examples; "
                       "give one code for the batch or one per example")
    # A spatially sharded array runs per shard where `sharded_reflect_conv` takes the layer.
    y = sharded_conv.sharded_reflect_conv(x, kernels, self.stride, self.pad, per_example)
    if y is None:
      y = per_example(ops.reflect_pad(x, self.pad), kernels, self.stride)
    return y + biases.reshape((biases.shape[0],) + (1,) * self.ndims + (self.features,))
