"""The CPU-tuned conv forms (`gemm_conv`) against XLA's convolution and its gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seq2seq_jax import host_memory
from seq2seq_jax.models import conv
from seq2seq_jax.models import gemm_conv
from seq2seq_jax.models import hyperconv

# (spatial, cin, cout, k, stride, ndims): one case per branch of `kernel_grad`, the shifted-GEMM
# forward (narrow outputs), and dims.
CASES = [
    (96, 32, 3, 7, 1, 2),    # narrow output: shifted-GEMM forward, dy shifted into GEMM columns
    (64, 64, 48, 3, 1, 2),   # wide: one GEMM per offset; row-stacked forward
    (127, 64, 64, 3, 2, 2),  # wide, strided, odd size
    (12, 3, 16, 7, 1, 2),    # few input channels: XLA's own, the narrow input gradient
    (8, 64, 64, 3, 1, 2),    # small layer: XLA's kernel gradient, row-stacked forward
    (9, 16, 24, 5, 1, 2),    # row-stacked forward, k = 5, odd size
]
# (kernel-gradient form, forward form) of each case (zero-padded to keep its size), with
# YNNPACK's convs (XLA CPU's default) and with Eigen's (`host_memory.eigen_cpu_convs`), where
# XLA's kernel gradient of a padded stride-1 conv takes the padding first ('prepadded').
FORMS = {"ynn": [("narrow", "narrow"), ("wide", "rows"), ("wide", "xla"), ("xla", "xla"),
                 ("xla", "rows"), ("xla", "rows")],
         "eigen": [("narrow", "narrow"), ("prepadded", "xla"), ("wide", "xla"),
                   ("prepadded", "xla"), ("prepadded", "xla"), ("prepadded", "xla")]}


@pytest.fixture(autouse=True)
def ynn_convs(monkeypatch):
  """The forms chosen for YNNPACK's convs unless a test says otherwise: they exercise the GEMM
  forms most, whatever XLA_FLAGS this process started with."""
  monkeypatch.setattr(host_memory, "eigen_cpu_convs", lambda: False)


@pytest.mark.parametrize("policy", ["ynn", "eigen"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_gradients_equal_xla(case, policy, monkeypatch):
  monkeypatch.setattr(gemm_conv, "MIN_ROWS_MACS", 0)  # the row-stacked forward on small layers too
  monkeypatch.setattr(host_memory, "eigen_cpu_convs", lambda: policy == "eigen")
  grad_form, fwd_form = FORMS[policy][CASES.index(case)]
  x_shape = (2,) + (case[0],) * case[5] + (case[1],)
  k_shape = (case[3],) * case[5] + case[1:3]
  pads = (((case[3] - 1) // 2, (case[3] - 1) // 2),) * case[5]
  assert gemm_conv.grad_form(x_shape, k_shape, case[4], pads=pads) == grad_form
  if grad_form == "prepadded":  # XLA's own without padding
    assert gemm_conv.grad_form(x_shape, k_shape, case[4]) == "xla"
  assert gemm_conv.forward_form(x_shape, k_shape, case[4]) == fwd_form
  few_inputs = case == (12, 3, 16, 7, 1, 2)  # the one case whose input gradient is narrow
  assert gemm_conv.input_grad_form(x_shape, k_shape, case[4]) == (
      "narrow" if few_inputs else "xla")
  n, cin, cout, k, stride, ndims = case
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2,) + (n,) * ndims + (cin,)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k,) * ndims + (cin, cout)) * 0.1, jnp.float32)
  y_ref, vjp_ref = jax.vjp(lambda a, b: conv._xla_conv(a, b, stride, pads), x, w)
  y, vjp = jax.vjp(lambda a, b: conv.conv_nd(a, b, stride, pads), x, w)
  dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
  if fwd_form != "xla":  # the same products summed in another order
    np.testing.assert_allclose(y, y_ref, atol=1e-5 * float(jnp.abs(y_ref).max()), rtol=0)
  else:
    np.testing.assert_array_equal(y, y_ref)
  for got, want in zip(vjp(dy), vjp_ref(dy)):
    scale = float(jnp.abs(want).max())
    # float32 sums of up to 8k products in another order: ~1e-6 of the largest value.
    np.testing.assert_allclose(got, want, atol=1e-5 * scale, rtol=0)


@pytest.mark.parametrize("ndims", [2, 3])
def test_patches_kernel_gradient_equals_xla(ndims, monkeypatch):
  """The tiled patches kernel gradient (few inputs, many rows) against XLA's, in 2D (tiles of
  rows, odd size) and 3D (the depth-folded first conv, 1 input channel, k = 5)."""
  monkeypatch.setattr(gemm_conv, "PATCHES_TO_TILE", 0)
  monkeypatch.setattr(gemm_conv, "PATCH_TILE_BYTES", 1 << 14)  # several tiles, not one
  rng = np.random.default_rng(3)
  if ndims == 2:
    x_shape, k_shape, pads = (2, 21, 13, 3), (5, 5, 3, 8), ((2, 2), (1, 3))
    assert gemm_conv.grad_form((2, 25, 17, 3), k_shape, 1) == "patches"
  else:
    x_shape, k_shape, pads = (1, 10, 12, 9, 1), (5, 5, 5, 1, 6), ((2, 2),) * 3
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  w = jnp.asarray(rng.standard_normal(k_shape) * 0.1, jnp.float32)
  y_ref, vjp_ref = jax.vjp(lambda a, b: conv._xla_conv(a, b, 1, pads), x, w)
  y, vjp = jax.vjp(lambda a, b: conv.conv_nd(a, b, 1, pads), x, w)
  np.testing.assert_allclose(y, y_ref, atol=1e-5 * float(jnp.abs(y_ref).max()), rtol=0)
  dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
  for got, want in zip(vjp(dy), vjp_ref(dy)):
    np.testing.assert_allclose(got, want, atol=1e-5 * float(jnp.abs(want).max()), rtol=0)


@pytest.mark.parametrize("tile_rows", [5, 66])
def test_narrow_kernel_gradient_in_row_tiles_equals_xla(tile_rows, monkeypatch):
  """The narrow kernel gradient over tiles of the padded input's rows against XLA's: 66 rows
  as 13 tiles of 5 and a last tile of 1, and as one tile."""
  rng = np.random.default_rng(4)
  x_shape, k_shape, pads = (2, 64, 64, 32), (3, 3, 32, 3), ((1, 1), (1, 1))
  assert gemm_conv.grad_form(x_shape, k_shape, 1) == "narrow"
  row_bytes = 2 * 66 * 9 * 3 * 4  # one row of the shifted dy columns
  monkeypatch.setattr(gemm_conv, "PATCH_TILE_BYTES", tile_rows * row_bytes + row_bytes // 2)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  w = jnp.asarray(rng.standard_normal(k_shape) * 0.1, jnp.float32)
  _, vjp_ref = jax.vjp(lambda a, b: conv._xla_conv(a, b, 1, pads), x, w)
  y, vjp = jax.vjp(lambda a, b: conv.conv_nd(a, b, 1, pads), x, w)
  dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
  for got, want in zip(vjp(dy), vjp_ref(dy)):
    np.testing.assert_allclose(got, want, atol=1e-5 * float(jnp.abs(want).max()), rtol=0)
  with gemm_conv.loops(False):  # one GEMM over the whole frame (the backward is traced here)
    whole = jax.vjp(lambda a, b: conv.conv_nd(a, b, 1, pads), x, w)[1](dy)[1]
  np.testing.assert_allclose(vjp(dy)[1], whole,
                             atol=1e-5 * float(jnp.abs(vjp_ref(dy)[1]).max()), rtol=0)


def test_kernel_grad_form_policy():
  """Patches for brats3d's first conv (1 → 16, k = 5, folded: 5 stacked inputs over 64³ rows),
  XLA's for brats2d's (3 → 64, 7×7 at 192²), where its packing is small and it is faster;
  wide for brats2d's 256→128 decoder conv at 96²."""
  assert gemm_conv.grad_form((64, 68, 68, 5), (5, 5, 5, 16), 1) == "patches"
  assert gemm_conv.grad_form((1, 198, 198, 3), (7, 7, 3, 64), 1) == "xla"
  # brats2d's 256→128 decoder conv at 96²: narrow was 1.6× faster alone but made the whole
  # step slower (experiments/README.md, "twenty-second session").
  assert gemm_conv.grad_form((1, 98, 98, 256), (3, 3, 256, 128), 1) == "wide"


def test_forward_form_policy():
  """The row-stacked forward where XLA's conv is slow (brats2d's latent, 96² and 192² layers,
  the folded 3D latent convs), XLA's on the toy model's small layers."""
  form = lambda x, k: gemm_conv.forward_form(x, k, 1)
  assert form((1, 50, 50, 256), (3, 3, 256, 256)) == "rows"
  assert form((1, 98, 98, 256), (3, 3, 256, 128)) == "rows"
  assert form((16, 18, 18, 192), (3, 3, 192, 64)) == "rows"
  assert form((1, 194, 194, 128), (3, 3, 128, 64)) == "rows"
  assert form((8, 34, 34, 32), (3, 3, 32, 32)) == "xla"
  assert form((1, 198, 198, 3), (7, 7, 3, 64)) == "xla"
  assert form((1, 198, 198, 64), (7, 7, 64, 3)) == "narrow"


def test_eigen_form_policy(monkeypatch):
  """With Eigen's convs, XLA's conv and kernel gradient on every layer where they were faster
  with both gradients (jitted alone, `experiments/README.md`, "twenty-seventh session"):
  brats2d's 48², 96² and 192² layers (e.g. 256→256 at 48²: 27.6 against 34.7 ms as rows and
  wide), the folded 3D latent and decoder convs; the narrow forms on the narrowest outputs
  (brats2d's 64→3 7×7: 30.3 against 46.0 ms; the folded 5×5×5 16→1), the narrow kernel
  gradient over 16k rows only (toy's 32→3 at 8 × 32²: XLA's, 6.3 against 11.9 ms); 'wide' on
  strided layers, 'patches' on brats3d's first conv."""
  def forms(x, k, stride=1):
    return (gemm_conv.grad_form(x, k, stride, eigen=True),
            gemm_conv.forward_form(x, k, stride, eigen=True))
  assert forms((1, 50, 50, 256), (3, 3, 256, 256)) == ("xla", "xla")
  assert forms((1, 48, 48, 256), (3, 3, 256, 768)) == ("xla", "xla")
  assert forms((1, 98, 98, 256), (3, 3, 256, 128)) == ("xla", "xla")
  assert forms((1, 194, 194, 128), (3, 3, 128, 64)) == ("xla", "xla")
  assert forms((16, 34, 34, 192), (3, 3, 192, 32)) == ("xla", "xla")
  assert forms((16, 18, 18, 192), (3, 3, 192, 64)) == ("xla", "xla")
  assert forms((1, 198, 198, 64), (7, 7, 64, 3)) == ("narrow", "narrow")
  assert forms((4, 68, 68, 80), (5, 5, 80, 1)) == ("narrow", "narrow")
  assert forms((8, 38, 38, 32), (7, 7, 32, 3)) == ("xla", "narrow")
  assert forms((1, 98, 98, 128), (3, 3, 128, 256), 2) == ("wide", "xla")
  assert forms((64, 68, 68, 5), (5, 5, 5, 16)) == ("patches", "xla")
  assert forms((1, 198, 198, 3), (7, 7, 3, 64)) == ("xla", "xla")
  # XLA's kernel gradient with the padding taken first where the conv pads with zeros (the
  # ConvLSTM's 256→768 at 48², `grad_form`'s figures); strided convs keep theirs.
  one = ((1, 1), (1, 1))
  assert gemm_conv.grad_form((1, 48, 48, 256), (3, 3, 256, 768), 1, True, one) == "prepadded"
  assert gemm_conv.grad_form((1, 48, 48, 256), (3, 3, 256, 768), 1, False, one) == "wide"
  assert gemm_conv.grad_form((1, 96, 96, 64), (3, 3, 64, 64), 2, True, one) == "xla"
  # The input gradient: narrow where it outputs few channels (the first convs, 1-3 → 32-64
  # at 7×7: 14 against 21 ms on brats2d's), XLA's elsewhere (brats3d's folded 5→16 at 5×5).
  assert gemm_conv.input_grad_form((1, 198, 198, 3), (7, 7, 3, 64), 1) == "narrow"
  assert gemm_conv.input_grad_form((8, 38, 38, 3), (7, 7, 3, 32), 1) == "narrow"
  assert gemm_conv.input_grad_form((64, 68, 68, 5), (5, 5, 5, 16), 1) == "xla"
  assert gemm_conv.input_grad_form((1, 50, 50, 256), (3, 3, 256, 256), 1) == "xla"
  assert gemm_conv.input_grad_form((1, 198, 198, 3), (7, 7, 3, 64), 2) == "xla"
  # Unchanged with Eigen's convs: bf16 on AMX (`conv.conv_nd` asks for the YNNPACK forms)
  # and the per-example narrow form, whose alternative is the patches form, not XLA's conv.
  monkeypatch.setattr(host_memory, "eigen_cpu_convs", lambda: True)
  assert gemm_conv.forward_form((1, 98, 98, 256), (3, 3, 256, 32), 1) == "xla"
  assert hyperconv.per_example_narrow((1, 98, 98, 256), (3, 3, 256, 32), 1)


def test_eigen_cpu_convs_follows_xla_flags(monkeypatch):
  monkeypatch.undo()  # the real reader, not this file's default
  for flags, want in [("", False),
                      ("--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce", True),
                      ("--xla_cpu_experimental_ynn_fusion_type=individual_convolution", False),
                      ("--xla_force_host_platform_device_count=4 "
                       "--xla_cpu_experimental_ynn_fusion_type= --foo", True)]:
    monkeypatch.setenv("XLA_FLAGS", flags)
    assert host_memory.eigen_cpu_convs() is want, flags
    assert (gemm_conv.forward_form((1, 50, 50, 256), (3, 3, 256, 256), 1) == "xla") is want


@pytest.mark.parametrize("batch,form", [(2, "wide"), (4, "narrow")])
def test_bf16_kernel_gradient_dtype_and_value(batch, form):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((batch, 64, 64, 64)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((3, 3, 64, 48)) * 0.1, jnp.float32)
  assert gemm_conv.grad_form(x.shape, w.shape, 1) == form
  f = lambda w, op: jnp.sum(op(x, w.astype(jnp.bfloat16)).astype(jnp.float32) ** 2)
  g = jax.grad(f)(w, lambda a, b: conv.conv_nd(a, b, 1, ((1, 1), (1, 1))))
  g_ref = jax.grad(f)(w, lambda a, b: conv._xla_conv(a, b, 1, ((1, 1), (1, 1))))
  assert g.dtype == jnp.float32
  np.testing.assert_allclose(g, g_ref, rtol=0, atol=0.02 * float(jnp.abs(g_ref).max()))


@pytest.mark.parametrize("k", [3, 5])
def test_flat_kernel_gradient_equals_xla(k):
  """Two images and a non-square frame: pairs that wrap into the next row or image cancel."""
  rng = np.random.default_rng(2)
  pads = ((1, 1), (0, 2))
  x = jnp.asarray(rng.standard_normal((2, 33, 30, 48)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, k, 48, 40)) * 0.1, jnp.float32)
  y, vjp = jax.vjp(lambda b: conv._xla_conv(x, b, 1, pads), w)
  dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
  want = vjp(dy)[0]
  got = gemm_conv.kernel_grad(x, dy, w, 1, pads, "flat_t")
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("form,k,cin,cout", [("rows", 3, 24, 40), ("narrow", 7, 3, 16),
                                              ("narrow", 5, 2, 40)])
def test_input_gradient_forms_equal_xla(form, k, cin, cout):
  """Asymmetric pads and a non-square frame, so the crop of the full conv is checked."""
  rng = np.random.default_rng(3)
  pads = ((1, 2), (0, 1))
  x = jnp.asarray(rng.standard_normal((2, 21, 23, cin)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, k, cin, cout)) * 0.1, jnp.float32)
  y, vjp = jax.vjp(lambda a: conv._xla_conv(a, w, 1, pads), x)
  dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
  want = vjp(dy)[0]
  got = gemm_conv.input_grad(dy, w, pads, form)
  assert got.shape == x.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(jnp.abs(want).max()))


def test_amx_forms_policy_and_bf16_gradients(monkeypatch):
  """On an AMX CPU (forced here): brats2d's 48², 96² and 192² convs take the AMX forms
  (`flat_t` for wide and narrow kernel gradients alike), strided convs, few-channel convs and
  small layers keep theirs; the bf16 gradients through them agree with XLA's on the same bf16
  values."""
  monkeypatch.setattr(gemm_conv, "amx_bf16", lambda: True)
  forms = gemm_conv.amx_forms
  assert forms((1, 48, 48, 256), (3, 3, 256, 256), 1, "wide") == ("rows", "flat_t")
  assert forms((1, 98, 98, 256), (3, 3, 256, 128), 1, "wide") == ("rows", "flat_t")
  assert forms((1, 194, 194, 128), (3, 3, 128, 64), 1, "narrow") == ("rows", "flat_t")
  assert forms((1, 198, 198, 64), (7, 7, 64, 3), 1, "narrow") == ("xla", "narrow")
  assert forms((1, 48, 48, 64), (3, 3, 64, 32), 2, "wide") == ("xla", "wide")
  assert forms((8, 16, 16, 32), (3, 3, 32, 32), 1, "xla") == ("xla", "xla")
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((1, 32, 32, 128)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((3, 3, 128, 128)) * 0.05, jnp.bfloat16)
  assert forms(x.shape, w.shape, 1, gemm_conv.grad_form(x.shape, w.shape, 1)) == ("rows",
                                                                                 "flat_t")
  f = lambda op, a, b: jnp.sum(op(a, b).astype(jnp.float32) ** 2)
  got = jax.grad(lambda a, b: f(lambda u, v: conv.conv_nd(u, v, 1, ((1, 1), (1, 1))), a, b),
                 (0, 1))(x, w)
  x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
  want = jax.grad(lambda a, b: f(lambda u, v: conv._xla_conv(u, v, 1, ((1, 1), (1, 1))), a, b),
                  (0, 1))(x32, w32)
  for g, r in zip(got, want):
    assert g.dtype == jnp.bfloat16
    # bf16 outputs and cotangents (8-bit mantissas): within 1% relative L2 of float32's.
    assert float(jnp.linalg.norm(g.astype(jnp.float32) - r) / jnp.linalg.norm(r)) < 0.01


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_shifted_gemm_conv_matches_xla_with_padding(dtype):
  """Asymmetric zero pads and a non-square image, in float32 and bf16 (f32 accumulation)."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((3, 21, 34, 24)), dtype)
  w = jnp.asarray(rng.standard_normal((5, 5, 24, 2)) * 0.1, dtype)
  pads = ((1, 3), (2, 0))
  y = gemm_conv.shifted_gemm_conv(x, w, pads)
  y_ref = conv._xla_conv(x.astype(jnp.float32), w.astype(jnp.float32), 1, pads)
  assert y.dtype == dtype and y.shape == y_ref.shape
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(np.asarray(y, np.float32), y_ref,
                             atol=tol * float(jnp.abs(y_ref).max()), rtol=0)


@pytest.mark.parametrize("x_shape,kernel_shape", [
    ((3, 22, 19, 16), (5, 5, 16, 3)), ((2, 9, 8, 7, 16), (3, 3, 3, 16, 8))], ids=["2d", "3d"])
def test_per_example_narrow_conv_matches_the_patches_form(x_shape, kernel_shape):
  """Forward and both gradients against autodiff of `hyperconv.per_example_conv`."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  kernels = jnp.asarray(rng.standard_normal((x_shape[0],) + kernel_shape) * 0.1, jnp.float32)
  assert hyperconv.per_example_narrow(x.shape, kernels.shape[1:], 1)
  y_ref, vjp_ref = jax.vjp(lambda a, w: hyperconv.per_example_conv(a, w, 1), x, kernels)
  y, vjp = jax.vjp(hyperconv.per_example_narrow_conv, x, kernels)
  np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-5 * float(jnp.abs(y_ref).max()))
  dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
  for got, want in zip(vjp(dy), vjp_ref(dy)):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(jnp.abs(want).max()))


def test_per_example_narrow_policy_on_dce4d_decoder():
  """3D per-example convs narrow by at least half take the narrow form at stride 1 (dce4d's
  32→16, 16→8 and 8→1 decoder convs), not same-width or strided ones; 2D follows
  `forward_form`."""
  assert hyperconv.per_example_narrow((2, 18, 18, 18, 32), (3, 3, 3, 32, 16), 1)
  assert hyperconv.per_example_narrow((2, 34, 34, 34, 16), (3, 3, 3, 16, 8), 1)
  assert hyperconv.per_example_narrow((2, 34, 34, 34, 8), (3, 3, 3, 8, 1), 1)
  assert not hyperconv.per_example_narrow((2, 10, 10, 10, 32), (3, 3, 3, 32, 32), 1)
  assert not hyperconv.per_example_narrow((2, 34, 34, 34, 16), (3, 3, 3, 16, 8), 2)
  assert not hyperconv.per_example_narrow((2, 10, 10, 10, 64), (5, 5, 5, 64, 32), 1)
  assert hyperconv.per_example_narrow((3, 22, 19, 16), (5, 5, 16, 3), 1)
  assert not hyperconv.per_example_narrow((3, 22, 19, 16), (3, 3, 16, 16), 1)


def test_loops_off_gives_the_same_conv_without_loops():
  """`gemm_conv.loops(False)` (the benchmark's FLOP count) runs the tiled row-stacked forward and
  the depth-chunked 3D conv as single ops: no loop in the trace, the same values."""
  from seq2seq_jax.models import conv3d
  rng = np.random.default_rng(6)
  x2 = jnp.asarray(rng.standard_normal((1, 66, 66, 64)), jnp.float32)
  w2 = jnp.asarray(rng.standard_normal((3, 3, 64, 64)) * 0.05, jnp.float32)
  x3 = jnp.asarray(rng.standard_normal((1, 66, 66, 66, 32)), jnp.float32)
  w3 = jnp.asarray(rng.standard_normal((3, 3, 3, 32, 16)) * 0.05, jnp.float32)
  assert gemm_conv.forward_form(x2.shape, w2.shape, 1) == "rows"
  assert conv3d.chunk_size(x3.shape, w3.shape, 1, ((0, 0),) * 3) is not None
  for x, w in ((x2, w2), (x3, w3)):
    looped = jax.jit(lambda a, b: conv.conv_nd(a, b))
    assert "while" in looped.lower(x, w).as_text()
    with gemm_conv.loops(False):
      plain = jax.jit(lambda a, b: conv.conv_nd(a, b))  # a new function: traces are cached
      assert "while" not in plain.lower(x, w).as_text()
      want = plain(x, w)
    np.testing.assert_allclose(looped(x, w), want, rtol=0,
                               atol=1e-5 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("count", [1, 3])
def test_map_concat_and_map_sum_equal_concatenate_and_sum(count):
  x = jnp.asarray(np.random.default_rng(7).standard_normal((2, 4, 5)), jnp.float32)
  fn = lambda i: jnp.sin(x * (i + 1.0))
  parts = [fn(i) for i in range(count)]
  for axis in (0, 1):
    got = jax.jit(lambda: gemm_conv.map_concat(fn, count, axis, like=x))()
    np.testing.assert_allclose(got, jnp.concatenate(parts, axis), rtol=0, atol=1e-6)
  np.testing.assert_allclose(jax.jit(lambda: gemm_conv.map_sum(fn, count, like=x))(), sum(parts),
                             rtol=0, atol=1e-6)
