"""Building blocks shared by every network: layers with logical axis names, norms, attention,
and the convolutional blocks (resnet, down/up-samplers) that the U-Net and the VAE share.

Every parameter is created through `nn.with_logical_partitioning`, so a model can be
sharded later by mapping logical names (below) to mesh axes, without touching the model.
Module names mirror the diffusers/transformers module tree, which is what makes
conversion a rename rule (see instaflow_jax/convert/torch_names.py).

Logical parameter axes used across the package:
  embed      the model width entering a dense layer
  mlp        the width leaving a dense layer
  conv_in    input channels of a convolution
  conv_out   output channels of a convolution
  norm       the channel axis of a norm's scale/bias
  vocab      rows of an embedding table
"""
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
# Padding given as torch's symmetric integer padding, or explicit (low, high) pairs per spatial dim.
Padding = Any


def _with_axes(init, axes: Tuple[Optional[str], ...]):
  return nn.with_logical_partitioning(init, axes)


def dense(features: int, name: str, *, use_bias: bool = True, dtype: Dtype = jnp.float32,
          param_dtype: Dtype = jnp.float32,
          axes: Tuple[Optional[str], Optional[str]] = ('embed', 'mlp')) -> nn.Dense:
  """A linear layer (torch nn.Linear); `axes` names the (in, out) kernel dimensions."""
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=_with_axes(nn.initializers.lecun_normal(), axes),
      bias_init=_with_axes(nn.initializers.zeros_init(), (axes[1],)),
      name=name)


def conv(features: int, name: str, *, kernel_size: int = 3, strides: int = 1,
         padding: Padding = None, use_bias: bool = True, dtype: Dtype = jnp.float32,
         param_dtype: Dtype = jnp.float32) -> nn.Conv:
  """A 2-D convolution on NHWC input (torch nn.Conv2d); padding defaults to 'same' for odd kernels."""
  if padding is None:
    padding = kernel_size // 2
  if isinstance(padding, int):
    padding = ((padding, padding), (padding, padding))
  return nn.Conv(
      features, (kernel_size, kernel_size), strides=(strides, strides), padding=padding,
      use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=_with_axes(nn.initializers.lecun_normal(), (None, None, 'conv_in', 'conv_out')),
      bias_init=_with_axes(nn.initializers.zeros_init(), ('conv_out',)),
      name=name)


def group_norm(num_groups: int, epsilon: float, name: str, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32) -> nn.GroupNorm:
  """torch nn.GroupNorm over the channel (last) axis. Statistics are computed in float32 and
  with the two-pass variance, as torch does, because the fast variance loses parity."""
  return nn.GroupNorm(
      num_groups=num_groups, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
      use_fast_variance=False, force_float32_reductions=True,
      scale_init=_with_axes(nn.initializers.ones_init(), ('norm',)),
      bias_init=_with_axes(nn.initializers.zeros_init(), ('norm',)),
      name=name)


def layer_norm(epsilon: float, name: str, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32) -> nn.LayerNorm:
  """torch nn.LayerNorm over the last axis (two-pass variance, float32 statistics)."""
  return nn.LayerNorm(
      epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
      force_float32_reductions=True,
      scale_init=_with_axes(nn.initializers.ones_init(), ('norm',)),
      bias_init=_with_axes(nn.initializers.zeros_init(), ('norm',)),
      name=name)


def embedding(num_embeddings: int, features: int, name: str, *, dtype: Dtype = jnp.float32,
              param_dtype: Dtype = jnp.float32) -> nn.Embed:
  """torch nn.Embedding."""
  return nn.Embed(
      num_embeddings, features, dtype=dtype, param_dtype=param_dtype,
      embedding_init=_with_axes(nn.initializers.normal(stddev=0.02), ('vocab', 'embed')),
      name=name)


def activation(name: str):
  """The activation functions that diffusers/transformers configs name."""
  fns = {
      'silu': nn.silu,
      'swish': nn.silu,
      'gelu': lambda x: nn.gelu(x, approximate=False),
      'gelu_pytorch_tanh': lambda x: nn.gelu(x, approximate=True),
      'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),
      'relu': nn.relu,
  }
  if name not in fns:
    raise ValueError(f'activation {name!r} is not supported; use one of {sorted(fns)}')
  return fns[name]


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                          is_causal: bool = False, mask: Optional[jax.Array] = None) -> jax.Array:
  """Multi-head attention on [batch, length, heads, head_dim] tensors.

  Goes through jax.nn.dot_product_attention so that the fused cuDNN kernel is used on
  GPU; the softmax is computed in float32 whatever the input dtype. `mask` (boolean,
  broadcastable to [batch, heads, q_length, kv_length]) marks the keys that may be seen.
  """
  return jax.nn.dot_product_attention(query, key, value, mask=mask, is_causal=is_causal)


class Attention(nn.Module):
  """diffusers' `Attention` (to_q, to_k, to_v, to_out.0) on [batch, tokens, channels].

  Self-attention when `context` is None, cross-attention otherwise.
  """
  heads: int
  head_dim: int
  out_features: int
  qkv_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: Optional[jax.Array] = None) -> jax.Array:
    context = x if context is None else context
    inner = self.heads * self.head_dim
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q = dense(inner, 'to_q', use_bias=self.qkv_bias, **kw)(x)
    k = dense(inner, 'to_k', use_bias=self.qkv_bias, **kw)(context)
    v = dense(inner, 'to_v', use_bias=self.qkv_bias, **kw)(context)
    split = lambda t: t.reshape(t.shape[:-1] + (self.heads, self.head_dim))
    out = dot_product_attention(split(q), split(k), split(v))
    out = out.reshape(out.shape[:-2] + (inner,))
    return dense(self.out_features, 'to_out_0', axes=('mlp', 'embed'), **kw)(out)


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
  """torch F.interpolate(scale_factor=2, mode='nearest') on NHWC."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source rows of torch's nearest interpolation to an explicit size (float32 scale)."""
  scale = np.float32(in_size) / np.float32(out_size)
  index = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int32)
  return np.minimum(index, in_size - 1)


def upsample_nearest(x: jax.Array, size: Tuple[int, int]) -> jax.Array:
  """torch F.interpolate(mode='nearest') of NHWC `x` to spatial `size`.

  diffusers' U-Net forces the size of its skip connection when the input size is not a
  multiple of the total down-sampling factor; otherwise it is exactly 2x.
  """
  if tuple(size) == (2 * x.shape[1], 2 * x.shape[2]):
    return upsample_nearest_2x(x)
  for axis, out_size in zip((1, 2), size):
    x = jnp.take(x, _nearest_indices(x.shape[axis], out_size), axis=axis)
  return x


class ResnetBlock2D(nn.Module):
  """diffusers' ResnetBlock2D (no dropout): norm1, act, conv1, [+ time_emb_proj(act(temb))],
  norm2, act, conv2; a 1x1 conv_shortcut when the width changes; (shortcut + h) /
  output_scale_factor.

  Called without `temb`, it has no time_emb_proj (diffusers' temb_channels=None), as in the VAE.
  """
  out_channels: int
  groups: int
  eps: float
  act_fn: str
  output_scale_factor: float = 1.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: Optional[jax.Array] = None) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    act = activation(self.act_fn)
    h = act(group_norm(self.groups, self.eps, 'norm1', **kw)(x))
    h = conv(self.out_channels, 'conv1', **kw)(h)
    if temb is not None:
      h = h + dense(self.out_channels, 'time_emb_proj', **kw)(act(temb))[:, None, None, :]
    h = act(group_norm(self.groups, self.eps, 'norm2', **kw)(h))
    h = conv(self.out_channels, 'conv2', **kw)(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 'conv_shortcut', kernel_size=1, **kw)(x)
    return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
  """A stride-2 3x3 conv; torch padding 0 means diffusers' explicit (0, 1) bottom/right pad."""
  out_channels: int
  padding: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    padding = self.padding if self.padding else ((0, 1), (0, 1))
    return conv(self.out_channels, 'conv', strides=2, padding=padding, dtype=self.dtype,
                param_dtype=self.param_dtype)(x)


class Upsample2D(nn.Module):
  """Nearest up-sampling to `size` (exactly 2x when None, like diffusers' output_size), then a
  3x3 conv."""
  out_channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, size: Optional[Tuple[int, int]] = None) -> jax.Array:
    if size is None:
      size = (2 * x.shape[1], 2 * x.shape[2])
    return conv(self.out_channels, 'conv', dtype=self.dtype,
                param_dtype=self.param_dtype)(upsample_nearest(x, size))


def tuple_of(value: Any, length: int) -> Tuple[Any, ...]:
  """A per-block setting given as one value or a sequence, as a tuple of `length`."""
  if isinstance(value, Sequence) and not isinstance(value, str):
    if len(value) != length:
      raise ValueError(f'expected {length} per-block values, got {len(value)}: {value}')
    return tuple(value)
  return (value,) * length
