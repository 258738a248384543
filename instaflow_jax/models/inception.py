"""The Inception-v3 of FID: pytorch-fid's `InceptionV3()` (use_fid_inception=True, the 2048-d
pool features) in flax.linen on NHWC images in [0, 1].

pytorch-fid ports the TensorFlow graph that the FID paper used (inception-2015-12-05), which
is torchvision's Inception3 with four differences, all kept here: its A, C and first E blocks
average-pool without counting the zero padding (TensorFlow's average pool), the last E block
max-pools instead, and the classifier (unused for FID) has 1008 classes.

Input handling is pytorch-fid's: a bilinear resize to 299x299 (torch's align_corners=False,
no antialiasing, even when shrinking), then [0, 1] -> [-1, 1]. Every conv is torchvision's
BasicConv2d: a bias-free conv, BatchNorm (eps 0.001) with the stored running statistics
(the 'batch_stats' collection), ReLU.

Parameter names mirror the torch module tree of `pytorch_fid.inception.fid_inception_v3()`:
'Conv2d_1a_3x3/conv/kernel', 'Mixed_5b/branch5x5_1/bn/scale', and batch_stats
'Mixed_5b/branch5x5_1/bn/mean'.
"""
import functools
from typing import Any, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Pair = Union[int, Tuple[int, int]]

INPUT_SIZE = 299
FEATURES = 2048
# torchvision's BasicConv2d: nn.BatchNorm2d(out_channels, eps=0.001).
BATCH_NORM_EPS = 1e-3


def _pair(value: Pair) -> Tuple[int, int]:
  return (value, value) if isinstance(value, int) else tuple(value)


def preprocess(images: jax.Array) -> jax.Array:
  """pytorch-fid's input handling: [B, H, W, 3] in [0, 1] -> [B, 299, 299, 3] in [-1, 1].

  jax.image.resize without antialiasing samples like torch's F.interpolate(mode='bilinear',
  align_corners=False): half-pixel centres, and the edge pixel repeated past the border.
  """
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'FID Inception takes NHWC RGB images [B, H, W, 3], got shape {images.shape}')
  size = (images.shape[0], INPUT_SIZE, INPUT_SIZE, 3)
  resized = jax.image.resize(images.astype(jnp.float32), size, 'bilinear', antialias=False)
  return 2.0 * resized - 1.0


def avg_pool_3x3_same(x: jax.Array) -> jax.Array:
  """TensorFlow's 3x3 stride-1 'SAME' average pool: the zero padding is not counted
  (torch F.avg_pool2d(padding=1, count_include_pad=False))."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def max_pool_3x3_same(x: jax.Array) -> jax.Array:
  """torch F.max_pool2d(kernel_size=3, stride=1, padding=1): the padding never wins."""
  return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
  """torch MaxPool2d(kernel_size=3, stride=2): no padding, floor mode."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


class BasicConv2d(nn.Module):
  """torchvision's BasicConv2d at inference: conv (no bias), BatchNorm, ReLU.

  nn.Conv is used directly, not layers.conv, because the factorised 7x1/1x7 and 3x1/1x3
  convolutions need rectangular kernels and paddings.
  """
  features: int
  kernel: Pair
  stride: int = 1
  padding: Pair = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pad_h, pad_w = _pair(self.padding)
    x = nn.Conv(
        self.features, _pair(self.kernel), strides=(self.stride, self.stride),
        padding=((pad_h, pad_h), (pad_w, pad_w)), use_bias=False, dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), (None, None, 'conv_in', 'conv_out')),
        name='conv')(x)
    x = nn.BatchNorm(
        use_running_average=True, epsilon=BATCH_NORM_EPS, dtype=self.dtype,
        param_dtype=self.param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ('norm',)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ('norm',)),
        name='bn')(x)
    return nn.relu(x)


class InceptionA(nn.Module):
  """pytorch-fid's FIDInceptionA (Mixed_5b..5d)."""
  pool_features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv2d, dtype=self.dtype, param_dtype=self.param_dtype)
    branch1x1 = conv(64, 1, name='branch1x1')(x)
    branch5x5 = conv(48, 1, name='branch5x5_1')(x)
    branch5x5 = conv(64, 5, padding=2, name='branch5x5_2')(branch5x5)
    branch3x3dbl = conv(64, 1, name='branch3x3dbl_1')(x)
    branch3x3dbl = conv(96, 3, padding=1, name='branch3x3dbl_2')(branch3x3dbl)
    branch3x3dbl = conv(96, 3, padding=1, name='branch3x3dbl_3')(branch3x3dbl)
    branch_pool = conv(self.pool_features, 1, name='branch_pool')(avg_pool_3x3_same(x))
    return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
  """torchvision's InceptionB (Mixed_6a, the 35x35 -> 17x17 reduction)."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv2d, dtype=self.dtype, param_dtype=self.param_dtype)
    branch3x3 = conv(384, 3, stride=2, name='branch3x3')(x)
    branch3x3dbl = conv(64, 1, name='branch3x3dbl_1')(x)
    branch3x3dbl = conv(96, 3, padding=1, name='branch3x3dbl_2')(branch3x3dbl)
    branch3x3dbl = conv(96, 3, stride=2, name='branch3x3dbl_3')(branch3x3dbl)
    return jnp.concatenate([branch3x3, branch3x3dbl, max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(nn.Module):
  """pytorch-fid's FIDInceptionC (Mixed_6b..6e): 7x7 convolutions factorised into 1x7 and 7x1."""
  channels_7x7: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv2d, dtype=self.dtype, param_dtype=self.param_dtype)
    c7 = self.channels_7x7
    row, column = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    branch1x1 = conv(192, 1, name='branch1x1')(x)
    branch7x7 = conv(c7, 1, name='branch7x7_1')(x)
    branch7x7 = conv(c7, **row, name='branch7x7_2')(branch7x7)
    branch7x7 = conv(192, **column, name='branch7x7_3')(branch7x7)
    branch7x7dbl = conv(c7, 1, name='branch7x7dbl_1')(x)
    branch7x7dbl = conv(c7, **column, name='branch7x7dbl_2')(branch7x7dbl)
    branch7x7dbl = conv(c7, **row, name='branch7x7dbl_3')(branch7x7dbl)
    branch7x7dbl = conv(c7, **column, name='branch7x7dbl_4')(branch7x7dbl)
    branch7x7dbl = conv(192, **row, name='branch7x7dbl_5')(branch7x7dbl)
    branch_pool = conv(192, 1, name='branch_pool')(avg_pool_3x3_same(x))
    return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
  """torchvision's InceptionD (Mixed_7a, the 17x17 -> 8x8 reduction)."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv2d, dtype=self.dtype, param_dtype=self.param_dtype)
    branch3x3 = conv(192, 1, name='branch3x3_1')(x)
    branch3x3 = conv(320, 3, stride=2, name='branch3x3_2')(branch3x3)
    branch7x7x3 = conv(192, 1, name='branch7x7x3_1')(x)
    branch7x7x3 = conv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(branch7x7x3)
    branch7x7x3 = conv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(branch7x7x3)
    branch7x7x3 = conv(192, 3, stride=2, name='branch7x7x3_4')(branch7x7x3)
    return jnp.concatenate([branch3x3, branch7x7x3, max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(nn.Module):
  """pytorch-fid's FIDInceptionE_1 (Mixed_7b, `max_pool=False`) and FIDInceptionE_2
  (Mixed_7c, `max_pool=True`): the TensorFlow graph max-pools in its last block."""
  max_pool: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv2d, dtype=self.dtype, param_dtype=self.param_dtype)
    row, column = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
    branch1x1 = conv(320, 1, name='branch1x1')(x)
    branch3x3 = conv(384, 1, name='branch3x3_1')(x)
    branch3x3 = jnp.concatenate([conv(384, **row, name='branch3x3_2a')(branch3x3),
                                 conv(384, **column, name='branch3x3_2b')(branch3x3)], axis=-1)
    branch3x3dbl = conv(448, 1, name='branch3x3dbl_1')(x)
    branch3x3dbl = conv(384, 3, padding=1, name='branch3x3dbl_2')(branch3x3dbl)
    branch3x3dbl = jnp.concatenate([conv(384, **row, name='branch3x3dbl_3a')(branch3x3dbl),
                                    conv(384, **column, name='branch3x3dbl_3b')(branch3x3dbl)],
                                   axis=-1)
    pooled = max_pool_3x3_same(x) if self.max_pool else avg_pool_3x3_same(x)
    branch_pool = conv(192, 1, name='branch_pool')(pooled)
    return jnp.concatenate([branch1x1, branch3x3, branch3x3dbl, branch_pool], axis=-1)


class FIDInceptionV3(nn.Module):
  """[B, H, W, 3] images in [0, 1] (any size) -> [B, 2048] float32 FID features.

  Apply with {'params': ..., 'batch_stats': ...}; the convs compute in `dtype`, the final
  spatial average in float32.
  """
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = preprocess(images).astype(self.dtype)
    x = BasicConv2d(32, 3, stride=2, name='Conv2d_1a_3x3', **kw)(x)
    x = BasicConv2d(32, 3, name='Conv2d_2a_3x3', **kw)(x)
    x = BasicConv2d(64, 3, padding=1, name='Conv2d_2b_3x3', **kw)(x)
    x = max_pool_3x3_stride2(x)
    x = BasicConv2d(80, 1, name='Conv2d_3b_1x1', **kw)(x)
    x = BasicConv2d(192, 3, name='Conv2d_4a_3x3', **kw)(x)
    x = max_pool_3x3_stride2(x)
    x = InceptionA(32, name='Mixed_5b', **kw)(x)
    x = InceptionA(64, name='Mixed_5c', **kw)(x)
    x = InceptionA(64, name='Mixed_5d', **kw)(x)
    x = InceptionB(name='Mixed_6a', **kw)(x)
    for name, channels_7x7 in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160),
                               ('Mixed_6e', 192)):
      x = InceptionC(channels_7x7, name=name, **kw)(x)
    x = InceptionD(name='Mixed_7a', **kw)(x)
    x = InceptionE(max_pool=False, name='Mixed_7b', **kw)(x)
    x = InceptionE(max_pool=True, name='Mixed_7c', **kw)(x)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))

  def example_inputs(self, batch_size: int = 1) -> Tuple[jax.Array]:
    return (jnp.zeros((batch_size, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32),)
