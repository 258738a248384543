"""The layers on a CPU, through the CPU formulations (models/formulations/cpu.py), against the
XLA primitives they replace, and the custom backward passes that keep the training step's
memory down: same gradients, and what they keep for the backward pass (the memory that
saves: benchmarks/remat_memory.py)."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instaflow_jax.models import layers
from instaflow_jax.models.formulations import cpu
from instaflow_jax.models.formulations import portable
from tests import jaxprs

pytestmark = pytest.mark.usefixtures('cpu_kernels_on')


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
@pytest.mark.slow  # a sweep beside the parity test of the quick tier
def test_conv_as_matmul_equals_the_convolution(size, kernel, stride, padding):
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(2, size, size + 1, 5), jnp.float32)
  w = jnp.asarray(rng.randn(kernel, kernel, 5, 7), jnp.float32)
  expected = _lax_conv(x, w, (stride, stride), padding)
  got = cpu._conv_as_matmul(x, w, (stride, stride), padding)
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('size', [2, 8])  # matmul path (4 pixels), library path (64)
def test_conv_module_matches_lax_on_both_paths(size):
  module = layers.conv(6, 'conv', kernel_size=3)
  x = jnp.asarray(np.random.RandomState(1).randn(2, size, size, 4), jnp.float32)
  params = nn.meta.unbox(module.init(jax.random.key(0), x))['params']
  apply = lambda x: module.apply({'params': params}, x)
  uses_library_conv = 'conv_general_dilated' in str(jax.make_jaxpr(apply)(x))
  assert uses_library_conv == (size * size > cpu._MATMUL_CONV_MAX_PIXELS)
  expected = _lax_conv(x, params['kernel'], (1, 1), ((1, 1), (1, 1))) + params['bias']
  np.testing.assert_allclose(apply(x), expected, rtol=1e-5, atol=1e-5)



@pytest.mark.slow  # a sweep beside the parity test of the quick tier
@pytest.mark.parametrize('height,width', [(1, 2), (3, 5), (8, 8)])  # phases: matmul, library
def test_conv_of_upsampled_input_equals_the_convolution_of_the_upsampling(height, width):
  """Four 2x2 convolutions of the input, interleaved, for the 3x3 convolution of its 2x
  nearest up-sampling: the same values and gradients (only the taps' sums round apart)."""
  module = layers.conv(6, 'conv', upsampled_2x=True)
  x = jnp.asarray(np.random.RandomState(2).randn(2, height, width, 4), jnp.float32)
  params = nn.meta.unbox(module.init(jax.random.key(0), x))['params']
  weights = jnp.asarray(np.random.RandomState(3).randn(2, 2 * height, 2 * width, 6), jnp.float32)

  def loss(conv, x, kernel):
    return jnp.sum(weights * conv(x, kernel))

  ours = lambda x, kernel: module.apply({'params': dict(params, kernel=kernel)}, x)
  plain = lambda x, kernel: _lax_conv(portable.upsample_nearest_2x(x), kernel, (1, 1),
                                      ((1, 1), (1, 1))) + params['bias']
  uses_library_conv = 'conv_general_dilated' in str(jax.make_jaxpr(ours)(x, params['kernel']))
  assert uses_library_conv == (height * width > cpu._MATMUL_CONV_MAX_PIXELS)
  np.testing.assert_allclose(ours(x, params['kernel']), plain(x, params['kernel']),
                             rtol=1e-5, atol=1e-5)
  got = jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1))(x, params['kernel'])
  expected = jax.grad(lambda *a: loss(plain, *a), argnums=(0, 1))(x, params['kernel'])
  for g, e in zip(got, expected):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-4)

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

  expected = jax.value_and_grad(lambda *t: loss(jax.nn.dot_product_attention, *t),
                                argnums=(0, 1, 2))(q, k, v)
  # Both CPU paths: the kernel (unmasked) or its fallback, and the XLA formulation itself.
  for cpu_attention in (cpu.attention, cpu.xla_attention):
    ours = lambda q, k, v, **kw: cpu_attention(q, k, v, kw['is_causal'], kw['mask'])
    got = jax.value_and_grad(lambda *t: loss(ours, *t), argnums=(0, 1, 2))(q, k, v)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_group_norm_checks_the_groups():
  with pytest.raises(ValueError, match='6 channels do not divide into 4 groups'):
    layers.group_norm(4, 1e-5, 'norm').init(jax.random.key(0), jnp.zeros((1, 2, 2, 6)))


def _residual_shapes(fn, *args):
  """The shapes of what fn's backward pass keeps from the forward pass (jax.vjp's
  residuals)."""
  return [leaf.shape for leaf in jax.tree.leaves(jax.vjp(fn, *args)[1])]


def test_cpu_attention_keeps_no_weights_for_the_backward_pass():
  """Autodiff keeps the [batch, heads, q, kv] weights until the backward pass; the
  recomputing backward passes (the kernel's and the XLA formulation's) keep q, k, v, the
  output and the log-sum-exp. What that saves in XLA's buffers: benchmarks/remat_memory.py."""
  x = jnp.ones((2, 128, 2, 8))
  weights_size = 2 * 2 * 128 * 128
  paths = {'kernel': lambda t: cpu.attention(t, t, t, False, None),
           'xla': lambda t: cpu.xla_attention(t, t, t, False, None),
           'autodiff': lambda t: jax.nn.dot_product_attention(t, t, t)}
  largest = {name: max(math.prod(shape) for shape in _residual_shapes(f, x))
             for name, f in paths.items()}
  assert largest['autodiff'] >= weights_size, largest
  assert largest['kernel'] <= x.size and largest['xla'] <= x.size, largest
  assert jaxprs.ffi_targets(paths['kernel'], x) == {'instaflow_attention_forward'}


@pytest.mark.slow  # a sweep beside the parity test of the quick tier
def test_recomputed_in_backward_gives_the_gradients_and_keeps_only_the_inputs():
  x = jnp.asarray(np.random.RandomState(0).randn(2, 16, 16, 32), jnp.float32)
  scale, bias = jnp.full((32,), 1.5), jnp.full((32,), 0.25)

  def group_norm_silu(x, scale, bias):
    g = x.reshape(2, -1, 4, 8)
    g = (g - g.mean(axis=(1, 3), keepdims=True)) / jnp.sqrt(g.var(axis=(1, 3), keepdims=True) + 1e-5)
    return jax.nn.silu(g.reshape(x.shape) * scale + bias)

  recomputed = cpu.recomputed_in_backward(group_norm_silu)
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
  for a, b in zip(jax.grad(loss(recomputed), argnums=(0, 1, 2))(x, scale, bias),
                  jax.grad(loss(group_norm_silu), argnums=(0, 1, 2))(x, scale, bias)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert _residual_shapes(recomputed, x, scale, bias) == [x.shape, scale.shape, bias.shape]
  autodiff_kept = [s for s in _residual_shapes(group_norm_silu, x, scale, bias)
                   if math.prod(s) == x.size]
  assert len(autodiff_kept) >= 2, autodiff_kept  # what the recomputation spares


@pytest.mark.parametrize('ours,flax_', [
    (lambda: layers.dense(64, None), lambda: nn.Dense(64)),
    (lambda: layers.conv(64, None), lambda: nn.Conv(64, (3, 3))),
])
def test_dense_and_conv_give_flax_gradients_through_their_own_backward_pass(ours, flax_):
  """The kernel's gradient computed after the input's (kernel_grad_after_input_grad), so
  that a donated kernel is updated in place: the same values and gradients as flax's
  layers. The copies of the kernels it saves: benchmarks/remat_memory.py."""
  x = jnp.asarray(np.random.RandomState(4).randn(2, 8, 8, 64), jnp.float32)
  params = nn.meta.unbox(flax_().init(jax.random.key(0), x))

  def value_and_grads(make_layer):
    loss = lambda p, x: jnp.sum(jnp.sin(make_layer().apply(p, x)))
    return jax.value_and_grad(loss, argnums=(0, 1))(params, x)

  assert 'custom_vjp_call' in jaxprs.primitives(lambda x: ours().apply(params, x), x)
  for got, expected in zip(jax.tree.leaves(value_and_grads(ours)),
                           jax.tree.leaves(value_and_grads(flax_))):
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
