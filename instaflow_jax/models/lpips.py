"""LPIPS v0.1 (Zhang et al. 2018), the `lpips` package's `LPIPS(net='vgg'|'alex', lpips=True,
spatial=False)` in flax.linen on NHWC images in [-1, 1].

Both images go through a frozen classification trunk (torchvision's VGG16 or AlexNet
`features`, cut into five slices after a ReLU); each slice's output is unit-normalised over
channels, the squared difference of the two images is weighted per channel by a 1x1
non-negative `lin` layer, averaged over space, and the five layers are summed.

Parameter names mirror the torch state dict of `lpips.LPIPS`: the trunk conv at torchvision
feature index i of slice s is 'net/slice{s}_{i}' (torch 'net.slice{s}.{i}'), and layer k's
weighting is 'lin{k}/model_1' (torch 'lin{k}.model.1': index 0 is a dropout, inactive at
evaluation). The ScalingLayer's shift and scale are fixed constants here, not parameters.
"""
from typing import Any, List, NamedTuple, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from instaflow_jax.models import layers

Dtype = Any

# lpips' ScalingLayer: (x - shift) / scale maps [-1, 1] images to ImageNet-normalised input.
INPUT_SHIFT = np.array([-.030, -.088, -.188], np.float32)
INPUT_SCALE = np.array([.458, .448, .450], np.float32)
# lpips.normalize_tensor's epsilon.
_NORM_EPS = 1e-10


class Conv(NamedTuple):
  """A torchvision Conv2d followed (as the next feature index) by its ReLU."""
  features: int
  kernel: int
  stride: int = 1
  padding: int = 1


class MaxPool(NamedTuple):
  """torchvision MaxPool2d without padding, floor mode."""
  window: int
  stride: int


RELU = 'relu'
Layer = Union[Conv, MaxPool, str]


class Trunk(NamedTuple):
  """torchvision's `features` list, by index, and where lpips ends each of its slices."""
  features: Tuple[Layer, ...]
  slice_ends: Tuple[int, ...]


def _vgg16_features() -> Tuple[Layer, ...]:
  """torchvision vgg16 config 'D' up to relu5_3 (its last max-pool is not used)."""
  widths = (64, 64, 'pool', 128, 128, 'pool', 256, 256, 256, 'pool', 512, 512, 512, 'pool',
            512, 512, 512)
  features = []
  for width in widths:
    features += [MaxPool(2, 2)] if width == 'pool' else [Conv(width, 3), RELU]
  return tuple(features)


TRUNKS = {
    # Slices end after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
    'vgg': Trunk(_vgg16_features(), (4, 9, 16, 23, 30)),
    # Slices end after relu1..relu5 (torchvision alexnet's last max-pool is not used).
    'alex': Trunk((Conv(64, 11, 4, 2), RELU, MaxPool(3, 2), Conv(192, 5, 1, 2), RELU,
                   MaxPool(3, 2), Conv(384, 3), RELU, Conv(256, 3), RELU, Conv(256, 3), RELU),
                  (2, 5, 8, 10, 12)),
}


def trunk(net: str) -> Trunk:
  if net not in TRUNKS:
    raise ValueError(f'LPIPS net={net!r} is not supported; use one of {sorted(TRUNKS)}')
  return TRUNKS[net]


def trunk_slices(net: str) -> Tuple[range, ...]:
  """The torchvision feature indices of lpips' slice1..slice5, as pretrained_networks cuts them."""
  ends = trunk(net).slice_ends
  return tuple(range(start, end) for start, end in zip((0,) + ends[:-1], ends))


def slice_channels(net: str) -> Tuple[int, ...]:
  """The width of each slice's output (lpips' `chns`)."""
  features = trunk(net).features
  return tuple([features[i] for i in indices if isinstance(features[i], Conv)][-1].features
               for indices in trunk_slices(net))


def normalize_channels(x: jax.Array) -> jax.Array:
  """lpips.normalize_tensor: each position's feature vector divided by its L2 norm (+ eps)."""
  return x / (jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True)) + _NORM_EPS)


class TrunkNet(nn.Module):
  """lpips' pretrained_networks.vgg16 / alexnet: the outputs of the five slices."""
  net: str
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> List[jax.Array]:
    features = trunk(self.net).features
    outputs = []
    for s, indices in enumerate(trunk_slices(self.net), start=1):
      for i in indices:
        x = self._layer(features[i], f'slice{s}_{i}', x)
      outputs.append(x)
    return outputs

  def _layer(self, layer: Layer, name: str, x: jax.Array) -> jax.Array:
    if isinstance(layer, Conv):
      return layers.conv(layer.features, name, kernel_size=layer.kernel, strides=layer.stride,
                         padding=layer.padding, dtype=self.dtype, param_dtype=self.param_dtype)(x)
    if isinstance(layer, MaxPool):
      return nn.max_pool(x, (layer.window,) * 2, strides=(layer.stride,) * 2, padding='VALID')
    return nn.relu(x)


class NetLinLayer(nn.Module):
  """lpips' NetLinLayer at evaluation: a bias-free 1x1 conv to one channel (its dropout,
  model.0, does nothing outside training, and LPIPS is never trained here)."""
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return layers.conv(1, 'model_1', kernel_size=1, padding=0, use_bias=False,
                       param_dtype=self.param_dtype)(x)


class LPIPS(nn.Module):
  """LPIPS v0.1 distance between two batches of NHWC images in [-1, 1]: `(x, y) -> [B]`.

  The trunk computes in `dtype`; the normalisation and the distance head stay in float32,
  where the spatial mean keeps its precision.
  """
  net: str = 'vgg'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    if x.shape != y.shape:
      raise ValueError(f'LPIPS compares images of one shape, got {x.shape} and {y.shape}')
    batch = x.shape[0]
    # One trunk pass over both batches (samples do not interact).
    images = (jnp.concatenate([x, y]).astype(jnp.float32) - INPUT_SHIFT) / INPUT_SCALE
    outputs = TrunkNet(self.net, dtype=self.dtype, param_dtype=self.param_dtype,
                       name='net')(images.astype(self.dtype))
    distance = jnp.zeros((batch,), jnp.float32)
    for k, features in enumerate(outputs):
      features = normalize_channels(features.astype(jnp.float32))
      diff = jnp.square(features[:batch] - features[batch:])
      weighted = NetLinLayer(param_dtype=self.param_dtype, name=f'lin{k}')(diff)
      distance = distance + jnp.mean(weighted, axis=(1, 2, 3))
    return distance

  def example_inputs(self, batch_size: int = 1) -> Tuple[jax.Array, jax.Array]:
    image = jnp.zeros((batch_size, 64, 64, 3), jnp.float32)
    return image, image
