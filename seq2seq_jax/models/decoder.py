"""The hyper decoder: hyperconv residual blocks, upsampling hyperconvs, a tanh output conv."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from seq2seq_jax.models import ops
from seq2seq_jax.models.hyperconv import HyperConv
from seq2seq_jax.models.resblock import HyperResBlock


class HyperDecoder(nn.Module):
  """Every conv is a hyperconv conditioned on the style `s` (`[1 or n, c_s]`).

  `nres` hyper residual blocks; for each (c, k, s) of c_dec[:-1]: ×2 linear upsample,
  reflect-pad (k-1)//2, hyperconv, norm, LeakyReLU(0.2); last: reflect-pad, hyperconv to
  c_dec[-1], tanh.
  """
  c_dec: Sequence[int]
  k_dec: Sequence[int]
  s_dec: Sequence[int]
  nres: int
  c_w: int
  ndims: int = 2
  norm: str | None = "InstanceNorm"
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray, s: jnp.ndarray) -> jnp.ndarray:
    block = nn.remat(HyperResBlock) if self.remat else HyperResBlock
    for i in range(self.nres):
      x = block(c_w=self.c_w, ndims=self.ndims, norm=self.norm, dtype=self.dtype,
                name=f"res_{i}")(x, s)
    # With remat, each upsampling stage keeps only its (low-resolution) input.
    conv = nn.remat(HyperConv) if self.remat else HyperConv
    norm_act = functools.partial(ops.norm_leaky_relu, norm=self.norm)
    layers = list(zip(self.c_dec, self.k_dec, self.s_dec))
    for i, (c, k, st) in enumerate(layers[:-1]):
      x = conv(c, k, self.c_w, pad=(k - 1) // 2, stride=st, ndims=self.ndims,
               dtype=self.dtype, pre=ops.upsample2x, post=norm_act, name=f"convs_{i}")(x, s)
    c, k, st = layers[-1]
    return conv(c, k, self.c_w, pad=(k - 1) // 2, stride=st, ndims=self.ndims,
                dtype=self.dtype, post=jnp.tanh, name="conv_last")(x, s)
