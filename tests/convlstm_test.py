"""ConvLSTM against a plain cell written from the official definition (all four gates, the
conv over [input, h], a loop over time), values and parameter gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from seq2seq_jax.models.convlstm import ConvLSTM


def naive_convlstm(params, xs, hidden, num_layers=3):
  """xs `[b, t, H, W, c]` → last layer's h at every step; zero initial state."""
  seq = [xs[:, t] for t in range(xs.shape[1])]
  for layer in range(num_layers):
    k, bias = params[f"cell_{layer}_kernel"], params[f"cell_{layer}_bias"]
    h = jnp.zeros(seq[0].shape[:-1] + (hidden,))
    c = jnp.zeros_like(h)
    out = []
    for x in seq:
      z = lax.conv_general_dilated(jnp.concatenate([x, h], -1), k, (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias
      i, f, o, g = jnp.split(z, 4, axis=-1)
      c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
      h = jax.nn.sigmoid(o) * jnp.tanh(c)
      out.append(h)
    seq = out
  return jnp.stack(seq, axis=1)


@pytest.mark.parametrize("t,n_steps", [(1, None), (3, None), (1, 1), (1, 3)])
def test_convlstm_equals_the_plain_cell(t, n_steps):
  hidden = 8
  rng = np.random.default_rng(t + (n_steps or 0))
  xs = jnp.asarray(rng.normal(size=(2, t, 6, 5, 4)), jnp.float32)
  lstm = ConvLSTM(hidden, ndims=2)
  arg = xs if n_steps is None else xs[:, 0]
  params = lstm.init(jax.random.PRNGKey(0), arg, n_steps)["params"]
  # Non-zero biases, so that every gate's bias matters.
  params = jax.tree.map(
      lambda p: p + 0.3 * jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  steps = n_steps or t
  ref_in = xs if n_steps is None else jnp.repeat(xs[:, :1], steps, axis=1)
  weights = jnp.asarray(rng.normal(size=(2, steps, 6, 5, hidden)), jnp.float32)

  def ours(p):
    return jnp.sum(lstm.apply({"params": p}, arg, n_steps) * weights)

  def ref(p):
    return jnp.sum(naive_convlstm(p, ref_in, hidden) * weights)

  y = lstm.apply({"params": params}, arg, n_steps)
  np.testing.assert_allclose(y, naive_convlstm(params, ref_in, hidden), atol=2e-5)
  g, g_ref = jax.grad(ours)(params), jax.grad(ref)(params)
  for name in g:
    np.testing.assert_allclose(g[name], g_ref[name], atol=1e-4, rtol=1e-4, err_msg=name)
  if steps == 1:
    # One step from a zero state: the forget gate never acts, so its columns get no gradient.
    f = slice(hidden, 2 * hidden)
    assert float(jnp.abs(g["cell_0_kernel"][..., f]).max()) == 0.0
    assert float(jnp.abs(g_ref["cell_0_kernel"][..., f]).max()) == 0.0
