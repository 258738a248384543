"""Building blocks shared by every network: layers with logical axis names, norms, attention,
and the convolutional blocks (resnet, down/up-samplers) that the U-Net and the VAE share.

The ops whose best formulation depends on the backend (matmuls, convolutions, norms,
attention) are computed by models/formulations, which chooses per backend.

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

from instaflow_jax.models import formulations
from instaflow_jax.models.formulations import portable

Dtype = Any
# Padding given as torch's symmetric integer padding, or explicit (low, high) pairs per spatial dim.
Padding = Any


def _with_axes(init, axes: Tuple[Optional[str], ...]):
  return nn.with_logical_partitioning(init, axes)


def dense(features: int, name: str, *, use_bias: bool = True, dtype: Dtype = jnp.float32,
          param_dtype: Dtype = jnp.float32,
          axes: Tuple[Optional[str], Optional[str]] = ('embed', 'mlp')) -> 'Dense':
  """A linear layer (torch nn.Linear); `axes` names the (in, out) kernel dimensions."""
  return Dense(features, use_bias, axes, dtype, param_dtype, name=name)


class Dense(nn.Module):
  """nn.Dense's parameters (kernel [in, out], bias) and result."""
  features: int
  use_bias: bool = True
  axes: Tuple[Optional[str], Optional[str]] = ('embed', 'mlp')
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', _with_axes(nn.initializers.lecun_normal(), self.axes),
                        (x.shape[-1], self.features), self.param_dtype)
    y = formulations.linear(x.astype(self.dtype), kernel)
    if self.use_bias:
      bias = self.param('bias', _with_axes(nn.initializers.zeros_init(), (self.axes[1],)),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


def conv(features: int, name: str, *, kernel_size: int = 3, strides: int = 1,
         padding: Padding = None, use_bias: bool = True, upsampled_2x: bool = False,
         dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> 'Conv':
  """A 2-D convolution on NHWC input (torch nn.Conv2d); padding defaults to 'same' for odd
  kernels. With upsampled_2x, of the input up-sampled 2x (nearest) first."""
  if padding is None:
    padding = kernel_size // 2
  if isinstance(padding, int):
    padding = ((padding, padding), (padding, padding))
  return Conv(features, kernel_size, strides, tuple(map(tuple, padding)), use_bias,
              upsampled_2x, dtype, param_dtype, name=name)


class Conv(nn.Module):
  """nn.Conv's parameters (kernel HWIO, bias) and result."""
  features: int
  kernel_size: int
  strides: int
  padding: Tuple[Tuple[int, int], Tuple[int, int]]
  use_bias: bool = True
  upsampled_2x: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = self.param(
        'kernel', _with_axes(nn.initializers.lecun_normal(), (None, None, 'conv_in', 'conv_out')),
        (k, k, x.shape[-1], self.features), self.param_dtype)
    y = formulations.conv(x.astype(self.dtype), kernel, (self.strides, self.strides),
                          self.padding, self.upsampled_2x)
    if self.use_bias:
      bias = self.param('bias', _with_axes(nn.initializers.zeros_init(), ('conv_out',)),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


def group_norm(num_groups: int, epsilon: float, name: str, *, activation: Optional[str] = None,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> 'GroupNorm':
  """torch nn.GroupNorm over the channel (last) axis, then `activation` if given."""
  return GroupNorm(num_groups, epsilon, activation, dtype, param_dtype, name=name)


class GroupNorm(nn.Module):
  """nn.GroupNorm's parameters (scale, bias) and torch's result: statistics in float32 with
  the two-pass variance (the fast variance loses parity), then `activation` if given.

  The sums run over the pixels first, then over each group's channels: XLA on a CPU runs
  nn.GroupNorm's one reduction over the (pixels, group channels) axes slower than these
  two, forward and backward, and no backend runs them slower.
  """
  num_groups: int
  epsilon: float
  activation: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    if channels % self.num_groups:
      raise ValueError(f'{self.name}: {channels} channels do not divide into '
                       f'{self.num_groups} groups')
    scale = self.param('scale', _with_axes(nn.initializers.ones_init(), ('norm',)),
                       (channels,), self.param_dtype)
    bias = self.param('bias', _with_axes(nn.initializers.zeros_init(), ('norm',)),
                      (channels,), self.param_dtype)
    per_group = channels // self.num_groups
    act = activation(self.activation) if self.activation else (lambda y: y)

    def normalise(x, scale, bias):
      flat = x.astype(jnp.float32).reshape(x.shape[0], -1, channels)
      count = flat.shape[1] * per_group

      def group_mean(values):  # [batch, pixels, channels] -> [batch, 1, channels]
        sums = jnp.sum(values, axis=1).reshape(x.shape[0], self.num_groups, per_group)
        return jnp.repeat(jnp.sum(sums, axis=-1) / count, per_group, axis=-1)[:, None, :]

      centred = flat - group_mean(flat)
      inv_std = jax.lax.rsqrt(group_mean(jnp.square(centred)) + self.epsilon)
      y = centred * (inv_std * scale.astype(jnp.float32)) + bias.astype(jnp.float32)
      return act(y.reshape(x.shape).astype(self.dtype))

    return formulations.group_norm(normalise, x, scale, bias, num_groups=self.num_groups,
                                   epsilon=self.epsilon, activation=self.activation)


def layer_norm(epsilon: float, name: str, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32) -> 'LayerNorm':
  """torch nn.LayerNorm over the last axis."""
  return LayerNorm(epsilon, dtype, param_dtype, name=name)


class LayerNorm(nn.Module):
  """nn.LayerNorm's parameters (scale, bias) and torch's result: float32 statistics, the
  two-pass variance."""
  epsilon: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param('scale', _with_axes(nn.initializers.ones_init(), ('norm',)),
                       (features,), self.param_dtype)
    bias = self.param('bias', _with_axes(nn.initializers.zeros_init(), ('norm',)),
                      (features,), self.param_dtype)

    def normalise(x, scale, bias):
      x = x.astype(jnp.float32)
      centred = x - jnp.mean(x, axis=-1, keepdims=True)
      inv_std = jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
                              + self.epsilon)
      y = centred * inv_std * scale.astype(jnp.float32) + bias.astype(jnp.float32)
      return y.astype(self.dtype)

    return formulations.recomputed(normalise)(x, scale, bias)


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
    out = formulations.attention(split(q), split(k), split(v))
    out = out.reshape(out.shape[:-2] + (inner,))
    return dense(self.out_features, 'to_out_0', axes=('mlp', 'embed'), **kw)(out)


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
    return portable.upsample_nearest_2x(x)
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
    norm = lambda name: group_norm(self.groups, self.eps, name, activation=self.act_fn, **kw)
    h = conv(self.out_channels, 'conv1', **kw)(norm('norm1')(x))
    if temb is not None:
      temb = activation(self.act_fn)(temb)
      h = h + dense(self.out_channels, 'time_emb_proj', **kw)(temb)[:, None, None, :]
    h = norm('norm2')(h)
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
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if size is None or tuple(size) == (2 * x.shape[1], 2 * x.shape[2]):
      return conv(self.out_channels, 'conv', upsampled_2x=True, **kw)(x)
    return conv(self.out_channels, 'conv', **kw)(upsample_nearest(x, size))


def tuple_of(value: Any, length: int) -> Tuple[Any, ...]:
  """A per-block setting given as one value or a sequence, as a tuple of `length`."""
  if isinstance(value, Sequence) and not isinstance(value, str):
    if len(value) != length:
      raise ValueError(f'expected {length} per-block values, got {len(value)}: {value}')
    return tuple(value)
  return (value,) * length
