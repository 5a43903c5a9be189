"""The image encoder: strided reflect-padded convs, then residual blocks."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from seq2seq_jax.models import ops
from seq2seq_jax.models.conv import Conv
from seq2seq_jax.models.resblock import ResBlock


class Encoder(nn.Module):
  """For each (c, k, s): reflect-pad (k-1)//2, conv k stride s, norm, LeakyReLU(0.2); then
  `nres` residual blocks. Input `[n, *spatial, c_in]`, output `[n, *spatial/stride, c_enc[-1]]`.
  """
  c_enc: Sequence[int]
  k_enc: Sequence[int]
  s_enc: Sequence[int]
  nres: int
  ndims: int = 2
  norm: str | None = "InstanceNorm"
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    # With remat, every stage keeps only its input: the full-resolution stages are where 3D
    # activations are largest.
    conv = nn.remat(Conv) if self.remat else Conv
    norm_act = functools.partial(ops.norm_leaky_relu, norm=self.norm)
    for i, (c, k, s) in enumerate(zip(self.c_enc, self.k_enc, self.s_enc)):
      x = conv(c, k, stride=s, pad=(k - 1) // 2, ndims=self.ndims, dtype=self.dtype,
               post=norm_act, name=f"conv_{i}")(x)
    block = nn.remat(ResBlock) if self.remat else ResBlock
    for i in range(self.nres):
      x = block(ndims=self.ndims, norm=self.norm, dtype=self.dtype, name=f"res_{i}")(x)
    return x
