"""The Stable Diffusion VAE: diffusers' `AutoencoderKL` in flax.linen, on NHWC arrays.

Module and parameter names follow diffusers' module tree (encoder/down_blocks_0/resnets_0/...,
encoder/mid_block/attentions_0/to_q, quant_conv, post_quant_conv, decoder/up_blocks_0/...), so a
diffusers state dict converts with the shared rename rule in instaflow_jax/convert/torch_names.py.
Older diffusers files name the mid-block attention weights differently; the converter
(convert/diffusers.py) brings them to today's names first.
"""
import dataclasses
from typing import Any, Dict, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from instaflow_jax.models import layers

Dtype = Any

_DOWN_BLOCK = 'DownEncoderBlock2D'
_UP_BLOCK = 'UpDecoderBlock2D'
# diffusers builds every norm of the VAE with this epsilon.
_NORM_EPS = 1e-6
# DiagonalGaussianDistribution clamps the log-variance to this range.
_LOGVAR_RANGE = (-30.0, 20.0)
# Fields that a config.json holds as lists and we hold as tuples (hashable).
_SEQUENCE_FIELDS = ('down_block_types', 'up_block_types', 'block_out_channels', 'sample_size',
                    'latents_mean', 'latents_std')


def _config_error(key: str, value: Any, why: str = 'is not supported') -> ValueError:
  return ValueError(f'autoencoder config: {key}={value!r} {why}')


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
  """diffusers' AutoencoderKL config; defaults are diffusers' defaults.

  scaling_factor, shift_factor, latents_mean and latents_std do not change the network: they
  are kept for the pipeline, which maps latents to the diffusion model's scale and back.
  """
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: Tuple[str, ...] = (_DOWN_BLOCK,)
  up_block_types: Tuple[str, ...] = (_UP_BLOCK,)
  block_out_channels: Tuple[int, ...] = (64,)
  layers_per_block: int = 1
  act_fn: str = 'silu'
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: Union[int, Tuple[int, ...]] = 32
  scaling_factor: float = 0.18215
  shift_factor: Optional[float] = None
  latents_mean: Optional[Tuple[float, ...]] = None
  latents_std: Optional[Tuple[float, ...]] = None
  force_upcast: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  def __post_init__(self):
    for name in _SEQUENCE_FIELDS:
      value = getattr(self, name)
      if isinstance(value, (list, tuple)):
        object.__setattr__(self, name, tuple(value))
    self._validate()

  @property
  def downsample_factor(self) -> int:
    """Pixels per latent along each side."""
    return 2 ** (len(self.block_out_channels) - 1)

  def _validate(self):
    levels = len(self.block_out_channels)
    if levels == 0:
      raise _config_error('block_out_channels', self.block_out_channels, 'must not be empty')
    for key, supported in (('down_block_types', _DOWN_BLOCK), ('up_block_types', _UP_BLOCK)):
      types = getattr(self, key)
      if any(t != supported for t in types):
        raise _config_error(key, types, f'is not supported (only {supported!r} blocks)')
      if len(types) != levels:
        raise _config_error(key, types, f'must have one entry per block_out_channels ({levels})')
    try:
      layers.activation(self.act_fn)
    except ValueError as e:
      raise _config_error('act_fn', self.act_fn, f'is not supported ({e})') from None
    if any(c % self.norm_num_groups for c in self.block_out_channels):
      raise _config_error('norm_num_groups', self.norm_num_groups,
                          f'does not divide block_out_channels={self.block_out_channels}')

  @classmethod
  def from_diffusers_config(cls, d: Dict[str, Any]) -> 'AutoencoderConfig':
    """Reads diffusers' AutoencoderKL config.json dict; an unknown key is an error."""
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
      if key.startswith('_'):
        continue
      if key not in known:
        raise _config_error(key, value)
      kwargs[key] = value
    return cls(**kwargs)

  def to_diffusers_config(self) -> Dict[str, Any]:
    """A config.json dict that diffusers' AutoencoderKL.from_config accepts."""
    d = {'_class_name': 'AutoencoderKL'}
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      d[f.name] = list(value) if isinstance(value, tuple) else value
    return d


def _resnet(config: AutoencoderConfig, out_channels: int, name: str, kw: dict) -> nn.Module:
  """A ResnetBlock2D without a time embedding (diffusers' temb_channels=None)."""
  return layers.ResnetBlock2D(out_channels, config.norm_num_groups, _NORM_EPS, config.act_fn,
                              name=name, **kw)


class SpatialSelfAttention(nn.Module):
  """The mid-block attention: group norm, one-head self-attention over pixels, residual.

  The projections are layers.Attention sharing this module's scope, so that group_norm and
  to_q/to_k/to_v/to_out_0 sit side by side as in diffusers.
  """
  config: AutoencoderConfig
  channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.attention = layers.Attention(
        heads=1, head_dim=self.channels, out_features=self.channels, qkv_bias=True,
        dtype=self.dtype, param_dtype=self.param_dtype)
    nn.share_scope(self, self.attention)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, height, width, channels = x.shape
    h = layers.group_norm(self.config.norm_num_groups, _NORM_EPS, 'group_norm',
                          dtype=self.dtype, param_dtype=self.param_dtype)(x)
    h = self.attention(h.reshape(batch, height * width, channels))
    return x + h.reshape(x.shape)


class UNetMidBlock2D(nn.Module):
  """resnets_0, then (attentions_0 unless disabled) and resnets_1, at constant width."""
  config: AutoencoderConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    channels = x.shape[-1]
    x = _resnet(self.config, channels, 'resnets_0', kw)(x)
    if self.config.mid_block_add_attention:
      x = SpatialSelfAttention(self.config, channels, name='attentions_0', **kw)(x)
    return _resnet(self.config, channels, 'resnets_1', kw)(x)


class DownEncoderBlock2D(nn.Module):
  """layers_per_block resnets, then a downsampler except on the last level."""
  config: AutoencoderConfig
  out_channels: int
  add_downsample: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(self.config.layers_per_block):
      x = _resnet(self.config, self.out_channels, f'resnets_{i}', kw)(x)
    if self.add_downsample:
      # diffusers' VAE pads the stride-2 conv by one pixel on the bottom/right only.
      x = layers.Downsample2D(self.out_channels, padding=0, name='downsamplers_0', **kw)(x)
    return x


class UpDecoderBlock2D(nn.Module):
  """layers_per_block + 1 resnets, then an upsampler except on the last level."""
  config: AutoencoderConfig
  out_channels: int
  add_upsample: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(self.config.layers_per_block + 1):
      x = _resnet(self.config, self.out_channels, f'resnets_{i}', kw)(x)
    if self.add_upsample:
      x = layers.Upsample2D(self.out_channels, name='upsamplers_0', **kw)(x)
    return x


def _output_head(x: jax.Array, features: int, config: AutoencoderConfig, kw: dict) -> jax.Array:
  """conv_norm_out, SiLU (whatever act_fn says, as in diffusers), conv_out."""
  x = layers.group_norm(config.norm_num_groups, _NORM_EPS, 'conv_norm_out', activation='silu',
                        **kw)(x)
  return layers.conv(features, 'conv_out', **kw)(x)


class Encoder(nn.Module):
  """Images [B, H, W, in_channels] -> moments [B, H/f, W/f, 2 * latent_channels]."""
  config: AutoencoderConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.conv(c.block_out_channels[0], 'conv_in', **kw)(x)
    last = len(c.block_out_channels) - 1
    for i, channels in enumerate(c.block_out_channels):
      x = DownEncoderBlock2D(c, channels, add_downsample=i < last, name=f'down_blocks_{i}', **kw)(x)
    x = UNetMidBlock2D(c, name='mid_block', **kw)(x)
    return _output_head(x, 2 * c.latent_channels, c, kw)


class Decoder(nn.Module):
  """Latents [B, h, w, latent_channels] -> images [B, h*f, w*f, out_channels]."""
  config: AutoencoderConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.conv(c.block_out_channels[-1], 'conv_in', **kw)(z)
    x = UNetMidBlock2D(c, name='mid_block', **kw)(x)
    last = len(c.block_out_channels) - 1
    for i, channels in enumerate(reversed(c.block_out_channels)):
      x = UpDecoderBlock2D(c, channels, add_upsample=i < last, name=f'up_blocks_{i}', **kw)(x)
    return _output_head(x, c.out_channels, c, kw)


class AutoencoderKL(nn.Module):
  """diffusers' AutoencoderKL. Call `encode` / `decode` through apply(..., method=...).

  No scaling_factor is applied here: as in diffusers pipelines, callers multiply encoded
  latents by config.scaling_factor and divide by it before decoding.
  """
  config: AutoencoderConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = Encoder(c, **kw)
    self.decoder = Decoder(c, **kw)
    if c.use_quant_conv:
      self.quant_conv = layers.conv(2 * c.latent_channels, 'quant_conv', kernel_size=1, **kw)
    if c.use_post_quant_conv:
      self.post_quant_conv = layers.conv(c.latent_channels, 'post_quant_conv', kernel_size=1, **kw)

  def encode(self, images: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """Images in [-1, 1] -> (mean, logvar) of the latent Gaussian, logvar clipped as diffusers."""
    moments = self.encoder(images)
    if self.config.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *_LOGVAR_RANGE)

  def decode(self, latents: jax.Array) -> jax.Array:
    """Unscaled latents -> images (roughly in [-1, 1])."""
    if self.config.use_post_quant_conv:
      latents = self.post_quant_conv(latents)
    return self.decoder(latents)

  def __call__(self, images: jax.Array) -> jax.Array:
    """Reconstructs from the posterior mean; touches every parameter, so `init` uses it."""
    mean, _ = self.encode(images)
    return self.decode(mean)

  def example_inputs(self, batch_size: int = 1) -> Tuple[jax.Array]:
    """An image 4 latent pixels wide at the deepest level."""
    size = 2 ** (len(self.config.block_out_channels) - 1) * 4
    return (jnp.zeros((batch_size, size, size, self.config.in_channels), jnp.float32),)
