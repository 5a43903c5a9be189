"""Convolution with reflect padding, channels-last, and the official initialisers."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from seq2seq_jax.models import ops

# Official init: kaiming-normal (fan-in, gain sqrt 2) on 2D conv weights; torch's default
# kaiming-uniform(a=sqrt 5), i.e. U(±1/sqrt(fan_in)), on 3D convs and linears; zero biases.
kaiming_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
torch_default_uniform = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
zeros = nn.initializers.zeros


def dimension_numbers(ndims: int) -> tuple[str, str, str]:
  if ndims == 2:
    return ("NHWC", "HWIO", "NHWC")
  return ("NDHWC", "DHWIO", "NDHWC")


def conv_nd(x: jnp.ndarray, kernel: jnp.ndarray, stride: int = 1,
            padding: str | Sequence[tuple[int, int]] = "VALID") -> jnp.ndarray:
  """Channels-last convolution; `kernel` is `[*k, in, out]`."""
  ndims = x.ndim - 2
  return lax.conv_general_dilated(
      x, kernel, window_strides=(stride,) * ndims, padding=padding,
      dimension_numbers=dimension_numbers(ndims))


def conv_kernel_init(ndims: int):
  return kaiming_normal if ndims == 2 else torch_default_uniform


class Conv(nn.Module):
  """Conv k^ndims with bias; `pad` reflect-pads first (the official `padding_mode='reflect'`).

  Attributes:
    features: output channels.
    kernel_size: odd edge length k.
    stride: 1 or 2.
    pad: reflect padding per side, applied before a VALID convolution.
    ndims: 2 or 3.
    dtype: compute dtype (params stay float32).
  """
  features: int
  kernel_size: int
  stride: int = 1
  pad: int = 0
  ndims: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    in_features = x.shape[-1]
    kshape = (self.kernel_size,) * self.ndims + (in_features, self.features)
    kernel = self.param("kernel", conv_kernel_init(self.ndims), kshape, jnp.float32)
    bias = self.param("bias", zeros, (self.features,), jnp.float32)
    x = ops.reflect_pad(x.astype(self.dtype), self.pad)
    y = conv_nd(x, kernel.astype(self.dtype), self.stride)
    return y + bias.astype(self.dtype)


def linear_init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jnp.ndarray:
  """torch.nn.Linear's default weight init for a flax `[in, out]` kernel."""
  return torch_default_uniform(key, shape, dtype)
