"""The CPU formulations in models/layers.py against the XLA primitives they replace, and the
custom backward passes that keep the training step's memory down: same gradients, and the
memory they save shown in the compiled executable's temporary buffers."""
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
@pytest.mark.slow  # a sweep beside the parity test of the quick tier
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
  plain = lambda x, kernel: _lax_conv(layers.upsample_nearest_2x(x), kernel, (1, 1),
                                      ((1, 1), (1, 1))) + params['bias']
  uses_library_conv = 'conv_general_dilated' in str(jax.make_jaxpr(ours)(x, params['kernel']))
  assert uses_library_conv == (height * width > layers._CPU_MATMUL_CONV_MAX_PIXELS)
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
  for cpu_attention in (layers._attention_on_cpu, layers._xla_attention_on_cpu):
    ours = lambda q, k, v, **kw: cpu_attention(q, k, v, kw['is_causal'], kw['mask'])
    got = jax.value_and_grad(lambda *t: loss(ours, *t), argnums=(0, 1, 2))(q, k, v)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_group_norm_checks_the_groups():
  with pytest.raises(ValueError, match='6 channels do not divide into 4 groups'):
    layers.group_norm(4, 1e-5, 'norm').init(jax.random.key(0), jnp.zeros((1, 2, 2, 6)))


def _temp_bytes(fn, *args, donate=()) -> int:
  compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def _chain_grad(layer, depth):
  """The gradient of a chain of `depth` layers x -> x + layer(x)."""
  def loss(x):
    for _ in range(depth):
      x = x + layer(x)
    return jnp.sum(jnp.sin(x))
  return jax.grad(loss)


def test_cpu_attention_keeps_no_weights_per_layer_for_the_backward_pass():
  """Autodiff keeps each layer's [batch, heads, q, kv] weights until the backward pass; the
  recomputing backward passes (the kernel's and the XLA formulation's) keep q, k, v, the
  output and the log-sum-exp."""
  x = jnp.ones((2, 128, 2, 8))
  weights_bytes = 2 * 2 * 128 * 128 * 4
  paths = {'kernel': lambda t: layers._attention_on_cpu(t, t, t, False, None),
           'xla': lambda t: layers._xla_attention_on_cpu(t, t, t, False, None),
           'autodiff': lambda t: jax.nn.dot_product_attention(t, t, t)}
  growth = {name: _temp_bytes(_chain_grad(f, 6), x) - _temp_bytes(_chain_grad(f, 2), x)
            for name, f in paths.items()}
  assert growth['autodiff'] >= 4 * weights_bytes, growth        # one a layer at least
  assert growth['xla'] < 2 * weights_bytes, growth             # under half of one a layer
  assert growth['kernel'] < 2 * weights_bytes, growth


@pytest.mark.slow  # a sweep beside the parity test of the quick tier
def test_recomputed_in_backward_gives_the_gradients_and_keeps_only_the_input():
  x = jnp.asarray(np.random.RandomState(0).randn(2, 16, 16, 32), jnp.float32)
  scale, bias = jnp.full((32,), 1.5), jnp.full((32,), 0.25)

  def group_norm_silu(x, scale, bias):
    g = x.reshape(2, -1, 4, 8)
    g = (g - g.mean(axis=(1, 3), keepdims=True)) / jnp.sqrt(g.var(axis=(1, 3), keepdims=True) + 1e-5)
    return jax.nn.silu(g.reshape(x.shape) * scale + bias)

  recomputed = layers.recomputed_in_backward(group_norm_silu)
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
  for a, b in zip(jax.grad(loss(recomputed), argnums=(0, 1, 2))(x, scale, bias),
                  jax.grad(loss(group_norm_silu), argnums=(0, 1, 2))(x, scale, bias)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  tensor_bytes = x.size * 4
  growth = {name: _temp_bytes(_chain_grad(lambda t: f(t, scale, bias), 6), x)
            - _temp_bytes(_chain_grad(lambda t: f(t, scale, bias), 2), x)
            for name, f in (('ours', recomputed), ('autodiff', group_norm_silu))}
  assert growth['autodiff'] >= 4 * 2 * tensor_bytes, growth   # two or more tensors a layer
  assert growth['ours'] <= 4 * 1.25 * tensor_bytes, growth    # the layer's input


def test_dense_and_conv_updated_in_place_without_copies_of_their_kernels():
  """A donated kernel updated in place: with the kernel's gradient tied after the input's,
  XLA copies no kernel parameter (flax's layers: copies kept for the whole step)."""
  x = jnp.ones((4, 8, 8, 64))

  def kernel_copies(make_layer, kernel_shape):
    model = nn.Sequential([make_layer() for _ in range(4)])
    params = model.init(jax.random.key(0), x)

    def step(params):
      grads = jax.grad(lambda p: jnp.sum(jnp.sin(model.apply(p, x))))(params)
      return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

    hlo = jax.jit(step, donate_argnums=0).lower(params).compile().as_text()
    shape = 'f32[' + ','.join(map(str, kernel_shape)) + ']'
    return sum(f'{shape}{{' in line and ' copy(%params' in line for line in hlo.splitlines())

  ours = {'dense': kernel_copies(lambda: layers.dense(64, None), (64, 64)),
          'conv': kernel_copies(lambda: layers.conv(64, None), (3, 3, 64, 64))}
  flax_ = {'dense': kernel_copies(lambda: nn.Dense(64), (64, 64)),
           'conv': kernel_copies(lambda: nn.Conv(64, (3, 3)), (3, 3, 64, 64))}
  assert ours == {'dense': 0, 'conv': 0} and min(flax_.values()) > 0, (ours, flax_)
