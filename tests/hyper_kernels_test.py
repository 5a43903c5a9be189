"""Hyper kernels built for several codes at once (`Generator.hyper_kernels`, the `KERNELS`
collection) against the kernels each render builds for itself, and `bank_kernels`' hand-written
backward against autodiff of the same product."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seq2seq_jax import train_step as ts
from seq2seq_jax.models import hyperconv


@pytest.mark.parametrize("n", [1, 2, 11], ids=["one", "two", "many"])
def test_bank_kernels_backward_is_autodiffs(n):
  """11 codes take the dot branch of the bank's gradient, 1 and 2 the broadcast products."""
  rng = np.random.default_rng(n)
  bank = jnp.asarray(rng.normal(size=(50, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(n, 4)), jnp.float32)
  r = jnp.asarray(rng.normal(size=(n, 50)), jnp.float32)
  zero = jnp.zeros((), jnp.float32)

  got = jax.grad(lambda b, w, p: jnp.sum(hyperconv.bank_kernels(b, w, p) * r),
                 argnums=(0, 1, 2))(bank, w, zero)
  want = jax.grad(lambda b, w: jnp.sum((w @ b.T) * r), argnums=(0, 1))(bank, w)
  np.testing.assert_allclose(np.asarray(hyperconv.bank_kernels(bank, w, zero)),
                             np.asarray(w @ bank.T), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-5, atol=1e-5)
  # The probe's cotangent: the norm of the bank's gradient, from dK and w alone.
  np.testing.assert_allclose(float(got[2]), float(jnp.linalg.norm(want[0])), rtol=1e-5)


def _tiny(batch: int):
  from configs import tiny  # pylint: disable=import-outside-toplevel
  config = tiny.get_config()
  model = ts.make_model(config)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(-1, 1, (batch, 1, 16, 16, 3)), jnp.float32)
  params = ts.init_state(model, config, x[:1])["params"]
  return model, params, x


@pytest.mark.parametrize("per_example", [False, True], ids=["shared", "per_example"])
def test_built_kernels_render_and_differentiate_as_the_renders_own(per_example):
  """Two codes built in one pass, each render given its rows: the same outputs and the same
  gradients as renders that build their own kernels; with per-example codes the built rows
  are repeated over the output frames as the style rows are (n_outseq = 2). In float64, so
  that the biases ahead of an InstanceNorm (true gradient zero) compare as rounding, not as
  float32 noise of either summation order."""
  model, params, x = _tiny(2)
  rows = 2 if per_example else 1
  with jax.enable_x64(True):
    model = model.clone(dtype=jnp.float64)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
    eye = jnp.eye(model.c_s, dtype=jnp.float64)
    codes = [eye[0:rows], eye[2:2 + rows]]
    h = model.apply({"params": params}, model.apply({"params": params}, x, method="encode"),
                    2, method="decode_hidden")
    r = jnp.asarray(np.random.default_rng(1).normal(size=(2, 2, 16, 16, 3)))

    def own(p):
      outs = [model.apply({"params": p}, h, c, method="render") for c in codes]
      return sum(jnp.sum(o * r) for o in outs), outs

    def built(p):
      k = model.apply({"params": p}, jnp.concatenate(codes), method="hyper_kernels")
      outs = [model.apply({"params": p, hyperconv.KERNELS: hyperconv.take_codes(
          k, i * rows, (i + 1) * rows)}, h, c, method="render") for i, c in enumerate(codes)]
      return sum(jnp.sum(o * r) for o in outs), outs

    (_, want), g_want = jax.value_and_grad(own, has_aux=True)(params)
    (_, got), g_got = jax.value_and_grad(built, has_aux=True)(params)
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-10)
  assert float(jnp.abs(got[0] - got[1]).max()) > 1e-3  # the two codes really differ
  flat_got = jax.tree_util.tree_leaves_with_path(g_got)
  flat_want = dict(jax.tree_util.tree_leaves_with_path(g_want))
  assert len(flat_got) == len(flat_want)
  for path, a in flat_got:
    np.testing.assert_allclose(np.asarray(a), np.asarray(flat_want[path]), rtol=1e-8,
                               atol=1e-9, err_msg=jax.tree_util.keystr(path))


def test_built_kernels_of_the_wrong_shape_or_count_name_the_layer():
  model, params, x = _tiny(2)
  h = model.apply({"params": params}, model.apply({"params": params}, x, method="encode"), 1,
                  method="decode_hidden")
  k = model.apply({"params": params}, jnp.eye(model.c_s)[:3], method="hyper_kernels")
  with pytest.raises(ValueError, match=r"decoder.*built for 3 codes, the style has 2 rows"):
    model.apply({"params": params, hyperconv.KERNELS: k}, h, jnp.eye(model.c_s)[:2],
                method="render")
  bad = jax.tree_util.tree_map(lambda a: a[:1], k)
  bad["decoder"]["conv_last"]["kernels"] = bad["decoder"]["conv_last"]["kernels"][..., :2]
  with pytest.raises(ValueError, match=r"conv_last.*do not fit this layer"):
    model.apply({"params": params, hyperconv.KERNELS: bad}, h, jnp.eye(model.c_s)[:1],
                method="render")
