"""UNet2DConditionModel against diffusers' PyTorch class, with random (perturbed) weights."""
import json

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from instaflow_jax.convert.torch_names import flax_to_torch_state
from instaflow_jax.convert.torch_names import torch_key
from instaflow_jax.convert.torch_names import torch_state_to_flax
from instaflow_jax.models.abstract import abstract_variables, flat_param_shapes
from instaflow_jax.models.unet import UNet2DConditionModel, UNetConfig
from tests import tiny_models

_CA_DOWN, _DOWN, _CA_UP, _UP = ('CrossAttnDownBlock2D', 'DownBlock2D', 'CrossAttnUpBlock2D',
                                'UpBlock2D')

TIMESTEPS = np.array([999.0, 250.5], np.float32)

# Each case: a diffusers config dict, the (height, width) of the test sample, the timesteps.
CASES = {
    # SD 1.x: conv projections, attention_head_dim read as 8 heads, two layers per block.
    'sd1': (dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64),
                 down_block_types=(_CA_DOWN, _CA_DOWN, _DOWN), up_block_types=(_UP, _CA_UP, _CA_UP),
                 layers_per_block=2, cross_attention_dim=48, attention_head_dim=8,
                 norm_num_groups=8), (16, 16), TIMESTEPS),
    # SD 2.x: linear projections and per-block head counts (3 heads of 32 channels: an inner
    # width of 30), which up blocks use reversed; two transformer layers per block.
    'sd2': (dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32, 64, 64),
                 down_block_types=(_CA_DOWN,) * 3 + (_DOWN,), up_block_types=(_UP,) + (_CA_UP,) * 3,
                 layers_per_block=1, cross_attention_dim=40, attention_head_dim=(2, 3, 4, 8),
                 use_linear_projection=True, transformer_layers_per_block=2, upcast_attention=True,
                 norm_num_groups=8), (8, 8), TIMESTEPS),
    # Every other knob off its default (the caption pooled into the timestep embedding too, by
    # two heads of 12: a head dim the C++ attention kernel takes, where it runs); a 10-row
    # sample down-samples (padding 0) to 5 then 2 rows, so diffusers up-samples 2 -> 5 rows to
    # an explicit size. A scalar timestep.
    'odd': (dict(in_channels=3, out_channels=5, block_out_channels=(32, 48, 64),
                 down_block_types=(_DOWN, _CA_DOWN, _CA_DOWN), up_block_types=(_CA_UP, _CA_UP, _UP),
                 layers_per_block=1, cross_attention_dim=24, attention_head_dim=4,
                 downsample_padding=0, freq_shift=1, flip_sin_to_cos=False, center_input_sample=True,
                 mid_block_scale_factor=2.0, act_fn='gelu', norm_eps=1e-6, norm_num_groups=16,
                 addition_embed_type='text', addition_embed_type_num_heads=2),
            (10, 12), 250.5),
}

SD15 = json.loads('''{
  "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
  "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
  "center_input_sample": false, "cross_attention_dim": 768,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                       "DownBlock2D"],
  "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
  "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
  "out_channels": 4, "sample_size": 64,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
}''')
SD21 = {**SD15, 'attention_head_dim': [5, 10, 20, 20], 'cross_attention_dim': 1024,
        'dual_cross_attention': False, 'num_class_embeds': None, 'only_cross_attention': False,
        'sample_size': 96, 'upcast_attention': True, 'use_linear_projection': True}


def _torch_shapes(state) -> dict:
  return {key: tuple(value.shape) for key, value in state.items()}


def _our_torch_shapes(model) -> dict:
  """The state-dict shapes our parameter tree exports to, without materialising it."""
  def torch_shape(path, shape):
    if path[-1] == 'kernel' and len(shape) == 4:
      return (shape[3], shape[2], shape[0], shape[1])
    return shape[::-1] if path[-1] == 'kernel' else shape
  return {torch_key(path): torch_shape(path, shape)
          for path, (shape, _) in flat_param_shapes(abstract_variables(model)).items()}


def _inputs(config: dict, size, seed: int = 0):
  rng = np.random.default_rng(seed)
  sample = rng.standard_normal((2, config['in_channels'], *size)).astype(np.float32)
  context = rng.standard_normal((2, 4, config['cross_attention_dim'])).astype(np.float32)
  return sample, context


@torch.no_grad()
def _reference(torch_model, sample, timesteps, context) -> np.ndarray:
  """diffusers' output, NHWC; `timesteps` is an array or a Python float, as diffusers takes."""
  if isinstance(timesteps, np.ndarray):
    timesteps = torch.from_numpy(timesteps)
  out = torch_model(torch.from_numpy(sample), timesteps,
                    encoder_hidden_states=torch.from_numpy(context)).sample
  return out.numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope='module', params=sorted(CASES))
def case(request):
  """The torch model, our model and its converted params, for one config."""
  d, size, timesteps = CASES[request.param]
  torch.manual_seed(0)
  torch_model = tiny_models.perturb_(diffusers.UNet2DConditionModel(**d), seed=1)
  model = UNet2DConditionModel(UNetConfig.from_diffusers_config(d))
  state = {key: value.numpy() for key, value in torch_model.state_dict().items()}
  params = torch_state_to_flax(state, abstract_variables(model), source=request.param)
  return dict(name=request.param, config=d, size=size, timesteps=timesteps,
              torch_model=torch_model, model=model, params=params)


def test_matches_diffusers(case):
  sample, context = _inputs(case['config'], case['size'])
  ref = _reference(case['torch_model'], sample, case['timesteps'], context)
  ours = jax.jit(case['model'].apply)({'params': case['params']}, sample.transpose(0, 2, 3, 1),
                                      case['timesteps'], context)
  assert ours.shape == ref.shape
  err = float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())
  print(f"{case['name']}: max|ours - ref| / max|ref| = {err:.2e}")
  assert err <= 1e-4


def test_export_round_trip_is_bitwise(case):
  exported = flax_to_torch_state(case['params'])
  fresh = diffusers.UNet2DConditionModel(**case['config'])
  fresh.load_state_dict({key: torch.from_numpy(value) for key, value in exported.items()},
                        strict=True)
  original = case['torch_model'].state_dict()
  for key, value in fresh.state_dict().items():
    assert torch.equal(value, original[key]), key


@pytest.mark.slow  # a sweep beside the parity test of the quick tier
@pytest.mark.parametrize('name', sorted(CASES))
def test_config_round_trip_builds_the_same_torch_model(name):
  config = UNetConfig.from_diffusers_config(CASES[name][0])
  exported = json.loads(json.dumps(config.to_diffusers_config()))
  assert exported['_class_name'] == 'UNet2DConditionModel'
  assert UNetConfig.from_diffusers_config(exported) == config
  torch_model = diffusers.UNet2DConditionModel.from_config(exported)
  assert _torch_shapes(torch_model.state_dict()) == _our_torch_shapes(UNet2DConditionModel(config))


@pytest.mark.parametrize('d,heads', [(SD15, (8, 8, 8, 8)), (SD21, (5, 10, 20, 20))])
def test_released_configs(d, heads):
  config = UNetConfig.from_diffusers_config(d)
  assert config.heads_per_block == heads
  assert UNetConfig.from_diffusers_config(config.to_diffusers_config()) == config
  with torch.device('meta'):
    torch_model = diffusers.UNet2DConditionModel.from_config(config.to_diffusers_config())
  assert _torch_shapes(torch_model.state_dict()) == _our_torch_shapes(UNet2DConditionModel(config))


def test_num_attention_heads_exports_as_diffusers_reads_it():
  config = UNetConfig.from_diffusers_config(
      {**CASES['sd2'][0], 'attention_head_dim': 64, 'num_attention_heads': (2, 3, 4, 8)})
  assert config.heads_per_block == (2, 3, 4, 8)
  exported = config.to_diffusers_config()
  assert exported['attention_head_dim'] == (2, 3, 4, 8) and exported['num_attention_heads'] is None
  assert UNetConfig.from_diffusers_config(exported).heads_per_block == config.heads_per_block


@pytest.mark.parametrize('key,value', [
    ('class_embed_type', 'timestep'), ('num_class_embeds', 10),
    ('addition_embed_type', 'text_time'),
    ('encoder_hid_dim', 768), ('time_embedding_type', 'fourier'), ('time_cond_proj_dim', 256),
    ('dual_cross_attention', True), ('only_cross_attention', True),
    ('resnet_time_scale_shift', 'scale_shift'), ('mid_block_type', 'UNetMidBlock2DSimpleCrossAttn'),
    ('mid_block_type', None), ('down_block_types', [_CA_DOWN, 'AttnDownBlock2D', _DOWN]),
    ('up_block_types', [_UP, _CA_UP, 'SimpleCrossAttnUpBlock2D']),
    ('transformer_layers_per_block', [1, 2, 1]), ('layers_per_block', [2, 2, 1]),
    ('attention_head_dim', [8, 8]), ('act_fn', 'mish'), ('norm_num_groups', None),
    ('conv_in_kernel', 7), ('attention_type', 'gated'), ('dropout', 0.1)])
def test_unsupported_setting_names_the_key(key, value):
  with pytest.raises(ValueError, match=f'unet config: {key}='):
    UNetConfig.from_diffusers_config({**CASES['sd1'][0], key: value})


def test_text_pooling_heads_must_divide_the_text_width():
  with pytest.raises(ValueError, match='addition_embed_type_num_heads=5 .*cross_attention_dim=48'):
    UNetConfig.from_diffusers_config({**CASES['sd1'][0], 'addition_embed_type': 'text',
                                      'addition_embed_type_num_heads': 5})


@pytest.fixture(scope='module')
def tiny():
  """The pipeline tests' tiny U-Net, random torch weights converted to ours."""
  d = tiny_models.tiny_unet_config()
  torch.manual_seed(0)
  torch_model = tiny_models.perturb_(diffusers.UNet2DConditionModel(**d), seed=2)
  model = UNet2DConditionModel(UNetConfig.from_diffusers_config(d))
  state = {key: value.numpy() for key, value in torch_model.state_dict().items()}
  params = torch_state_to_flax(state, abstract_variables(model), source='tiny')
  sample, context = _inputs(d, (8, 8))
  return dict(model=model, params={'params': params}, torch_model=torch_model, sample=sample,
              context=context, x=sample.transpose(0, 2, 3, 1))


def test_bfloat16_compute_stays_close(tiny):
  model = UNet2DConditionModel(tiny['model'].config, dtype=jnp.bfloat16)
  ours = jax.jit(model.apply)(tiny['params'], tiny['x'], TIMESTEPS, tiny['context'])
  ref = _reference(tiny['torch_model'], tiny['sample'], TIMESTEPS, tiny['context'])
  assert ours.dtype == jnp.bfloat16
  assert np.abs(np.asarray(ours, np.float32) - ref).max() <= 5e-2 * np.abs(ref).max()


@pytest.mark.slow  # a sweep beside the parity test of the quick tier
@pytest.mark.parametrize('policy, rematted_kinds', [
    ('attention', ('attentions_',)), ('dots_saveable', ('resnets_', 'attentions_')),
    ('full', ('resnets_', 'attentions_'))])
def test_remat_policies_keep_param_tree_and_outputs(tiny, policy, rematted_kinds):
  plain = tiny['model']
  remat = UNet2DConditionModel(plain.config, remat_policy=policy)
  abstract = abstract_variables(plain)
  # Same paths, shapes, dtypes and logical axis names.
  assert abstract_variables(remat) == abstract

  args = (tiny['params'], tiny['x'], TIMESTEPS, tiny['context'])
  checkpoints = [e for e in jax.make_jaxpr(remat.apply)(*args).eqns
                 if 'remat' in e.primitive.name or e.primitive.name == 'checkpoint']
  blocks = {path[:2] for path in flat_param_shapes(abstract)
            if path[1].startswith(rematted_kinds)}
  assert len(checkpoints) == len(blocks)
  saves_dots = policy == 'dots_saveable'
  assert all((e.params['policy'] is not None) == saves_dots for e in checkpoints)
  np.testing.assert_array_equal(jax.jit(remat.apply)(*args), jax.jit(plain.apply)(*args))


def test_an_unknown_remat_policy_is_refused(tiny):
  model = UNet2DConditionModel(tiny['model'].config, remat_policy='some')
  with pytest.raises(ValueError, match="remat policy 'some' is unknown"):
    jax.eval_shape(model.apply, tiny['params'], tiny['x'], TIMESTEPS, tiny['context'])
