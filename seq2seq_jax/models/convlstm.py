"""Stacked convolutional LSTM, scanned over time with `lax.scan`."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
from jax import lax
import jax
import jax.numpy as jnp

from seq2seq_jax.models.conv import conv_kernel_init, conv_nd, conv_output, zeros


def _gates(z: jnp.ndarray, hidden: int):
  i, f, o, g = jnp.split(z, 4, axis=-1)  # the official split order
  return jax.nn.sigmoid(i), jax.nn.sigmoid(f), jax.nn.sigmoid(o), jnp.tanh(g)


class ConvLSTM(nn.Module):
  """`num_layers` stacked ConvLSTM cells, kernel 3, zero padding, zero initial state.

  Each cell's conv acts on the channel concatenation [input, h] (as the official cell). Since
  a conv is linear, it is split into an input part, computed for all time steps in one batched
  conv before the scan, and a hidden part, the only work left inside the scan. At step 0 the
  hidden state is zero, so that step needs no hidden conv at all: with t = 1 (a plain
  sequence) the whole LSTM is one conv per layer, without the forget gate it never reads.

  Attributes:
    hidden: channels of h and c (the official `c_lstm`).
    ndims: 2 or 3.
    num_layers: stacked layers (3 in the official model).
    dtype: compute dtype for the convolutions; the cell state is kept in float32.
  """
  hidden: int
  ndims: int = 2
  num_layers: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, xs: jnp.ndarray, n_steps: int | None = None) -> jnp.ndarray:
    """Runs the stack.

    Args:
      xs: `[b, t, *spatial, c]`, or, when `n_steps` is given, one input `[b, *spatial, c]`
        fed at every one of `n_steps` steps (the decoder's repeated latent).
      n_steps: see `xs`.

    Returns:
      The last layer's h at every step, `[b, t, *spatial, hidden]`.
    """
    constant = n_steps is not None
    steps = n_steps if constant else xs.shape[1]
    pad = [(1, 1)] * self.ndims
    state_dtype = jnp.promote_types(self.dtype, jnp.float32)
    h_seq = None
    for layer in range(self.num_layers):
      inputs = xs if layer == 0 else h_seq
      const_in = constant and layer == 0
      c_in = inputs.shape[-1]
      kshape = (3,) * self.ndims + (c_in + self.hidden, 4 * self.hidden)
      kernel = self.param(f"cell_{layer}_kernel", conv_kernel_init(self.ndims), kshape,
                          jnp.float32).astype(self.dtype)
      bias = self.param(f"cell_{layer}_bias", zeros, (4 * self.hidden,), jnp.float32)
      k_x, k_h = kernel[..., :c_in, :], kernel[..., c_in:, :]
      if steps == 1:
        # One step from a zero state: c = i·g, h = o·tanh(c), so the forget gate's quarter of
        # the conv is never read; leaving its columns out saves a quarter of the LSTM's conv
        # work (forward and both gradients). Its params get a zero gradient, as they would.
        keep = lambda a: jnp.concatenate([a[..., :self.hidden], a[..., 2 * self.hidden:]], -1)
        k_x, bias = keep(k_x), keep(bias)
      if const_in:
        zx = conv_output(conv_nd(inputs.astype(self.dtype), k_x, padding=pad)
                         + bias.astype(self.dtype))
        zx_at = lambda t, zx=zx: zx
        zx_rest = None
      else:
        b, t = inputs.shape[:2]
        flat = inputs.reshape((b * t,) + inputs.shape[2:]).astype(self.dtype)
        zx = conv_output(conv_nd(flat, k_x, padding=pad) + bias.astype(self.dtype))
        zx = zx.reshape((b, t) + zx.shape[1:])
        zx_at = lambda t, zx=zx: zx[:, t]
        zx_rest = jnp.moveaxis(zx[:, 1:], 1, 0)  # time-major for the scan

      if steps == 1:
        i, o, g = jnp.split(zx_at(0).astype(state_dtype), 3, axis=-1)
        i, o, g = jax.nn.sigmoid(i), jax.nn.sigmoid(o), jnp.tanh(g)
      else:
        i, _, o, g = _gates(zx_at(0).astype(state_dtype), self.hidden)
      c0 = i * g  # f · c_prev vanishes with c_prev = 0
      h0 = o * jnp.tanh(c0)

      def step(carry, zx_t, k_h=k_h):
        h, c = carry
        z = conv_output(zx_t + conv_nd(h.astype(self.dtype), k_h, padding=pad))
        i, f, o, g = _gates(z.astype(state_dtype), self.hidden)
        c = f * c + i * g
        h = o * jnp.tanh(c)
        return (h, c), h

      if steps > 1:
        if const_in:
          _, hs = lax.scan(lambda carry, _: step(carry, zx), (h0, c0), None, length=steps - 1)
        else:
          _, hs = lax.scan(step, (h0, c0), zx_rest)
        h_seq = jnp.concatenate([h0[:, None], jnp.moveaxis(hs, 0, 1)], axis=1)
      else:
        h_seq = h0[:, None]
    return h_seq
