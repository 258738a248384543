"""InstaFlow-1.7B's one-step generator: two U-Nets in series, optionally without middle blocks.

The InstaFlow paper (Liu et al., 2023, Sec. 4 and appendix) gets its 1.7B generator by
stacking two SD 1.5 U-Nets without parameter sharing, the first U-Net's output being the
second one's input, both initialised from the same pretrained 2-RF U-Net:

    out_1 = unet_1(x, t, text);  out = unet_2(out_1, t, text)

It also reports that removing the middle blocks of the stacked network, to save compute,
did not cost quality. The exact block list of the released 1.7B model is not public (we
have neither its config nor its code), so the removal here is a parameterised
approximation, applied alike to both halves, each a UNet2DConditionModel given these two
fields:

  keep_mid=False          removes each half's mid block (resnet, transformer, resnet): the
                          down path feeds the up path directly.
  num_dropped_levels=k    removes each half's k deepest resolution levels: their down blocks
                          (down_blocks_{L-k}..), their up blocks (up_blocks_0..up_blocks_{k-1})
                          and the down-sampler that fed them (down_blocks_{L-k-1}'s
                          downsamplers_0), so each half is an (L-k)-level U-Net.

Each half's skip connections stay within that half, and every kept block keeps its
diffusers name (up_blocks keep their original index) and the shape it has in the
pretrained U-Net, so `init_from_unet` only selects params. That needs the kept deepest
level to be as wide as the shallowest dropped level, and as the mid block when kept:
SD 1.5's (320, 640, 1280, 1280) allows k = 0 or 1. A half computes what diffusers'
UNet2DConditionModel computes with block_out_channels[:L-k], down_block_types[:L-k],
up_block_types[k:] (and mid_block_type=None without the mid block), its up_blocks_j
being our up_blocks_{j+k}; the mid block keeps the deepest level's head count.

Params are {'unet_1': ..., 'unet_2': ...}, each with the names of diffusers' U-Net: with
nothing removed, a diffusers U-Net state dict converts into either half with
torch_state_to_flax on that half's abstract tree, and flax_to_torch_state exports a half.
"""
import dataclasses
from typing import Any, Dict, Optional, Tuple, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from instaflow_jax.models import abstract
from instaflow_jax.models import unet as unet_lib

Dtype = Any


def _invalid(key: str, value: Any, why: str) -> ValueError:
  return ValueError(f'stacked unet config: {key}={value!r} {why}')


@dataclasses.dataclass(frozen=True)
class StackedUNetConfig:
  """Two U-Nets of architecture `unet` in series, each without the blocks removed here.

  in_channels, out_channels and sample_size forward to `unet`, so the stack stands where
  a UNet2DConditionModel stands (instaflow_jax.pipeline.Pipeline reads them).
  """
  unet: unet_lib.UNetConfig
  num_dropped_levels: int = 0
  keep_mid: bool = True

  def __post_init__(self):
    cfg = self.unet
    if cfg.in_channels != cfg.out_channels:
      raise _invalid('unet.out_channels', cfg.out_channels,
                     f'must equal unet.in_channels={cfg.in_channels}: the first U-Net\'s output '
                     'is the second one\'s input')
    levels = len(cfg.block_out_channels)
    k = self.num_dropped_levels
    if not isinstance(k, int) or not 0 <= k < levels:
      raise _invalid('num_dropped_levels', k, f'must be an int in [0, {levels - 1}]')
    widths = cfg.block_out_channels
    deepest_kept = widths[levels - 1 - k]
    # The first kept up block takes the kept down path's output where it took the dropped
    # level's; the kept mid block runs at the kept deepest width. Both keep their shapes
    # (and their pretrained weights) only when the widths agree.
    if k and widths[levels - k] != deepest_kept:
      raise _invalid('num_dropped_levels', k,
                     f'changes the width entering up_blocks_{k} from {widths[levels - k]} to '
                     f'{deepest_kept} (block_out_channels={widths})')
    if self.keep_mid and deepest_kept != widths[-1]:
      raise _invalid('num_dropped_levels', k,
                     f'with keep_mid=True runs the mid block at width {deepest_kept} instead '
                     f'of {widths[-1]} (block_out_channels={widths}); set keep_mid=False')

  @property
  def in_channels(self) -> int:
    return self.unet.in_channels

  @property
  def out_channels(self) -> int:
    return self.unet.out_channels

  @property
  def sample_size(self) -> Optional[Union[int, Tuple[int, int]]]:
    return self.unet.sample_size

  @classmethod
  def from_dict(cls, d: Dict[str, Any]) -> 'StackedUNetConfig':
    """Reads {'unet': a UNet2DConditionModel config.json dict, 'num_dropped_levels': int,
    'keep_mid': bool} (the last two optional; keys starting with '_' are ignored)."""
    options = {key: value for key, value in d.items() if not key.startswith('_')}
    unknown = sorted(set(options) - {field.name for field in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f'stacked unet config: unknown key {unknown[0]!r}')
    if 'unet' not in options:
      raise ValueError("stacked unet config: missing key 'unet' (the U-Net config.json dict)")
    unet = unet_lib.UNetConfig.from_diffusers_config(options.pop('unet'))
    return cls(unet=unet, **options)

  def to_dict(self) -> Dict[str, Any]:
    """The dict from_dict reads, with the U-Net as a diffusers config.json dict."""
    return {'unet': self.unet.to_diffusers_config(),
            'num_dropped_levels': self.num_dropped_levels, 'keep_mid': self.keep_mid}


def _half(config: StackedUNetConfig, **kw) -> unet_lib.UNet2DConditionModel:
  """One U-Net of the stack: UNet2DConditionModel without the blocks `config` removes."""
  return unet_lib.UNet2DConditionModel(config.unet, num_dropped_levels=config.num_dropped_levels,
                                       keep_mid=config.keep_mid, **kw)


def _example_inputs(config: StackedUNetConfig, batch_size: int):
  """A half's example inputs (a detached module: no child of the caller)."""
  return _half(config, parent=None).example_inputs(batch_size)


class StackedUNet(nn.Module):
  """(sample [B, H, W, C], timesteps [B] or scalar, encoder_hidden_states [B, T, D]) ->
  [B, H, W, C]: unet_2(unet_1(sample)), both halves given the same timesteps and text.

  dtype, param_dtype and remat_policy mean what they mean for UNet2DConditionModel.
  """
  config: StackedUNetConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat_policy: str = 'none'

  def base_unet(self) -> unet_lib.UNet2DConditionModel:
    """The whole single U-Net (config.unet) the stack is made from: the teacher's model."""
    return unet_lib.UNet2DConditionModel(self.config.unet, dtype=self.dtype,
                                         param_dtype=self.param_dtype,
                                         remat_policy=self.remat_policy, parent=None)

  def half(self, name: str) -> unet_lib.UNet2DConditionModel:
    return _half(self.config, dtype=self.dtype, param_dtype=self.param_dtype,
                 remat_policy=self.remat_policy, name=name)

  @nn.compact
  def __call__(self, sample: jax.Array, timesteps: jax.Array,
               encoder_hidden_states: jax.Array) -> jax.Array:
    x = self.half('unet_1')(sample, timesteps, encoder_hidden_states)
    return self.half('unet_2')(x, timesteps, encoder_hidden_states)

  def example_inputs(self, batch_size: int = 1) -> Tuple[jax.Array, jax.Array, jax.Array]:
    return _example_inputs(self.config, batch_size)


def _half_param_shapes(config: StackedUNetConfig):
  """{path: (shape, dtype)} of one half's params, computed abstractly."""
  half = _half(config)
  return abstract.flat_param_shapes(abstract.abstract_variables(half))


def init_from_unet(unet_params, config: StackedUNetConfig) -> Dict[str, Any]:
  """Stacked params with both halves copied from one pretrained U-Net's params.

  `unet_params` is a UNet2DConditionModel params tree of architecture `config.unet` (as
  Pipeline.unet_params); the params of removed blocks are left out. The halves get
  separate copies (no shared buffers) with the pretrained dtypes.
  """
  flat = flax.traverse_util.flatten_dict(nn.meta.unbox(unet_params))
  wanted = _half_param_shapes(config)
  for path, (shape, _) in wanted.items():
    if path not in flat:
      raise ValueError(f'init_from_unet: the U-Net params lack {"/".join(path)} '
                       f'(shape {shape}); they do not belong to config.unet')
    if tuple(flat[path].shape) != shape:
      raise ValueError(f'init_from_unet: {"/".join(path)} has shape {tuple(flat[path].shape)}, '
                       f'the stacked U-Net expects {shape}')

  def half():
    return flax.traverse_util.unflatten_dict({path: jnp.array(flat[path]) for path in wanted})

  return {'unet_1': half(), 'unet_2': half()}


def base_unet(unet: Union[unet_lib.UNet2DConditionModel, StackedUNet]):
  """The single U-Net a model is built from: itself, or a stack's (the teacher's model)."""
  return unet.base_unet() if isinstance(unet, StackedUNet) else unet
