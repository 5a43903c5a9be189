"""conv_nd on 3D volumes (depth-folded, chunked), per spatial shard, and in XLA's own forms,
against XLA's convolution and its gradients (the 2D GEMM forms: gemm_conv_test.py)."""

import re

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from seq2seq_jax import sharding
from seq2seq_jax.models import conv
from seq2seq_jax.models import gemm_conv
from seq2seq_jax.models import ops
from seq2seq_jax.models import sharded_conv

# 3D (spatial, cin, cout, k, stride, zero pads): stride 1 folds the depth offsets into the 2D
# conv's inputs, stride 2 into its outputs (per residue); odd sizes, one input or output
# channel (the models' first and last convs), a 1×1×1 kernel, asymmetric pads.
CASES_3D = [
    ((9, 10, 11), 3, 5, 3, 1, ((1, 1), (0, 2), (1, 0))),
    ((12, 10, 8), 4, 6, 3, 2, ((1, 1), (1, 1), (1, 1))),
    ((11, 9, 10), 2, 3, 5, 2, ((0, 0), (0, 0), (0, 0))),
    ((7, 8, 9), 3, 4, 1, 2, ((0, 0), (0, 0), (0, 0))),
    ((10, 10, 10), 1, 16, 5, 1, ((2, 2), (2, 2), (2, 2))),
    ((12, 12, 12), 16, 1, 5, 1, ((0, 0), (0, 0), (0, 0))),
    ((14, 14, 14), 32, 64, 3, 2, ((0, 0), (0, 0), (0, 0))),
]


@pytest.mark.parametrize("case", CASES_3D, ids=lambda c: "x".join(map(str, c[:5])))
def test_3d_depth_folded_conv_equals_xla(case):
  """Forward and both gradients of the depth-folded 3D conv against XLA's 3D convolution."""
  spatial, cin, cout, k, stride, pads = case
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((2,) + spatial + (cin,)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k,) * 3 + (cin, cout)) * 0.1, jnp.float32)
  y_ref, vjp_ref = jax.vjp(lambda a, b: conv._xla_conv(a, b, stride, pads), x, w)
  y, vjp = jax.vjp(lambda a, b: conv.conv_nd(a, b, stride, pads), x, w)
  assert y.shape == y_ref.shape
  np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-5 * float(jnp.abs(y_ref).max()))
  dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
  for got, want in zip(vjp(dy), vjp_ref(dy)):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("case", [c for c in CASES_3D if c[4] == 1],
                         ids=lambda c: "x".join(map(str, c[:5])))
@pytest.mark.parametrize("smallest", [True, False], ids=["chunk1", "chunk2+"])
def test_3d_depth_chunked_conv_equals_xla(case, smallest, monkeypatch):
  """The chunked path (a loop over output depth, its own VJP) on every stride-1 case, with
  chunks of one slice and of the smallest divisor above one (below k - 1 for the k = 5
  cases, so that a chunk's input gradient spills over more than the next chunk)."""
  from seq2seq_jax.models import conv3d
  spatial, cin, cout, k, stride, pads = case
  out_depth, out_h, out_w = (n + lo + hi - k + 1 for n, (lo, hi) in zip(spatial, pads))
  chunk = 1 if smallest else min(c for c in range(2, out_depth + 1) if out_depth % c == 0)
  monkeypatch.setattr(conv3d, "STACK_BYTES_TO_CHUNK", 0)
  monkeypatch.setattr(conv3d, "MIN_CHUNK_ROWS", chunk * 2 * out_h * out_w)
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((2,) + spatial + (cin,)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k,) * 3 + (cin, cout)) * 0.1, jnp.float32)
  f = lambda a, b: conv.conv_nd(a, b, stride, pads)
  if chunk == out_depth:
    pytest.skip("one chunk is the whole volume")
  assert conv3d.chunk_size(x.shape, w.shape, stride, pads) == chunk
  assert "scan" in str(jax.make_jaxpr(f)(x, w))  # the loop over chunks
  # Called directly on a depth-sharded volume (not through `reflect_conv`): XLA's 3D conv.
  with sharded_conv.spatial_sharding(sharding.make_mesh({"data": 1, "spatial": 2})):
    off = jax.make_jaxpr(lambda a, b: f(a, b))(x, w)  # a new function: traces are cached
    convs = [e for e in off.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    assert "scan" not in str(off) and [e.invars[0].aval.ndim for e in convs] == [5]  # XLA 3D
  y_ref, vjp_ref = jax.vjp(lambda a, b: conv._xla_conv(a, b, stride, pads), x, w)
  y, vjp = jax.vjp(f, x, w)
  np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-5 * float(jnp.abs(y_ref).max()))
  dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
  for got, want in zip(vjp(dy), vjp_ref(dy)):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(jnp.abs(want).max()))


# (batch, depth, frame, cin, cout, k, mesh): a halo of 1 and of 2 slices, slabs of 2 slices
# (each shard's border slices are all halo), the batch on the data axis too, and slabs no
# thicker than the halo (1 slice for a halo of 1, 2 for 2: the gathered window).
SHARDED_CASES = [
    (1, 16, 12, 8, 4, 3, {"data": 1, "spatial": 4}),
    (2, 16, 10, 4, 3, 5, {"data": 1, "spatial": 4}),
    (1, 8, 12, 8, 8, 3, {"data": 1, "spatial": 4}),
    (2, 12, 9, 6, 5, 3, {"data": 2, "spatial": 2}),
    (1, 4, 10, 4, 3, 3, {"data": 1, "spatial": 4}),
    (2, 8, 9, 3, 2, 5, {"data": 1, "spatial": 4}),
    (2, 4, 9, 3, 2, 5, {"data": 2, "spatial": 2}),
]


def _check_sharded_reflect_conv(f, x, w, mesh, mesh_cfg, stride, pad, rng):
  """`f(x, w)` with `x` split over `mesh` (batch on `data` where that axis is used, the first
  spatial axis on `spatial`): output and both gradients equal XLA's conv of the unsharded
  input reflect-padded by `jnp.pad`, to 1e-5 of each one's largest magnitude. Returns the
  output."""
  spec = P("data" if mesh_cfg["data"] > 1 else None, "spatial")
  y, vjp = jax.vjp(jax.jit(f), jax.device_put(x, NamedSharding(mesh, spec)), w)
  pads = ((0, 0),) + ((pad, pad),) * (x.ndim - 2) + ((0, 0),)
  y_ref, vjp_ref = jax.vjp(lambda a, c: conv._xla_conv(
      jnp.pad(a, pads, mode="reflect"), c, stride, ((0, 0),) * (x.ndim - 2)), x, w)
  np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-5 * float(jnp.abs(y_ref).max()))
  dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
  for got, want in zip(vjp(jax.device_put(dy, y.sharding)), vjp_ref(dy)):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(jnp.abs(want).max()))
  return y


@pytest.mark.parametrize("case", SHARDED_CASES, ids=lambda c: "x".join(map(str, c[:6])))
def test_3d_reflect_conv_per_depth_shard_equals_the_unsharded_conv(case, monkeypatch):
  """`reflect_conv` on a depth-sharded volume (per-shard halo exchange or, for slabs no
  thicker than the halo, a window of the gathered depth; reflected ends; each slab chunked):
  forward and both gradients equal XLA's 3D conv of the reflect-padded volume, and the
  output stays sharded."""
  from seq2seq_jax.models import conv3d
  b, depth, frame, cin, cout, k, mesh_cfg = case
  mesh = sharding.make_mesh(mesh_cfg)
  pad = k // 2
  monkeypatch.setattr(conv3d, "STACK_BYTES_TO_CHUNK", 0)  # every layer counts as large
  monkeypatch.setattr(conv3d, "MIN_CHUNK_ROWS", frame * frame)  # one-slice chunks
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.standard_normal((b, depth, frame, frame, cin)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k,) * 3 + (cin, cout)) * 0.1, jnp.float32)

  def f(a, c):
    with sharded_conv.spatial_sharding(mesh):
      return conv.reflect_conv(a, c, 1, pad)
  jaxpr = str(jax.make_jaxpr(f)(x, w))
  halo = "all_gather" if depth // mesh_cfg["spatial"] <= pad else "ppermute"
  assert "shard_map" in jaxpr and halo in jaxpr
  assert ("scan" in jaxpr) == (depth // mesh_cfg["spatial"] > 1)  # one-slice chunks
  y = _check_sharded_reflect_conv(f, x, w, mesh, mesh_cfg, 1, pad, rng)
  data = "data" if mesh_cfg["data"] > 1 else None
  assert y.sharding.spec[:2] == (data, "spatial"), y.sharding


def test_3d_reflect_conv_falls_back_where_the_shards_do_not_divide_the_depth(monkeypatch):
  """A depth of 6 over 4 shards has no equal slabs for `shard_map`: such a layer is left to
  GSPMD, still equal to the unsharded conv."""
  from seq2seq_jax.models import conv3d
  monkeypatch.setattr(conv3d, "STACK_BYTES_TO_CHUNK", 0)
  mesh = sharding.make_mesh({"data": 1, "spatial": 4})
  x = jnp.asarray(np.random.default_rng(7).standard_normal((1, 6, 6, 6, 3)), jnp.float32)
  w = jnp.asarray(np.random.default_rng(8).standard_normal((3, 3, 3, 3, 2)), jnp.float32)
  with sharded_conv.spatial_sharding(mesh):
    assert sharded_conv.sharded_reflect_conv(x, w, 1, 1) is None
    y = jax.jit(lambda a, c: conv.reflect_conv(a, c, 1, 1))(x, w)
  y_ref = conv._xla_conv(ops.reflect_pad(x, 1), w, 1, ((0, 0),) * 3)
  np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-5 * float(jnp.abs(y_ref).max()))


def test_3d_chunk_size_policy():
  """brats3d at 64³: the 32→16 and 16→1 decoder convs chunk (≥ 16k rows a chunk), the
  strided and small layers do not."""
  from seq2seq_jax.models import conv3d
  no_pad = ((0, 0),) * 3
  assert conv3d.chunk_size((1, 66, 66, 66, 32), (3, 3, 3, 32, 16), 1, no_pad) == 4
  assert conv3d.chunk_size((1, 68, 68, 68, 16), (5, 5, 5, 16, 1), 1, no_pad) == 4
  assert conv3d.chunk_size((1, 66, 66, 66, 16), (3, 3, 3, 16, 32), 2, no_pad) is None
  assert conv3d.chunk_size((1, 18, 18, 18, 64), (3, 3, 3, 64, 64), 1, no_pad) is None


def test_rejects_same_padding():
  with pytest.raises(ValueError, match="SAME"):
    conv.conv_nd(jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 1, 1)), padding="SAME")


def _loop_starts(closed_jaxpr, shapes) -> list[str]:
  """What makes the start of every loop carry of one of `shapes`, in `closed_jaxpr` and the
  jaxprs inside it: the producing primitive's name (or 'input')."""
  found = []

  def walk(jaxpr):
    producer = {v: e.primitive.name for e in jaxpr.eqns for v in e.outvars}
    for e in jaxpr.eqns:
      if e.primitive.name == "scan":
        if "num_consts" in e.params:
          lo, n = e.params["num_consts"], e.params["num_carry"]
        else:  # jax 0.11: `ft_in`, a flat tree of the (consts, carry, xs) operands
          consts, carry = e.params["ft_in"].elts[:2]
          lo, n = len(consts), len(carry)
        for v in e.invars[lo:lo + n]:
          if tuple(v.aval.shape) in shapes:
            found.append(producer.get(v, "input"))
      for p in e.params.values():
        for sub in p if isinstance(p, (tuple, list)) else (p,):
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            walk(sub.jaxpr)
          elif isinstance(sub, jax.extend.core.Jaxpr):
            walk(sub)
  walk(closed_jaxpr.jaxpr)
  return found


def test_chunked_3d_conv_loops_start_from_zeros_of_their_own(monkeypatch):
  """The chunked 3D conv's loops (forward output, backward dx) start from
  `gemm_conv.fresh_zeros` (a conditional), not from a zero broadcast: XLA merges equal
  broadcasts of all calls into one template that stays alive through the backward pass
  (brats3d at 96³: 260 MB at the step's peak). The check flags a `jnp.zeros` start."""
  from seq2seq_jax.models import conv3d
  monkeypatch.setattr(conv3d, "STACK_BYTES_TO_CHUNK", 0)
  monkeypatch.setattr(conv3d, "MIN_CHUNK_ROWS", 2 * 8 * 8)
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.standard_normal((1, 8, 8, 8, 4)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 3, 4, 2)) * 0.1, jnp.float32)
  pads = ((1, 1),) * 3
  assert conv3d.chunk_size(x.shape, w.shape, 1, pads) == 2
  loss = lambda a, b: jnp.sum(conv.conv_nd(a, b, 1, pads) ** 2)
  y_loop, dx_loop = (8, 8, 8, 2), (10, 1, 10, 10, 4)  # [depth·b, h, w, cout]; padded dx
  starts = _loop_starts(jax.make_jaxpr(jax.grad(loss, (0, 1)))(x, w), [y_loop, dx_loop])
  assert starts == ["cond", "cond"]
  plain = jax.make_jaxpr(lambda a: lax.scan(lambda c, i: (c + a[0, i], None),
                                            jnp.zeros(a.shape[2:]), jnp.arange(4)))(x)
  assert _loop_starts(plain, [(8, 8, 4)]) == ["broadcast_in_dim"]


# (x shape, kernel shape, stride): the CPU-tuned forms take each of these apart (row-stacked
# forward, shifted-GEMM forward and narrow kernel gradient, depth-folded 3D stride 1 and 2).
XLA_FORMS_CASES = [
    ((1, 66, 66, 64), (3, 3, 64, 64), 1),
    ((2, 40, 40, 32), (7, 7, 32, 3), 1),
    ((1, 10, 12, 14, 8), (3, 3, 3, 8, 6), 1),
    ((2, 11, 12, 10, 8), (3, 3, 3, 8, 16), 2),
]


def hlo_conv_ranks(stablehlo_text: str) -> list[int]:
  """The spatial rank of each convolution in lowered StableHLO: the digits of its input's
  dim numbers (e.g. [b, 0, 1, f] → 2)."""
  return [len(re.findall(r"\d", m)) for m in
          re.findall(r"stablehlo.convolution.*?dim_numbers = \[([^\]]*)\]", stablehlo_text)]


@pytest.mark.parametrize("case", XLA_FORMS_CASES, ids=lambda c: "x".join(map(str, c[1])))
def test_xla_forms_are_xla_own_convs_with_the_same_values(case, monkeypatch):
  """`conv.forms('xla')` (GPUs, TPUs): the conv and both gradients are XLA's own convolutions
  of the layer's rank, no GEMM, loop or custom gradient; the same values as the CPU-tuned
  forms (as chosen for YNNPACK's convs), which use none of those convolutions here."""
  from seq2seq_jax import host_memory
  monkeypatch.setattr(host_memory, "eigen_cpu_convs", lambda: False)
  x_shape, w_shape, stride = case
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  w = jnp.asarray(rng.standard_normal(w_shape) * 0.1, jnp.float32)
  pads = ((1, 1),) * (len(x_shape) - 2)
  conv_vjp = lambda a, b: jax.vjp(lambda a_, b_: conv.conv_nd(a_, b_, stride, pads), a, b)
  results = {}
  for forms in ("cpu_tuned", "xla"):
    with conv.forms(forms):
      y, vjp = conv_vjp(x, w)
      dy = jnp.asarray(np.random.default_rng(12).standard_normal(y.shape), jnp.float32)
      results[forms] = (y, *vjp(dy))
      # A new jit per forms: a jitted function's traces are cached without regard to them.
      text = jax.jit(lambda a, b, d: (conv_vjp(a, b)[0], conv_vjp(a, b)[1](d))).lower(
          x, w, dy).as_text()
    ranks = hlo_conv_ranks(text)
    if forms == "xla":
      assert ranks == [len(x_shape) - 2] * 3, ranks  # y, dx, dW
      assert "dot_general" not in text and "while" not in text
    else:
      assert "dot_general" in text or len(x_shape) - 2 not in ranks
  for got, want in zip(results["xla"], results["cpu_tuned"]):
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * float(jnp.abs(want).max()))


def test_conv_forms_auto_follows_the_default_backend(monkeypatch):
  for backend, tuned in (("cpu", True), ("gpu", False), ("tpu", False)):
    monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
    assert conv.cpu_tuned() == tuned
    with conv.forms("auto"):
      assert conv.cpu_tuned() == tuned
    with conv.forms("xla"):
      assert not conv.cpu_tuned()
    with conv.forms("cpu_tuned"):
      assert conv.cpu_tuned()
  with pytest.raises(ValueError, match="config.train.conv_forms.*'cudnn'"):
    with conv.forms("cudnn"):
      pass


# (ndims, batch, depth or height, cin, k, stride, mesh): halo exchange, strided (each slab a
# multiple of the stride), slabs no thicker than the halo (the gathered window), batch on the
# data axis, and slabs of 3 slices for a stride of 2, which do not line up with the outputs
# (left to GSPMD); in 3D and, height-sharded, in 2D.
XLA_SHARDED_CASES = [
    (3, 1, 8, 4, 3, 1, {"data": 1, "spatial": 4}),
    (3, 1, 16, 4, 3, 2, {"data": 1, "spatial": 4}),
    (3, 1, 8, 3, 5, 1, {"data": 1, "spatial": 4}),
    (3, 2, 12, 3, 3, 2, {"data": 2, "spatial": 2}),
    (3, 1, 12, 4, 3, 2, {"data": 1, "spatial": 4}),
    (2, 1, 8, 4, 3, 1, {"data": 1, "spatial": 4}),
    (2, 1, 8, 3, 5, 1, {"data": 1, "spatial": 4}),
    (2, 2, 12, 3, 3, 2, {"data": 2, "spatial": 2}),
    (2, 1, 12, 4, 3, 2, {"data": 1, "spatial": 4}),
]


@pytest.mark.parametrize("case", XLA_SHARDED_CASES, ids=lambda c: "x".join(map(str, c[:6])))
def test_xla_forms_run_a_spatially_sharded_conv_per_shard(case, monkeypatch):
  """With XLA's forms every reflect conv on a depth-sharded volume (a height-sharded image
  in 2D) whose slabs line up with its outputs runs per shard (`shard_map`, one XLA conv
  each, no chunks), strided ones included; the others are one conv partitioned by GSPMD.
  Forward and both gradients equal the unsharded conv's."""
  from seq2seq_jax.models import conv3d
  ndims, b, depth, cin, k, stride, mesh_cfg = case
  pad, n = k // 2, mesh_cfg["spatial"]
  monkeypatch.setattr(conv3d, "STACK_BYTES_TO_CHUNK", 0)  # chunks, were the forms CPU-tuned
  monkeypatch.setattr(conv3d, "MIN_CHUNK_ROWS", 36)
  mesh = sharding.make_mesh(mesh_cfg)
  rng = np.random.default_rng(13)
  x = jnp.asarray(rng.standard_normal((b, depth) + (6,) * (ndims - 1) + (cin,)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k,) * ndims + (cin, 5)) * 0.1, jnp.float32)

  def f(a, c):
    with sharded_conv.spatial_sharding(mesh), conv.forms("xla"):
      return conv.reflect_conv(a, c, stride, pad)
  jaxpr = str(jax.make_jaxpr(f)(x, w))
  per_shard = (depth // n) % stride == 0
  assert ("shard_map" in jaxpr) == per_shard and "scan" not in jaxpr
  if per_shard:
    assert ("all_gather" if depth // n <= pad else "ppermute") in jaxpr
  assert jaxpr.count("conv_general_dilated") == 1
  _check_sharded_reflect_conv(f, x, w, mesh, mesh_cfg, stride, pad, rng)


# (batch, height, cin, cout, k, stride, mesh) of 2D convs in the CPU-tuned forms: row-stacked
# in row tiles (a loop inside each shard), narrow (shifted GEMM), strided (XLA's conv), and
# rows no more than the halo (the gathered window).
CPU_2D_SHARDED_CASES = [
    (1, 16, 8, 8, 3, 1, {"data": 1, "spatial": 2}),
    (2, 12, 16, 2, 3, 1, {"data": 2, "spatial": 2}),
    (1, 16, 4, 6, 3, 2, {"data": 1, "spatial": 4}),
    (1, 8, 4, 6, 5, 1, {"data": 1, "spatial": 4}),
]


@pytest.mark.parametrize("case", CPU_2D_SHARDED_CASES, ids=lambda c: "x".join(map(str, c[:6])))
def test_cpu_tuned_forms_run_a_height_sharded_2d_conv_per_shard(case, monkeypatch):
  """With the CPU-tuned forms a 2D reflect conv on a height-sharded image runs per shard
  (`shard_map`, the form one device would pick, on each shard's rows and halo); forward and
  both gradients equal the unsharded conv's."""
  b, h, cin, cout, k, stride, mesh_cfg = case
  pad = k // 2
  monkeypatch.setattr(gemm_conv, "MIN_ROWS_MACS", 0)  # the row-stacked forward on small ones
  monkeypatch.setattr(gemm_conv, "ROWS_TILE_BYTES", 1)  # one row per tile: a loop
  mesh = sharding.make_mesh(mesh_cfg)
  rng = np.random.default_rng(15)
  x = jnp.asarray(rng.standard_normal((b, h, 10, cin)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, k, cin, cout)) * 0.1, jnp.float32)

  def f(a, c):
    with sharded_conv.spatial_sharding(mesh), conv.forms("cpu_tuned"):
      return conv.reflect_conv(a, c, stride, pad)
  jaxpr = str(jax.make_jaxpr(f)(x, w))
  assert "shard_map" in jaxpr
  assert ("all_gather" if h // mesh_cfg["spatial"] <= pad else "ppermute") in jaxpr
  _check_sharded_reflect_conv(f, x, w, mesh, mesh_cfg, stride, pad, rng)


@pytest.mark.parametrize("ndims,mesh_cfg,forms", [(3, {"data": 1, "spatial": 4}, "xla"),
                                                 (3, {"data": 2, "spatial": 2}, "xla"),
                                                 (2, {"data": 2, "spatial": 2}, "xla"),
                                                 (2, {"data": 2, "spatial": 2}, "cpu_tuned"),
                                                 (2, {"data": 1, "spatial": 4}, "cpu_tuned")])
def test_per_example_hyperconv_on_a_sharded_volume_runs_per_shard(ndims, mesh_cfg, forms):
  """A `HyperConv` with one code per example on a depth-sharded volume (a height-sharded
  image in 2D), XLA's forms (and the CPU-tuned ones in 2D): the per-example conv runs per
  shard (each example's kernel with its slab), strided too; output and gradients (input and
  parameters) equal the unsharded module's."""
  from seq2seq_jax.models import hyperconv
  mesh = sharding.make_mesh(mesh_cfg)
  rng = np.random.default_rng(14)
  x = jnp.asarray(rng.standard_normal((2, 8) + (6,) * (ndims - 1) + (3,)), jnp.float32)
  s = jnp.asarray(rng.standard_normal((2, 4)), jnp.float32)
  for stride in (1, 2):
    m = hyperconv.HyperConv(5, 3, c_w=2, pad=1, stride=stride, ndims=ndims)
    params = m.init(jax.random.PRNGKey(0), x, s)

    def loss(p, a, mesh=None, m=m):
      with sharded_conv.spatial_sharding(mesh), conv.forms(forms):
        y = m.apply(p, a, s)
      return jnp.sum(y * jnp.cos(y)), y
    f = lambda p, a: jax.value_and_grad(loss, (0, 1), has_aux=True)(p, a, mesh)
    assert "shard_map" in str(jax.make_jaxpr(f)(params, x))
    xs = jax.device_put(x, NamedSharding(mesh, P("data" if mesh_cfg["data"] > 1 else None,
                                                 "spatial")))
    (_, y), g = jax.jit(f)(params, xs)
    (_, y_ref), g_ref = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-5 * float(jnp.abs(y_ref).max()))
    for got, want in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
      np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(jnp.abs(want).max()))
