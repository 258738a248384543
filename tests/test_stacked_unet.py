"""StackedUNet (InstaFlow-1.7B) against diffusers U-Nets run in series, init_from_unet, and
configs/instaflow_1_7b.py at SD 1.5 size (shapes only)."""
import dataclasses
import re

import diffusers
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import instaflow_1_7b
from configs import sd15_distill
from instaflow_jax.convert.torch_names import flax_to_torch_state
from instaflow_jax.convert.torch_names import torch_state_to_flax
from instaflow_jax.models.abstract import abstract_variables, flat_param_shapes
from instaflow_jax.models.stacked_unet import StackedUNet, StackedUNetConfig, init_from_unet
from instaflow_jax.models.unet import UNet2DConditionModel, UNetConfig
from instaflow_jax.pipeline import Pipeline
from tests import tiny_models
from tests.test_pipeline import PROMPTS, reference_generate
from tests.test_unet import SD15

# Three levels whose two deepest have the same width, so one level can be dropped.
THREE_LEVELS = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32, 32),
                    down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'),
                    up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'),
                    layers_per_block=1, cross_attention_dim=16, attention_head_dim=2,
                    norm_num_groups=8)
# (num_dropped_levels, keep_mid): every branch of a half's block selection.
DROPS = [(0, True), (0, False), (1, True), (1, False)]
SD15_PARAMS = 859_520_964


def _count(shapes) -> int:
  return sum(int(np.prod(shape)) for shape, _ in shapes.values())


def _inputs(cfg: UNetConfig, seed: int = 0, batch: int = 2, size: int = 8):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((batch, size, size, cfg.in_channels)).astype(np.float32),
          np.array([999.0, 250.5], np.float32)[:batch],
          rng.standard_normal((batch, 5, cfg.cross_attention_dim)).astype(np.float32))


def _reference_config(d: dict, dropped: int, keep_mid: bool) -> dict:
  """The diffusers U-Net that computes what one half computes (see the module docstring)."""
  levels = len(d['block_out_channels']) - dropped
  return {**d, 'block_out_channels': d['block_out_channels'][:levels],
          'down_block_types': d['down_block_types'][:levels],
          'up_block_types': d['up_block_types'][dropped:],
          'mid_block_type': 'UNetMidBlock2DCrossAttn' if keep_mid else None}


def _shift_up_blocks(state: dict, offset: int) -> dict:
  """Renumbers up_blocks.j as up_blocks.(j + offset): the reference's names -> a half's."""
  shift = lambda m: f'up_blocks.{int(m.group(1)) + offset}.'
  return {re.sub(r'^up_blocks\.(\d+)\.', shift, key): value for key, value in state.items()}


def _torch_unet(d: dict, seed: int):
  torch.manual_seed(seed)
  return tiny_models.perturb_(diffusers.UNet2DConditionModel(**d), seed=seed)


@pytest.mark.slow  # a sweep beside the parity test of the quick tier
@pytest.mark.parametrize('dropped,keep_mid', DROPS)
def test_matches_two_diffusers_unets_in_series(dropped, keep_mid):
  config = StackedUNetConfig(UNetConfig.from_diffusers_config(THREE_LEVELS), dropped, keep_mid)
  model = StackedUNet(config)
  abstract = abstract_variables(model)['params']
  reference = _reference_config(THREE_LEVELS, dropped, keep_mid)
  torch_halves = [_torch_unet(reference, seed) for seed in (1, 2)]
  states = [{k: v.numpy() for k, v in unet.state_dict().items()} for unet in torch_halves]
  params = {name: torch_state_to_flax(_shift_up_blocks(state, dropped), abstract[name], name)
            for name, state in zip(('unet_1', 'unet_2'), states)}

  sample, timesteps, text = _inputs(config.unet)
  ours = np.asarray(jax.jit(model.apply)({'params': params}, sample, timesteps, text))
  with torch.no_grad():
    x = torch.from_numpy(sample).permute(0, 3, 1, 2)
    for unet in torch_halves:
      x = unet(x, torch.from_numpy(timesteps), encoder_hidden_states=torch.from_numpy(text)).sample
  ref = x.permute(0, 2, 3, 1).numpy()
  assert ours.shape == ref.shape == sample.shape
  err = np.abs(ours - ref).max() / np.abs(ref).max()
  print(f'dropped={dropped} keep_mid={keep_mid}: max rel diff {err:.2e}')
  assert err <= 1e-4

  for name, torch_half, state in zip(('unet_1', 'unet_2'), torch_halves, states):
    exported = _shift_up_blocks(flax_to_torch_state(params[name]), -dropped)
    fresh = diffusers.UNet2DConditionModel(**reference)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    for key, value in fresh.state_dict().items():
      np.testing.assert_array_equal(value.numpy(), state[key], err_msg=key)


@pytest.mark.slow  # a sweep beside the parity test of the quick tier
def test_without_removal_halves_are_the_unet():
  """Both halves initialised from one U-Net: the first half's params run in that U-Net give
  its output bit for bit, and the stack is that U-Net applied twice."""
  unet_config = UNetConfig.from_diffusers_config(tiny_models.tiny_unet_config())
  unet = UNet2DConditionModel(unet_config)
  unet_params = tiny_models.random_params(unet)
  config = StackedUNetConfig(unet_config)
  stacked = StackedUNet(config)
  params = init_from_unet(unet_params, config)
  assert (jax.tree.map(jnp.shape, params) ==
          jax.tree.map(jnp.shape, nn.meta.unbox(abstract_variables(stacked)['params'])))

  sample, timesteps, text = _inputs(unet_config)
  apply_unet = jax.jit(lambda p, x: unet.apply({'params': p}, x, timesteps, text))
  once = apply_unet(unet_params, sample)
  np.testing.assert_array_equal(np.asarray(apply_unet(params['unet_1'], sample)),
                                np.asarray(once))
  twice = jax.jit(stacked.apply)({'params': params}, sample, timesteps, text)
  # Compiled as one program, the stack fuses differently: equal up to float32 rounding.
  ref = np.asarray(apply_unet(unet_params, once))
  np.testing.assert_allclose(np.asarray(twice), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
  assert np.abs(np.asarray(twice) - np.asarray(once)).max() > 1e-3


@pytest.fixture(scope='module')
def three_level_params():
  unet = UNet2DConditionModel(UNetConfig.from_diffusers_config(THREE_LEVELS))
  return tiny_models.random_params(unet)


@pytest.mark.slow  # a sweep beside the parity test of the quick tier
@pytest.mark.parametrize('dropped,keep_mid', DROPS[1:])
def test_init_from_unet_selects_the_kept_blocks(three_level_params, dropped, keep_mid):
  unet_config = UNetConfig.from_diffusers_config(THREE_LEVELS)
  unet_params = three_level_params
  config = StackedUNetConfig(unet_config, dropped, keep_mid)
  model = StackedUNet(config)
  params = init_from_unet(unet_params, config)

  expected = flat_param_shapes(abstract_variables(model))
  flat = flax.traverse_util.flatten_dict(params)
  assert {path: (value.shape, value.dtype) for path, value in flat.items()} == expected
  full = flax.traverse_util.flatten_dict(unet_params)
  for path, value in flat.items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(full[path[1:]]))
  names = {path[1] for path in flat}
  assert ('mid_block' in names) == keep_mid
  assert ('up_blocks_0' in names) == (dropped == 0)
  assert (('unet_1', 'down_blocks_1', 'downsamplers_0', 'conv', 'kernel') in flat) == (dropped == 0)
  # Separate buffers: training may donate each half's params.
  assert all(a is not b for a, b in zip(jax.tree.leaves(params['unet_1']),
                                        jax.tree.leaves(params['unet_2'])))


def test_init_from_unet_rejects_other_params(three_level_params):
  config = StackedUNetConfig(UNetConfig.from_diffusers_config(tiny_models.tiny_unet_config()))
  with pytest.raises(ValueError, match='init_from_unet: .* has shape'):
    init_from_unet(three_level_params, config)
  with pytest.raises(ValueError, match=r'the U-Net params lack \S+ \(shape'):
    init_from_unet({}, config)


@pytest.mark.parametrize('change,match', [
    (dict(num_dropped_levels=3), r'num_dropped_levels=3 must be an int in \[0, 2\]'),
    (dict(num_dropped_levels=2, keep_mid=False), 'changes the width entering up_blocks_2'),
    (dict(unet=dict(block_out_channels=(16, 32, 32, 64),
                    down_block_types=THREE_LEVELS['down_block_types'] + ('DownBlock2D',),
                    up_block_types=('UpBlock2D',) + THREE_LEVELS['up_block_types']),
          num_dropped_levels=2, keep_mid=True), 'runs the mid block at width 32 instead of 64'),
    (dict(unet=dict(out_channels=3)), 'out_channels=3 must equal unet.in_channels=4'),
])
def test_config_errors(change, match):
  d = {'unet': {**THREE_LEVELS, **change.pop('unet', {})}, **change}
  with pytest.raises(ValueError, match=match):
    StackedUNetConfig.from_dict(d)


def test_config_dict_round_trip():
  config = StackedUNetConfig(UNetConfig.from_diffusers_config(THREE_LEVELS), 1, False)
  assert StackedUNetConfig.from_dict({'_note': 'ignored', **config.to_dict()}) == config
  assert (config.in_channels, config.out_channels, config.sample_size) == (4, 4, 8)
  with pytest.raises(ValueError, match="unknown key 'drop_mid'"):
    StackedUNetConfig.from_dict({**config.to_dict(), 'drop_mid': True})
  hash(config)


class _TorchStack(torch.nn.Module):
  """Two diffusers U-Nets in series, called like one (for the reference sampling loop)."""

  def __init__(self, first, second):
    super().__init__()
    self.first, self.second = first, second

  def forward(self, x, t, encoder_hidden_states):
    x = self.first(x, t, encoder_hidden_states=encoder_hidden_states).sample
    return self.second(x, t, encoder_hidden_states=encoder_hidden_states)


def test_stands_in_the_pipeline_for_a_unet(tmp_path):
  """One-step generation with the stack (halves from the folder's U-Net) in Pipeline."""
  parts = tiny_models.write_tiny_pipeline(str(tmp_path))
  pipe = Pipeline.from_diffusers(str(tmp_path))
  config = StackedUNetConfig(pipe.unet.config)
  pipe = dataclasses.replace(pipe, unet=StackedUNet(config),
                             unet_params=init_from_unet(pipe.unet_params, config))
  latents = np.asarray(pipe.initial_latents(len(PROMPTS), 16, 16, seed=3))
  ours = pipe.generate(PROMPTS, num_inference_steps=1, latents=latents)
  assert pipe.default_size == 8 * pipe.vae_scale_factor
  ref = reference_generate({**parts, 'unet': _TorchStack(parts['unet'], parts['unet'])},
                           PROMPTS, latents, 1, 0.0)
  np.testing.assert_allclose(ours, ref, atol=2e-3, rtol=0)


@pytest.mark.slow  # traces SD 1.5's stacked U-Net
def test_instaflow_1_7b_config_builds_the_stacked_sd15_unet():
  c = instaflow_1_7b.get_config()
  assert c.stages == ('distill',) and c.model.unet_kind == 'stacked'
  two_rf = sd15_distill.TEACHER  # the last reflow phase
  assert (c.distill.teacher, c.distill.init, c.distill.loss) == (two_rf, two_rf, 'l2')
  assert 0 < c.distill.switch_step < c.distill.steps and c.distill.loss_after == "lpips"
  counts = {}
  for dropped, keep_mid in [(c.model.stacked.num_dropped_levels, c.model.stacked.keep_mid),
                            (0, False), (1, False)]:
    config = StackedUNetConfig.from_dict(
        {'unet': SD15, 'num_dropped_levels': dropped, 'keep_mid': keep_mid})
    model = StackedUNet(config, dtype=jnp.dtype(c.model.compute_dtype), remat_policy=c.model.remat_policy)
    shapes = flat_param_shapes(abstract_variables(model))
    counts[dropped, keep_mid] = _count(shapes)
    print(f'stacked SD 1.5 U-Net, num_dropped_levels={dropped} keep_mid={keep_mid}: '
          f'{counts[dropped, keep_mid]:,} params')
  assert counts[0, True] == 2 * SD15_PARAMS
  assert 2 * SD15_PARAMS > counts[0, False] > counts[1, False]


def test_base_unet_is_the_single_unet_it_is_made_from():
  config = StackedUNetConfig.from_dict(
      {'unet': THREE_LEVELS, 'num_dropped_levels': 1, 'keep_mid': False})
  stacked = StackedUNet(config, dtype=jnp.bfloat16, remat_policy='full')
  base = stacked.base_unet()
  assert base.config == config.unet and base.dtype == jnp.bfloat16
  assert base.remat_policy == 'full'
  assert base.parent is None  # usable on its own, outside the stack
