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
from seq2seq_jax.models import upsample_conv
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


def is_hyperconv(tree: Any) -> bool:
  """Whether a params subtree is a HyperConv's: a bank `param` beside an `fc` Dense."""
  return isinstance(tree, Mapping) and "param" in tree and "fc" in tree


def map_hyperconvs(fn: Callable[..., Any], params: Any, *trees: Any) -> Any:
  """`fn(hyperconv_params, *the same paths of trees)` at every HyperConv of `params`, as a
  tree of those paths only (`{'decoder': {'res_0': {'conv1': fn(...)}, ...}}`)."""
  out = {}
  for name, sub in params.items():
    if is_hyperconv(sub):
      out[name] = fn(sub, *(t.get(name, {}) for t in trees))
    elif isinstance(sub, Mapping):
      inner = map_hyperconvs(fn, sub, *(t.get(name, {}) for t in trees))
      if inner:
        out[name] = inner
  return out


def norm_probes(params: Any) -> Any:
  """Zero probes for every HyperConv in `params`, as the `NORM_PROBES` collection:
  `{..., 'conv1': {'param': 0.0}}`.

  Passed to `apply` beside the params, the gradient of each probe is the summed norm of its
  bank's gradient over the step's uses (`bank_kernels`); without them nothing changes.
  """
  return map_hyperconvs(lambda _: {"param": jnp.zeros((), jnp.float32)}, params)


# The collection that hands a HyperConv kernels built beforehand (`code_kernels`, for all of a
# step's codes at once): `{'kernels': [n, *k, in, out], 'biases': [n, out]}` at its path.
KERNELS = "kernels"


@jax.custom_vjp
def bank_kernels(bank: jnp.ndarray, w: jnp.ndarray, probe: jnp.ndarray) -> jnp.ndarray:
  """The flat kernels of n codes, `w` `[n, c_w]` @ `bank`ᵀ (`bank` `[m, c_w]`) → `[n, m]`;
  `probe` (a zero scalar) gets as its cotangent the Frobenius norm of the bank's gradient.

  The backward is written out for XLA CPU:
  - the bank's gradient Σ_i dK[i] ⊗ w[i] as n broadcast products, which XLA fuses into
    Adam's passes over the bank, so that it is never written out. Left to autodiff it is a
    dot with n contracted, which XLA CPU runs as a library GEMM for n > 1 and writes out in
    full (brats2d: 3.87 against 3.42 s a step for n = 2).
  - its norm from the factors, sqrt(Σ_ij (dK dKᵀ)_ij (w wᵀ)_ij), a read of dK only, where
    the norm of the gradient itself would be a pass over all of it (which XLA CPU also has
    to write out for its reduce). A module used by several renders a step sums its uses'
    norms: by the triangle inequality that sum bounds the norm of the summed gradient, so a
    finite-gradient guard built on it (`train_step`) stays sound; it is exact for one use.
  - w's gradient dK @ bank as Eigen's dot on an [m, n] copy of dK: on dK as it arrives,
    [n, m], XLA CPU hands the product to YNNPACK, 8-100 ms a brats2d bank against 3 ms.
  """
  del probe
  return _product(bank, w)


def _product(bank, w):
  # As the bank's GEMV/GEMM `[m, n]`, then transposed (for one code a reshape): as w @ bankᵀ
  # XLA CPU ran one code 20-30% slower (`/work/w33/n1.py`: 12 brats2d banks 35-38 ms
  # against 29); two codes level.
  return (bank @ w.T).T


def _bank_fwd(bank, w, probe):
  return _product(bank, w), (bank, w, probe)


def _bank_bwd(res, dk):
  bank, w, probe = res
  if w.shape[0] <= 8:
    dbank = dk[0][:, None] * w[0]
    for i in range(1, w.shape[0]):
      dbank = dbank + dk[i][:, None] * w[i]
  else:
    dbank = dk.T @ w
  # The barrier keeps XLA from folding the transpose back into the dot.
  dw = jax.lax.optimization_barrier(dk.T).T @ bank
  dk32, w32 = dk.astype(jnp.float32), w.astype(jnp.float32)
  sq = jnp.sum((dk32 @ dk32.T) * (w32 @ w32.T))
  # max(·, 0) against rounding below zero; NaN and inf pass through it (jnp.maximum keeps NaN).
  norm = jnp.sqrt(jnp.maximum(sq, 0.0)).astype(probe.dtype)
  return dbank.astype(bank.dtype), dw.astype(w.dtype), norm


bank_kernels.defvjp(_bank_fwd, _bank_bwd)


def kernels_from_weights(param: jnp.ndarray, b: jnp.ndarray, w: jnp.ndarray, wb: jnp.ndarray,
                         probe: jnp.ndarray | None = None):
  """A HyperConv's kernels `[n, *k, in, out]` and biases `[n, out]` for the basis weights
  `w`, `wb` `[n, c_w]` of n codes: the bank `param` `[*k, in, out, c_w]` times `w`, `b`
  `[out, c_w]` times `wb`. With a `probe` (a zero scalar), its cotangent is the norm of the
  bank's gradient through these kernels (`bank_kernels`)."""
  if probe is None:
    probe = jnp.zeros((), jnp.float32)
  # One GEMM for the n codes on the bank's own [k^d·in·out, c_w] layout, which XLA CPU reads
  # once (as one GEMV per code it read it n times).
  flat = bank_kernels(param.reshape(-1, param.shape[-1]), w, probe)
  return flat.reshape((w.shape[0],) + param.shape[:-1]), wb @ b.T


def code_kernels(params: Mapping[str, Any], s: jnp.ndarray, probe: jnp.ndarray | None = None):
  """`kernels_from_weights` from a HyperConv's params and the style rows `s` `[n, c_s]`: the
  same ops as the module, for building one layer's kernels for several codes at once."""
  dense = lambda d: s @ d["kernel"] + d["bias"]
  kernels, biases = kernels_from_weights(params["param"], params["b"], dense(params["fc"]),
                                         dense(params["fc_bias"]), probe)
  return {"kernels": kernels, "biases": biases}


def take_codes(kernels: Any, start: int, stop: int) -> Any:
  """The `KERNELS` collection of rows `start:stop` (codes) of one built for several."""
  return jax.tree_util.tree_map(lambda a: a[start:stop], kernels)


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
      inside the module, so that `nn.remat(HyperConv)` recomputes them too. `pre` =
      `ops.upsample2x` before a shared kernel may be folded into the conv
      (`upsample_conv.wanted`: large 3×3(×3) layers on the CPU).
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
    # ×2 upsampling before a shared 3×3 kernel may be folded into the conv (`_conv`).
    upsample = self.pre is ops.upsample2x
    if self.pre is not None and not upsample:
      x = self.pre(x)
    y = conv.conv_output(self._conv(x, s, upsample))
    return y if self.post is None else self.post(y)

  def _conv(self, x: jnp.ndarray, s: jnp.ndarray, upsample: bool = False) -> jnp.ndarray:
    """The conv of `x` (upsampled first if `upsample`) with this layer's kernels."""
    in_features = x.shape[-1]
    kshape = (self.kernel_size,) * self.ndims + (in_features, self.features, self.c_w)
    param = self.param("param", hyper_param_init, kshape, jnp.float32)
    b = self.param("b", zeros, (self.features, self.c_w), jnp.float32)
    if self.has_variable(KERNELS, "kernels"):
      kernels, biases = self._built_kernels(kshape[:-1], s.shape[0])
    else:
      w = nn.Dense(self.c_w, kernel_init=linear_init, bias_init=zeros, name="fc")(s)
      wb = nn.Dense(self.c_w, kernel_init=linear_init, bias_init=zeros, name="fc_bias")(s)
      probe = (self.get_variable(NORM_PROBES, "param")
               if self.has_variable(NORM_PROBES, "param") else None)
      kernels, biases = kernels_from_weights(param, b, w, wb, probe)
    x = x.astype(self.dtype)
    kernels = checkpoint_name(kernels.astype(self.dtype), conv.HYPER_KERNELS)
    biases = checkpoint_name(biases.astype(self.dtype), conv.HYPER_KERNELS)
    if upsample:
      if kernels.shape[0] == 1 and upsample_conv.wanted(x.shape, kernels.shape[1:],
                                                        self.stride, self.pad):
        return upsample_conv.upsampled_reflect_conv(x, kernels[0]) + biases[0]
      x = ops.upsample2x(x)
    if kernels.shape[0] == 1:
      return conv.reflect_conv(x, kernels[0], self.stride, self.pad) + biases[0]
    if kernels.shape[0] != x.shape[0]:
      raise ValueError(f"style has {s.shape[0]} rows but the batch has {x.shape[0]} examples; "
                       "give one code for the batch or one per example")
    # A spatially sharded array runs per shard where `sharded_reflect_conv` takes the layer.
    y = sharded_conv.sharded_reflect_conv(x, kernels, self.stride, self.pad, per_example)
    if y is None:
      y = per_example(ops.reflect_pad(x, self.pad), kernels, self.stride)
    return y + biases.reshape((biases.shape[0],) + (1,) * self.ndims + (self.features,))

  def _built_kernels(self, kshape, rows: int):
    """The `KERNELS` collection's kernels and biases, one per row of the style (`rows`): a
    collection built per code is repeated as the decoder repeats the style rows over the
    output frames (`Generator.render`)."""
    kernels = self.get_variable(KERNELS, "kernels")
    biases = self.get_variable(KERNELS, "biases")
    n = kernels.shape[0]
    if kernels.shape[1:] != tuple(kshape) or biases.shape != (n, self.features):
      raise ValueError(f"{self.path}: built kernels {kernels.shape} / biases {biases.shape} do "
                       f"not fit this layer's [n, {', '.join(map(str, kshape))}] / "
                       f"[n, {self.features}]")
    if rows != n:
      if n == 1 or rows % n:
        raise ValueError(f"{self.path}: kernels built for {n} codes, the style has {rows} rows")
      kernels, biases = jnp.repeat(kernels, rows // n, 0), jnp.repeat(biases, rows // n, 0)
    return kernels, biases
