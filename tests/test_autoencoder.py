"""AutoencoderKL against diffusers' AutoencoderKL with random (perturbed) weights, in float32."""
import functools

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from instaflow_jax.convert import diffusers as diffusers_io
from instaflow_jax.convert.torch_names import flax_to_torch_state
from instaflow_jax.convert.torch_names import torch_state_to_flax
from instaflow_jax.models.abstract import abstract_variables
from instaflow_jax.models.autoencoder import AutoencoderConfig
from instaflow_jax.models.autoencoder import AutoencoderKL
from tests.tiny_models import perturb_

_DOWN, _UP = 'DownEncoderBlock2D', 'UpDecoderBlock2D'

CONFIGS = {
    # Two levels, one resnet per encoder level; gelu checks that act_fn reaches the resnets
    # while conv_act stays SiLU; in != out channels checks they are not mixed up.
    'two_levels': (AutoencoderConfig(
        in_channels=3, out_channels=4, down_block_types=(_DOWN,) * 2, up_block_types=(_UP,) * 2,
        block_out_channels=(32, 64), layers_per_block=1, act_fn='gelu', latent_channels=3,
        norm_num_groups=8, sample_size=16), 16),
    # Three levels, layers_per_block=2, SD's latent width.
    'three_levels': (AutoencoderConfig(
        down_block_types=(_DOWN,) * 3, up_block_types=(_UP,) * 3, block_out_channels=(32, 32, 64),
        layers_per_block=2, latent_channels=4, norm_num_groups=16, sample_size=32,
        scaling_factor=0.13025, shift_factor=0.0609), 32),
    # No mid-block attention and no (post_)quant_conv.
    'no_attention_no_quant': (AutoencoderConfig(
        down_block_types=(_DOWN,) * 2, up_block_types=(_UP,) * 2, block_out_channels=(32, 64),
        layers_per_block=1, norm_num_groups=8, sample_size=16, use_quant_conv=False,
        use_post_quant_conv=False, mid_block_add_attention=False, force_upcast=False), 16),
}


def _torch_vae(config: AutoencoderConfig, seed: int = 0) -> diffusers.AutoencoderKL:
  torch.manual_seed(seed)
  return perturb_(diffusers.AutoencoderKL.from_config(config.to_diffusers_config()), seed=seed)


def _numpy_state(module: torch.nn.Module):
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


@functools.lru_cache(maxsize=None)
def _pair(name: str):
  """(torch vae, our model, converted params) for a named config, built once."""
  config, _ = CONFIGS[name]
  vae = _torch_vae(config)
  model = AutoencoderKL(config)
  params = torch_state_to_flax(_numpy_state(vae), abstract_variables(model),
                               source=f'diffusers {name}')
  return vae, model, params


def _nhwc(x: torch.Tensor) -> np.ndarray:
  return x.detach().numpy().transpose(0, 2, 3, 1)


def _assert_close(ours, ref: np.ndarray, what: str):
  ours = np.asarray(ours)
  assert ours.shape == ref.shape, what
  scale = np.abs(ref).max()
  err = np.abs(ours - ref).max()
  assert err <= 1e-4 * scale, f'{what}: max|diff|={err:.3g}, max|ref|={scale:.3g}'


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_encode_decode_match_diffusers(name):
  vae, model, params = _pair(name)
  config, size = CONFIGS[name]
  generator = torch.Generator().manual_seed(1)
  images = torch.rand(2, config.in_channels, size, size, generator=generator) * 2 - 1
  latent_size = size // 2 ** (len(config.block_out_channels) - 1)
  latents = torch.randn(2, config.latent_channels, latent_size, latent_size, generator=generator)
  with torch.no_grad():
    posterior = vae.encode(images).latent_dist
    decoded = vae.decode(latents).sample
  variables = {'params': params}
  mean, logvar = model.apply(variables, jnp.asarray(_nhwc(images)), method=AutoencoderKL.encode)
  _assert_close(mean, _nhwc(posterior.mean), 'mean')
  _assert_close(logvar, _nhwc(posterior.logvar), 'logvar')
  ours = model.apply(variables, jnp.asarray(_nhwc(latents)), method=AutoencoderKL.decode)
  _assert_close(ours, _nhwc(decoded), 'decoded images')


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_export_round_trip_is_bitwise(name):
  vae, _, params = _pair(name)
  fresh = diffusers.AutoencoderKL.from_config(CONFIGS[name][0].to_diffusers_config())
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in flax_to_torch_state(params).items()},
                        strict=True)
  original = vae.state_dict()
  for key, tensor in fresh.state_dict().items():
    assert torch.equal(tensor, original[key]), key


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_config_round_trip_and_diffusers_layout(name):
  config, _ = CONFIGS[name]
  d = config.to_diffusers_config()
  assert d['_class_name'] == 'AutoencoderKL'
  assert AutoencoderConfig.from_diffusers_config(d) == config
  vae = diffusers.AutoencoderKL.from_config(d)
  assert AutoencoderConfig.from_diffusers_config(dict(vae.config)) == config
  model = AutoencoderKL(config)
  zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype),
                                 abstract_variables(model))
  ours = flax_to_torch_state(zeros)
  theirs = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
  assert {k: v.shape for k, v in ours.items()} == theirs
  hash(config)


@pytest.mark.parametrize('key,value', [
    ('down_block_types', ['AttnDownEncoderBlock2D']),
    ('up_block_types', ['AttnUpDecoderBlock2D']),
    ('act_fn', 'mish'),
    ('norm_num_groups', 24),
    ('block_out_channels', [32, 64]),  # two levels against one block type each
    ('norm_type', 'spatial'),  # not an AutoencoderKL key at all
])
def test_unsupported_config_is_rejected(key, value):
  d = dict(block_out_channels=[32], norm_num_groups=8)
  d[key] = value
  with pytest.raises(ValueError, match=key):
    AutoencoderConfig.from_diffusers_config(d)


def _to_legacy(state):
  """Today's names -> the old query/key/value/proj_attn names, weights as 1x1 convs."""
  legacy = {}
  for key, array in state.items():
    for new, old in (('to_q', 'query'), ('to_k', 'key'), ('to_v', 'value'),
                     ('to_out.0', 'proj_attn')):
      if f'.attentions.0.{new}.' in key:
        key = key.replace(f'.{new}.', f'.{old}.')
        if key.endswith('weight'):
          array = array[:, :, None, None]
    legacy[key] = array
  return legacy


def test_legacy_vae_keys_convert_to_the_same_params():
  vae, model, params = _pair('two_levels')
  state = _numpy_state(vae)
  legacy = _to_legacy(state)
  assert sum('.query.weight' in k for k in legacy) == 2  # encoder and decoder mid blocks
  assert diffusers_io.rename_legacy_vae_keys(state).keys() == state.keys()
  converted = torch_state_to_flax(diffusers_io.rename_legacy_vae_keys(legacy),
                                  abstract_variables(model), source='legacy')
  jax.tree_util.tree_map(np.testing.assert_array_equal, converted, params)
