"""diffusers' `UNet2DConditionModel` (Stable Diffusion 1.x / 2.x) in Flax, NHWC throughout.

conv_in -> down blocks (ResnetBlock2D [+ Transformer2DModel] per layer, then a stride-2
conv) -> mid block (resnet, transformer, resnet) -> up blocks (concatenate a skip, resnet
[+ transformer] per layer, then nearest 2x + conv) -> GroupNorm, act, conv_out. Every
resnet and transformer is conditioned on the sinusoidal timestep embedding and the text
encoder states. Module names mirror diffusers' module tree (down_blocks_0/attentions_1/
transformer_blocks_0/attn2/to_k, ...), so torch weights load through the rename rule in
instaflow_jax/convert/torch_names.py.
"""
import dataclasses
import functools
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from instaflow_jax.models import formulations
from instaflow_jax.models import layers

Dtype = Any

_CLASS_NAME = 'UNet2DConditionModel'
_CROSS_ATTN_DOWN, _DOWN = 'CrossAttnDownBlock2D', 'DownBlock2D'
_CROSS_ATTN_UP, _UP = 'CrossAttnUpBlock2D', 'UpBlock2D'
_MID = 'UNetMidBlock2DCrossAttn'
# Transformer2DModel's fixed norm epsilons (diffusers does not expose them in the U-Net config).
_TRANSFORMER_GROUP_NORM_EPS = 1e-6
_TRANSFORMER_LAYER_NORM_EPS = 1e-5

# diffusers config keys that are not fields here: only their default value (which turns
# the feature off) is supported.
_FIXED_KEYS = {
    'dropout': 0.0,
    'class_embed_type': None,
    'num_class_embeds': None,
    'class_embeddings_concat': False,
    'encoder_hid_dim': None,
    'encoder_hid_dim_type': None,
    'dual_cross_attention': False,
    'time_embedding_type': 'positional',
    'time_embedding_dim': None,
    'time_embedding_act_fn': None,
    'timestep_post_act': None,
    'time_cond_proj_dim': None,
    'conv_in_kernel': 3,
    'conv_out_kernel': 3,
    'attention_type': 'default',
    'reverse_transformer_layers_per_block': None,
}


def _unsupported(key: str, value: Any, why: str = '') -> ValueError:
  return ValueError(f'unet config: {key}={value!r} is not supported{why}')


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """The settings of diffusers' UNet2DConditionModel that define the SD 1.x/2.x computation.

  Defaults are diffusers' defaults, so a config.json that omits a key means the same here.
  As in diffusers, `attention_head_dim` is the number of heads when `num_attention_heads`
  is None (a historical misnomer that every SD config relies on). `upcast_attention` is
  kept for the config's sake: attention softmax is always computed in float32 here.
  `sample_size` does not change the computation.
  """
  sample_size: Optional[Union[int, Tuple[int, int]]] = None
  in_channels: int = 4
  out_channels: int = 4
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  down_block_types: Tuple[str, ...] = (_CROSS_ATTN_DOWN,) * 3 + (_DOWN,)
  mid_block_type: str = _MID
  up_block_types: Tuple[str, ...] = (_UP,) + (_CROSS_ATTN_UP,) * 3
  only_cross_attention: bool = False
  block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int = 2
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  act_fn: str = 'silu'
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: int = 1280
  transformer_layers_per_block: int = 1
  attention_head_dim: Union[int, Tuple[int, ...]] = 8
  num_attention_heads: Optional[Union[int, Tuple[int, ...]]] = None
  use_linear_projection: bool = False
  upcast_attention: bool = False
  resnet_time_scale_shift: str = 'default'
  # 'text': the text encoder states, attention-pooled, join the timestep embedding, so
  # every resnet reads the caption (diffusers' TextTimeEmbedding, as DeepFloyd IF's U-Nets use it).
  addition_embed_type: Optional[str] = None
  addition_embed_type_num_heads: int = 64

  def __post_init__(self):
    levels = len(self.block_out_channels)
    if len(self.down_block_types) != levels or len(self.up_block_types) != levels:
      raise ValueError(
          f'unet config: down_block_types={self.down_block_types}, up_block_types='
          f'{self.up_block_types} and block_out_channels={self.block_out_channels} '
          'must have the same length')
    for key, names, allowed in (('down_block_types', self.down_block_types,
                                 (_CROSS_ATTN_DOWN, _DOWN)),
                                ('up_block_types', self.up_block_types, (_CROSS_ATTN_UP, _UP))):
      for name in names:
        if name not in allowed:
          raise _unsupported(key, names, f' ({name!r}; use {" or ".join(allowed)})')
    fixed = (('mid_block_type', _MID), ('only_cross_attention', False),
             ('resnet_time_scale_shift', 'default'))
    for key, value in fixed:
      if getattr(self, key) != value:
        raise _unsupported(key, getattr(self, key), f' (only {value!r})')
    for key in ('layers_per_block', 'transformer_layers_per_block', 'cross_attention_dim',
                'norm_num_groups'):
      if not isinstance(getattr(self, key), int):
        raise _unsupported(key, getattr(self, key), ' (need one int)')
    if self.addition_embed_type not in (None, 'text'):
      raise _unsupported('addition_embed_type', self.addition_embed_type, " (None or 'text')")
    if self.addition_embed_type and self.cross_attention_dim % self.addition_embed_type_num_heads:
      raise _unsupported('addition_embed_type_num_heads', self.addition_embed_type_num_heads,
                         f' (must divide cross_attention_dim={self.cross_attention_dim})')
    try:
      layers.activation(self.act_fn)
    except ValueError as e:
      raise _unsupported('act_fn', self.act_fn, f' ({e})') from None
    key = 'attention_head_dim' if self.num_attention_heads is None else 'num_attention_heads'
    try:
      heads = self.heads_per_block
    except ValueError as e:
      raise _unsupported(key, getattr(self, key), f' ({e})') from None
    if not all(isinstance(h, int) and h > 0 for h in heads):
      raise _unsupported(key, getattr(self, key), ' (need positive head counts)')

  @property
  def heads_per_block(self) -> Tuple[int, ...]:
    """Attention heads of each down block (up blocks use them reversed, the mid block the last)."""
    heads = self.num_attention_heads or self.attention_head_dim  # diffusers' rule, verbatim
    return layers.tuple_of(heads, len(self.block_out_channels))

  @property
  def time_embed_dim(self) -> int:
    return 4 * self.block_out_channels[0]

  @classmethod
  def from_diffusers_config(cls, d: Dict[str, Any]) -> 'UNetConfig':
    """Reads a UNet2DConditionModel config.json dict.

    Keys starting with '_' and keys that only configure block types or embeddings that
    are unsupported here (resnet_skip_time_act, cross_attention_norm, ...) are ignored;
    a key in _FIXED_KEYS with a non-default value raises ValueError.
    """
    for key, default in _FIXED_KEYS.items():
      if d.get(key, default) != default:
        raise _unsupported(key, d[key])
    names = {field.name for field in dataclasses.fields(cls)}
    as_tuple = lambda v: tuple(v) if isinstance(v, list) else v
    return cls(**{key: as_tuple(value) for key, value in d.items() if key in names})

  def to_diffusers_config(self) -> Dict[str, Any]:
    """A config.json dict that diffusers' UNet2DConditionModel.from_config accepts.

    diffusers refuses num_attention_heads, so a head count given that way is written as
    attention_head_dim, which diffusers reads as the head count.
    """
    d = dataclasses.asdict(self)
    d['attention_head_dim'] = self.num_attention_heads or self.attention_head_dim
    d['num_attention_heads'] = None
    return {'_class_name': _CLASS_NAME, **d}


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool,
                       freq_shift: float, max_period: int = 10000) -> jax.Array:
  """diffusers' get_timestep_embedding: [B] float timesteps -> [B, dim] float32."""
  half = dim // 2
  exponent = jnp.arange(half, dtype=jnp.float32) * np.float32(-math.log(max_period))
  freqs = jnp.exp(exponent / (half - freq_shift))
  args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


# What the backward pass recomputes instead of keeping (remat_policy):
#   none           nothing: autodiff keeps every block's intermediates.
#   attention      the transformer blocks (norms, attention, the 4x-wide feed-forward);
#                  the resnet blocks keep theirs.
#   dots_saveable  every block, keeping the outputs of its projections and convolutions'
#                  matmuls without batch dimensions (not attention's [q, kv] scores).
#   full           every block, keeping only its inputs.
# XLA:CPU drops the optimization barriers remat relies on, so on a CPU it saves nothing;
# the CPU formulations (models/formulations/cpu.py) save memory there instead.
REMAT_POLICIES = ('none', 'attention', 'dots_saveable', 'full')


def check_remat_policy(policy: str) -> str:
  if policy not in REMAT_POLICIES:
    raise ValueError(f'remat policy {policy!r} is unknown; use one of {REMAT_POLICIES}')
  return policy


@functools.lru_cache(maxsize=None)
def _rematted(module_class, policy: str):
  if policy == 'dots_saveable':
    return nn.remat(module_class, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  return nn.remat(module_class)


def _block_class(module_class, policy: str, is_attention: bool):
  """module_class, rematerialised as `policy` says for a block of its kind."""
  if policy == 'none' or (policy == 'attention' and not is_attention):
    return module_class
  return _rematted(module_class, policy)


class TimestepEmbedding(nn.Module):
  """linear_1 -> act -> linear_2 on the sinusoidal embedding."""
  features: int
  act_fn: str
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.activation(self.act_fn)(layers.dense(self.features, 'linear_1', **kw)(x))
    return layers.dense(self.features, 'linear_2', axes=('mlp', 'embed'), **kw)(x)


class AttentionPooling(nn.Module):
  """[B, T, D] -> [B, D]: the tokens' mean plus a learned embedding attends to itself and
  the tokens (padding included, as in diffusers)."""
  heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = x.shape[-1]
    init = nn.with_logical_partitioning(nn.initializers.normal(width ** -0.5), (None, 'embed'))
    position = self.param('positional_embedding', init, (1, width), self.param_dtype)
    query_token = jnp.mean(x, axis=1, keepdims=True) + position.astype(x.dtype)
    tokens = jnp.concatenate([query_token, x], axis=1)
    split = lambda t: t.reshape(t.shape[:-1] + (self.heads, width // self.heads))
    q = split(layers.dense(width, 'q_proj', **kw)(query_token))
    k = split(layers.dense(width, 'k_proj', **kw)(tokens))
    v = split(layers.dense(width, 'v_proj', **kw)(tokens))
    return formulations.attention(q, k, v).reshape(x.shape[0], width)


class TextTimeEmbedding(nn.Module):
  """norm1 -> pool -> proj -> norm2: the text states as a timestep-embedding addend."""
  features: int
  heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, context: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.layer_norm(1e-5, 'norm1', **kw)(context)
    x = AttentionPooling(self.heads, name='pool', **kw)(x)
    x = layers.dense(self.features, 'proj', **kw)(x)
    return layers.layer_norm(1e-5, 'norm2', **kw)(x)


def _geglu(x: jax.Array) -> jax.Array:
  value, gate = jnp.split(x, 2, axis=-1)
  return value * layers.activation('gelu')(gate)


class GEGLU(nn.Module):
  """proj to 2*features, then value * gelu(gate), the value being the first half."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = layers.dense(2 * self.features, 'proj', dtype=self.dtype, param_dtype=self.param_dtype)(x)
    return formulations.recomputed(_geglu)(x)


class FeedForward(nn.Module):
  """net.0 (GEGLU to 4x width), net.2 (back); net.1 is diffusers' dropout."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = GEGLU(4 * x.shape[-1], name='net_0', **kw)(x)
    return layers.dense(x.shape[-1], 'net_2', axes=('mlp', 'embed'), **kw)(h)


class BasicTransformerBlock(nn.Module):
  """Pre-LayerNorm self-attention, cross-attention to the text, and GEGLU feed-forward."""
  heads: int
  head_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name: layers.layer_norm(_TRANSFORMER_LAYER_NORM_EPS, name, **kw)
    attention = lambda name: layers.Attention(self.heads, self.head_dim, x.shape[-1], name=name,
                                              **kw)
    x = x + attention('attn1')(norm('norm1')(x))
    x = x + attention('attn2')(norm('norm2')(x), context)
    return x + FeedForward(name='ff', **kw)(norm('norm3')(x))


def _projection(features: int, linear: bool, name: str, **kw) -> nn.Module:
  """proj_in/proj_out: a Linear or a 1x1 Conv2d, the same map on NHWC."""
  if linear:
    return layers.dense(features, name, **kw)
  return layers.conv(features, name, kernel_size=1, **kw)


class Transformer2DModel(nn.Module):
  """GroupNorm, proj_in, transformer blocks over the H*W tokens, proj_out, + residual.

  The inner width is heads * (channels // heads), which is below the channels when the
  head count does not divide them (as in diffusers).
  """
  heads: int
  num_layers: int
  groups: int
  use_linear_projection: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    batch, height, width, channels = x.shape
    head_dim = channels // self.heads
    inner = self.heads * head_dim
    h = layers.group_norm(self.groups, _TRANSFORMER_GROUP_NORM_EPS, 'norm', **kw)(x)
    h = _projection(inner, self.use_linear_projection, 'proj_in', **kw)(h)
    h = h.reshape(batch, height * width, inner)
    for i in range(self.num_layers):
      h = BasicTransformerBlock(self.heads, head_dim, name=f'transformer_blocks_{i}', **kw)(
          h, context)
    h = h.reshape(batch, height, width, inner)
    return x + _projection(channels, self.use_linear_projection, 'proj_out', **kw)(h)


class _Block(nn.Module):
  """What down, mid and up blocks share: how they build resnets and transformers.

  `heads` is None for the blocks without attention (DownBlock2D, UpBlock2D).
  """
  config: UNetConfig
  out_channels: int
  heads: Optional[int]
  remat_policy: str = 'none'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def resnet(self, index: int, output_scale_factor: float = 1.0) -> nn.Module:
    cfg = self.config
    module = _block_class(layers.ResnetBlock2D, self.remat_policy, is_attention=False)
    return module(self.out_channels, cfg.norm_num_groups, cfg.norm_eps, cfg.act_fn,
                  output_scale_factor, self.dtype, self.param_dtype, name=f'resnets_{index}')

  def attention(self, index: int) -> nn.Module:
    cfg = self.config
    module = _block_class(Transformer2DModel, self.remat_policy, is_attention=True)
    return module(self.heads, cfg.transformer_layers_per_block, cfg.norm_num_groups,
                  cfg.use_linear_projection, self.dtype, self.param_dtype,
                  name=f'attentions_{index}')


class DownBlock(_Block):
  """diffusers' CrossAttnDownBlock2D, or DownBlock2D when heads is None.

  Returns the output and the skip states: one per layer, plus the down-sampled output.
  """
  add_downsample: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array,
               context: jax.Array) -> Tuple[jax.Array, List[jax.Array]]:
    skips = []
    for i in range(self.config.layers_per_block):
      x = self.resnet(i)(x, temb)
      if self.heads is not None:
        x = self.attention(i)(x, context)
      skips.append(x)
    if self.add_downsample:
      x = layers.Downsample2D(self.out_channels, self.config.downsample_padding, self.dtype,
                              self.param_dtype, name='downsamplers_0')(x)
      skips.append(x)
    return x, skips


class MidBlock(_Block):
  """diffusers' UNetMidBlock2DCrossAttn: resnet, transformer, resnet."""

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
    scale = self.config.mid_block_scale_factor
    x = self.resnet(0, scale)(x, temb)
    x = self.attention(0)(x, context)
    return self.resnet(1, scale)(x, temb)


class UpBlock(_Block):
  """diffusers' CrossAttnUpBlock2D, or UpBlock2D when heads is None.

  Each layer concatenates (channels last) the last remaining skip state after the input.
  """
  add_upsample: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, skips: Sequence[jax.Array], temb: jax.Array,
               context: jax.Array, upsample_size: Optional[Tuple[int, int]]) -> jax.Array:
    for i, skip in enumerate(reversed(skips)):
      x = self.resnet(i)(jnp.concatenate([x, skip], axis=-1), temb)
      if self.heads is not None:
        x = self.attention(i)(x, context)
    if self.add_upsample:
      x = layers.Upsample2D(self.out_channels, self.dtype, self.param_dtype,
                            name='upsamplers_0')(x, upsample_size)
    return x


class UNet2DConditionModel(nn.Module):
  """(sample [B, H, W, in_channels], timesteps [B] or scalar float, encoder_hidden_states
  [B, T, cross_attention_dim]) -> [B, H, W, out_channels].

  Computes in `dtype` (norm statistics and attention softmax in float32), keeps params
  in `param_dtype`. remat_policy (REMAT_POLICIES) says which blocks the backward pass
  recomputes instead of keeping their activations; parameter names do not change.

  num_dropped_levels=k leaves out the k deepest resolution levels (their down blocks, up
  blocks up_blocks_0..up_blocks_{k-1}, and the down-sampler that fed them); keep_mid=False
  leaves out the mid block, the down path then feeding the up path directly. Kept blocks
  keep their names (up_blocks keep their index) and their widths, so their params are
  those of the full U-Net; the defaults are diffusers' U-Net. (Used by StackedUNet; the
  kept widths only match the full U-Net's where StackedUNetConfig allows the removal.)
  """
  config: UNetConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat_policy: str = 'none'
  num_dropped_levels: int = 0
  keep_mid: bool = True

  @nn.compact
  def __call__(self, sample: jax.Array, timesteps: jax.Array,
               encoder_hidden_states: jax.Array) -> jax.Array:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    block_kw = dict(config=cfg, remat_policy=check_remat_policy(self.remat_policy), **kw)
    context = encoder_hidden_states
    if cfg.center_input_sample:
      sample = 2 * sample - 1.0

    timesteps = jnp.broadcast_to(jnp.ravel(jnp.asarray(timesteps, jnp.float32)), sample.shape[:1])
    temb = timestep_embedding(timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos,
                              cfg.freq_shift).astype(self.dtype)
    temb = TimestepEmbedding(cfg.time_embed_dim, cfg.act_fn, name='time_embedding', **kw)(temb)
    if cfg.addition_embed_type == 'text':
      temb = temb + TextTimeEmbedding(cfg.time_embed_dim, cfg.addition_embed_type_num_heads,
                                      name='add_embedding', **kw)(context)

    x = layers.conv(cfg.block_out_channels[0], 'conv_in', **kw)(sample)
    skips = [x]
    levels = len(cfg.block_out_channels)
    kept = levels - self.num_dropped_levels
    heads = cfg.heads_per_block
    for i in range(kept):
      x, block_skips = DownBlock(
          out_channels=cfg.block_out_channels[i],
          heads=heads[i] if cfg.down_block_types[i] == _CROSS_ATTN_DOWN else None,
          add_downsample=i < kept - 1, name=f'down_blocks_{i}', **block_kw)(x, temb, context)
      skips += block_skips

    if self.keep_mid:
      x = MidBlock(out_channels=cfg.block_out_channels[-1], heads=heads[-1], name='mid_block',
                   **block_kw)(x, temb, context)

    per_block = cfg.layers_per_block + 1
    for i in range(self.num_dropped_levels, levels):
      level = levels - 1 - i
      block_skips, skips = skips[-per_block:], skips[:-per_block]
      is_last = i == levels - 1
      x = UpBlock(
          out_channels=cfg.block_out_channels[level],
          heads=heads[level] if cfg.up_block_types[i] == _CROSS_ATTN_UP else None,
          add_upsample=not is_last, name=f'up_blocks_{i}', **block_kw)(
              x, block_skips, temb, context, None if is_last else skips[-1].shape[1:3])

    x = layers.group_norm(cfg.norm_num_groups, cfg.norm_eps, 'conv_norm_out',
                          activation=cfg.act_fn, **kw)(x)
    return layers.conv(cfg.out_channels, 'conv_out', **kw)(x)

  def example_inputs(self, batch_size: int = 1) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """A sample that halves exactly at every level down to 2x2, one timestep each, 4 tokens."""
    size = 2 ** len(self.config.block_out_channels)
    return (jnp.zeros((batch_size, size, size, self.config.in_channels), jnp.float32),
            jnp.full((batch_size,), 999.0, jnp.float32),
            jnp.zeros((batch_size, 4, self.config.cross_attention_dim), jnp.float32))
