"""The CPU formulations in models/layers.py against the XLA primitives they replace."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instaflow_jax.models import layers


def _lax_conv(x, kernel, strides, padding):
  return jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@pytest.mark.parametrize('size,kernel,stride,padding', [
    (2, 3, 1, ((1, 1), (1, 1))),    # the U-Net's deepest level
    (4, 3, 2, ((0, 1), (0, 1))),    # diffusers' Downsample2D with padding=0
    (4, 3, 2, ((1, 1), (1, 1))),
    (3, 1, 1, ((0, 0), (0, 0))),    # a 1x1 shortcut
    (13, 11, 4, ((2, 2), (2, 2))),  # AlexNet's first conv (LPIPS) on a small image
])
def test_conv_as_matmul_equals_the_convolution(size, kernel, stride, padding):
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(2, size, size + 1, 5), jnp.float32)
  w = jnp.asarray(rng.randn(kernel, kernel, 5, 7), jnp.float32)
  expected = _lax_conv(x, w, (stride, stride), padding)
  got = layers._conv_as_matmul(x, w, (stride, stride), padding)
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('size', [2, 8])  # matmul path (4 pixels), library path (64)
def test_conv_module_matches_lax_on_both_paths(size):
  module = layers.conv(6, 'conv', kernel_size=3)
  x = jnp.asarray(np.random.RandomState(1).randn(2, size, size, 4), jnp.float32)
  params = nn.meta.unbox(module.init(jax.random.key(0), x))['params']
  apply = lambda x: module.apply({'params': params}, x)
  uses_library_conv = 'conv_general_dilated' in str(jax.make_jaxpr(apply)(x))
  assert uses_library_conv == (size * size > layers._CPU_MATMUL_CONV_MAX_PIXELS)
  expected = _lax_conv(x, params['kernel'], (1, 1), ((1, 1), (1, 1))) + params['bias']
  np.testing.assert_allclose(apply(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('is_causal,with_mask', [(False, False), (True, False), (True, True)])
def test_cpu_attention_equals_jax_attention_with_gradients(is_causal, with_mask):
  rng = np.random.RandomState(2)
  q, k, v = (jnp.asarray(rng.randn(2, 7, 3, 4), jnp.float32) for _ in range(3))
  mask = None
  if with_mask:  # the text encoder's padding mask: the last two keys of example 1 hidden
    keep = np.ones((2, 1, 1, 7), bool)
    keep[1, ..., 5:] = False
    mask = jnp.asarray(keep)

  def loss(attention, q, k, v):
    return jnp.sum(jnp.sin(attention(q, k, v, is_causal=is_causal, mask=mask)))

  ours = lambda q, k, v, **kw: layers._attention_on_cpu(q, k, v, kw['is_causal'], kw['mask'])
  for a, b in zip(jax.value_and_grad(lambda *t: loss(ours, *t), argnums=(0, 1, 2))(q, k, v),
                  jax.value_and_grad(lambda *t: loss(jax.nn.dot_product_attention, *t),
                                     argnums=(0, 1, 2))(q, k, v)):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_group_norm_checks_the_groups():
  with pytest.raises(ValueError, match='6 channels do not divide into 4 groups'):
    layers.group_norm(4, 1e-5, 'norm').init(jax.random.key(0), jnp.zeros((1, 2, 2, 6)))
