"""The hyper banks' gradient norms from their factors (`hyperconv.bank_kernels`), against the
norms of the gradients themselves, and the step's norm bound built on them."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from seq2seq_jax import train_step as ts
from seq2seq_jax.models import hyperconv


def _module_and_inputs(n_codes: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  m = hyperconv.HyperConv(5, 3, c_w=4, pad=1)
  x = jnp.asarray(rng.normal(size=(2, 9, 9, 3)), jnp.float32)
  codes = jnp.asarray(rng.normal(size=(n_codes, 6)), jnp.float32)
  r = jnp.asarray(rng.normal(size=(2, 9, 9, 5)), jnp.float32)
  params = m.init(jax.random.PRNGKey(seed), x, codes[:1])["params"]
  return m, params, x, codes, r


@pytest.mark.parametrize("n_codes", [1, 2], ids=["shared", "per_example"])
def test_probe_gradient_is_the_norm_of_the_bank_gradient(n_codes):
  m, params, x, codes, r = _module_and_inputs(n_codes)
  probes = hyperconv.norm_probes({"conv": params})["conv"]
  assert jax.tree_util.tree_structure(probes) == jax.tree_util.tree_structure({"param": 0.0})

  def loss(params, probes=None):
    variables = {"params": params}
    if probes is not None:
      variables[hyperconv.NORM_PROBES] = probes
    return jnp.sum(m.apply(variables, x, codes) * r)

  plain = jax.grad(loss)(params)
  grads, probe_grads = jax.grad(loss, argnums=(0, 1))(params, probes)
  # The probe changes nothing else: same gradients, bit for bit.
  for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(plain)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  want = float(jnp.linalg.norm(grads["param"]))
  assert want > 0
  np.testing.assert_allclose(float(probe_grads["param"]), want, rtol=1e-5)


def test_probe_sums_its_uses_and_bounds_the_summed_gradient():
  m, params, x, codes, r = _module_and_inputs(2, seed=1)
  probes = {"param": jnp.zeros((), jnp.float32)}

  def use(params, probes, code):
    return jnp.sum(m.apply({"params": params, hyperconv.NORM_PROBES: probes}, x, code) * r)

  each = [jax.grad(use)(params, probes, codes[i:i + 1])["param"] for i in range(2)]
  both = lambda p, q: use(p, q, codes[:1]) + use(p, q, codes[1:])
  grads, probe_grads = jax.grad(both, argnums=(0, 1))(params, probes)
  norms = [float(jnp.linalg.norm(g)) for g in each]
  np.testing.assert_allclose(float(probe_grads["param"]), sum(norms), rtol=1e-5)
  summed = float(jnp.linalg.norm(grads["param"]))
  np.testing.assert_allclose(summed, float(jnp.linalg.norm(each[0] + each[1])), rtol=1e-5)
  assert summed <= sum(norms) * (1 + 1e-6)  # the triangle inequality, strict for these codes
  assert summed < sum(norms) * 0.999


def test_probe_passes_non_finite_gradients_through():
  m, params, x, codes, r = _module_and_inputs(1)
  probes = {"param": jnp.zeros((), jnp.float32)}
  for bad in (np.inf, np.nan):
    rb = r.at[0, 0, 0, 0].set(bad)
    g = jax.grad(lambda q: jnp.sum(m.apply({"params": params, hyperconv.NORM_PROBES: q},
                                           x, codes) * rb))(probes)
    assert not np.isfinite(float(g["param"]))


def test_sq_norm_bound_replaces_the_probed_banks_only():
  grads = {"dec": {"conv": {"param": jnp.full((3, 2), 10.0), "b": jnp.full((2,), 1.0)}},
           "enc": {"kernel": jnp.full((4,), 2.0)}}
  probes = hyperconv.norm_probes({"dec": {"conv": {"param": 0, "b": 0, "fc": {}}},
                                  "enc": {"kernel": 0}})
  assert jax.tree_util.tree_structure(probes) == jax.tree_util.tree_structure(
      {"dec": {"conv": {"param": 0.0}}})
  bank_norms = {"dec": {"conv": {"param": jnp.float32(3.0)}}}
  # 3² for the bank (its probe, not its 600 from the leaf) + 2·1² + 4·2².
  assert float(ts.sq_norm_bound(grads, bank_norms)) == 9.0 + 2.0 + 16.0
  grads["enc"]["kernel"] = grads["enc"]["kernel"].at[0].set(jnp.inf)
  assert not np.isfinite(float(ts.sq_norm_bound(grads, bank_norms)))


@pytest.mark.parametrize("train", [{}, {"recompute_elementwise": True}, {"remat": True}],
                         ids=["plain", "recompute_elementwise", "remat"])
def test_step_norm_bound_on_the_generator_objective(train):
  """On the tiny generator: exact for one render, and for the whole objective, which builds
  each bank's kernels for both codes in one use (`Generator.hyper_kernels`); also through the
  lifted `nn.remat` modules of `recompute_elementwise` and `remat`."""
  from configs import tiny  # pylint: disable=import-outside-toplevel
  from experiments import benchmark as bm  # pylint: disable=import-outside-toplevel
  from seq2seq_jax import losses  # pylint: disable=import-outside-toplevel

  config = tiny.get_config()
  config.train.update(train)
  model = ts.make_model(config)
  batch = bm.batch_for(config, 1, "shared")
  params = ts.init_state(model, config, batch["src"][:1])["params"]
  probes = hyperconv.norm_probes(params)
  assert len(jax.tree_util.tree_leaves(probes)) >= 2

  def variables(p, q):
    return {"params": p, hyperconv.NORM_PROBES: q}

  def one_render(p, q):
    out = model.apply(variables(p, q), batch["src"], batch["tgt_code"][:1])
    return jnp.mean(jnp.abs(out - batch["tgt"]))

  def objective(p, q):
    return losses.seq2seq_objective(model, variables(p, q), batch["src"], batch["tgt"],
                                    batch["src_code"][:1], batch["tgt_code"][:1])[0]

  g, bank_norms = jax.grad(one_render, argnums=(0, 1))(params, probes)
  true = float(optax.global_norm(g)) ** 2
  np.testing.assert_allclose(float(ts.sq_norm_bound(g, bank_norms)), true, rtol=1e-5)
  g, bank_norms = jax.grad(objective, argnums=(0, 1))(params, probes)
  true = float(optax.global_norm(g)) ** 2
  assert true > 0
  np.testing.assert_allclose(float(ts.sq_norm_bound(g, bank_norms)), true, rtol=1e-5)
