"""The plain formulations: jnp, lax and jax.nn, for every backend. Their memory in the
backward pass is autodiff's, shaped by the U-Net's remat policy (models/unet.py)."""
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

Padding = Tuple[Tuple[int, int], Tuple[int, int]]


def linear(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return jnp.matmul(x, kernel.astype(x.dtype))


def conv2d(x: jax.Array, kernel: jax.Array, strides: Tuple[int, int], padding: Padding):
  """XLA's convolution, NHWC input, HWIO kernel."""
  return jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
  """torch F.interpolate(scale_factor=2, mode='nearest') on NHWC."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def conv(x: jax.Array, kernel: jax.Array, strides: Tuple[int, int], padding: Padding,
         upsampled_2x: bool = False) -> jax.Array:
  if upsampled_2x:
    x = upsample_nearest_2x(x)
  return conv2d(x, kernel.astype(x.dtype), strides, padding)


def heads_major(t: jax.Array) -> jax.Array:
  """[batch, length, heads, dim] <-> [batch, heads, length, dim]."""
  return jnp.swapaxes(t, 1, 2)


def attention(query: jax.Array, key: jax.Array, value: jax.Array, *, is_causal: bool = False,
              mask: Optional[jax.Array] = None) -> jax.Array:
  """XLA's attention, softmax in float32 (jax.nn upcasts the scores of bf16 inputs)."""
  return jax.nn.dot_product_attention(query, key, value, mask=mask, is_causal=is_causal,
                                      implementation='xla')
