"""Residual blocks: the encoder's plain one and the decoder's hyperconv one."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from seq2seq_jax.models import ops
from seq2seq_jax.models.conv import Conv
from seq2seq_jax.models.hyperconv import HyperConv


class ResBlock(nn.Module):
  """x + norm(conv3(pad(lrelu(norm(conv3(pad(x))))))), reflect padding 1."""
  ndims: int = 2
  norm: str | None = "InstanceNorm"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    c = x.shape[-1]
    y = Conv(c, 3, pad=1, ndims=self.ndims, dtype=self.dtype, name="conv1")(x)
    y = ops.norm_leaky_relu(y, self.norm)
    y = Conv(c, 3, pad=1, ndims=self.ndims, dtype=self.dtype, name="conv2")(y)
    return x + ops.maybe_norm(y, self.norm)


class HyperResBlock(nn.Module):
  """The decoder's residual block: both convs are hyperconvs conditioned on the style `s`."""
  c_w: int
  ndims: int = 2
  norm: str | None = "InstanceNorm"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, s: jnp.ndarray) -> jnp.ndarray:
    c = x.shape[-1]
    kw = dict(c_w=self.c_w, pad=1, ndims=self.ndims, dtype=self.dtype)
    y = HyperConv(c, 3, name="conv1", **kw)(x, s)
    y = ops.norm_leaky_relu(y, self.norm)
    y = HyperConv(c, 3, name="conv2", **kw)(y, s)
    return x + ops.maybe_norm(y, self.norm)
