"""LoRA files (convert/lora_files.py, models/lora.py) against diffusers and peft, on a tiny
random Stable Diffusion folder: images with a LoRA made by peft and saved by diffusers, at
two scales; our exported LoRA in diffusers; kohya's key style; bad files."""
import json
import os
import re

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch

from instaflow_jax.convert import lora_files
from instaflow_jax.convert.torch_names import ConversionError
from instaflow_jax.models import lora as lora_lib
from instaflow_jax.pipeline import Pipeline
from tests import tiny_models

PROMPTS = ['a red dot', 'two blue cubes']
STEPS, GUIDANCE = 4, 3.0
# The images of a pipeline against diffusers' (pixels in [0, 1]), as test_pipeline's.
PIXEL_TOLERANCE = 2e-3
# Layers with LoRA: the attention projections, and proj_in/proj_out, which are 1x1
# convolutions in SD 1.5's U-Net (use_linear_projection=False).
UNET_TARGETS = ['to_q', 'to_k', 'to_v', 'to_out.0', 'proj_in', 'proj_out']
TEXT_TARGETS = ['q_proj', 'k_proj', 'v_proj', 'out_proj']


def _diffusers_pipeline(folder):
  from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
  pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                 requires_safety_checker=False)
  pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
  pipe.set_progress_bar_config(disable=True)
  return pipe


def _randomize_lora_(model, seed):
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'lora_' in name:
        p.copy_(0.3 * torch.randn(p.shape, generator=generator))


@pytest.fixture(scope='module')
def sd_folder(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tiny_sd'))
  tiny_models.write_tiny_sd_pipeline(path)
  return path


@pytest.fixture(scope='module')
def lora_dir(sd_folder, tmp_path_factory):
  """A LoRA of the U-Net (rank 4, alpha 8) and the text encoder (rank 2, alpha 2) made with
  peft and saved with diffusers' save_lora_weights."""
  from diffusers import StableDiffusionPipeline
  from peft import LoraConfig
  from peft import inject_adapter_in_model
  from peft.utils import get_peft_model_state_dict
  pipe = _diffusers_pipeline(sd_folder)
  unet_config = LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS)
  text_config = LoraConfig(r=2, lora_alpha=2, target_modules=TEXT_TARGETS)
  pipe.unet.add_adapter(unet_config)
  # peft itself: transformers' add_adapter wants a newer peft than the registry has.
  inject_adapter_in_model(text_config, pipe.text_encoder)
  _randomize_lora_(pipe.unet, 0)
  _randomize_lora_(pipe.text_encoder, 1)
  path = str(tmp_path_factory.mktemp('lora'))
  StableDiffusionPipeline.save_lora_weights(
      path, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
      text_encoder_lora_layers={k.replace('.default.', '.'): v for k, v in
                                pipe.text_encoder.state_dict().items() if '.lora_' in k},
      unet_lora_adapter_metadata=unet_config.to_dict(),
      text_encoder_lora_adapter_metadata=text_config.to_dict())
  return path


@pytest.fixture(scope='module')
def ours(sd_folder):
  return Pipeline.from_diffusers(sd_folder)


@pytest.fixture(scope='module')
def latents(ours):
  return np.asarray(ours.initial_latents(len(PROMPTS), 16, 16, seed=4))


def _our_images(pipe, latents):
  return pipe.generate(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                       latents=latents, sampler='dpm_solver++')


@torch.no_grad()
def _diffusers_images(folder, lora_path, scale, latents, fuse):
  pipe = _diffusers_pipeline(folder)
  pipe.load_lora_weights(lora_path)
  if fuse:
    pipe.fuse_lora(lora_scale=scale)
  else:
    pipe.set_adapters(pipe.get_active_adapters(), adapter_weights=[scale])
  return pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
              latents=torch.from_numpy(latents.copy()).permute(0, 3, 1, 2), output_type='np').images


@pytest.mark.parametrize('scale,fuse', [(1.0, False), (0.5, True), (0.5, False)])
def test_images_match_diffusers_load_lora_weights(sd_folder, lora_dir, ours, latents, scale, fuse):
  with_lora = ours.with_lora(lora_dir, scale)
  mine = _our_images(with_lora, latents)
  reference = _diffusers_images(sd_folder, lora_dir, scale, latents, fuse)
  without = _our_images(ours, latents)
  assert np.abs(reference - without).max() > 20 * PIXEL_TOLERANCE, 'the LoRA changes nothing'
  np.testing.assert_allclose(mine, reference, atol=PIXEL_TOLERANCE, rtol=0)


def test_text_encoder_and_conv_layers_are_adapted(lora_dir, ours):
  trees = lora_files.read_lora(lora_dir, {'unet': ours.unet_params,
                                          'text_encoder': ours.text_encoder_params})
  unet_layers = {m[-1] for m in lora_lib.layers_of(trees['unet'])}
  text_layers = {m[-1] for m in lora_lib.layers_of(trees['text_encoder'])}
  assert unet_layers == {'to_q', 'to_k', 'to_v', 'to_out_0', 'proj_in', 'proj_out'}
  assert text_layers == {'q_proj', 'k_proj', 'v_proj', 'out_proj'}


def _kohya_name(key: str) -> str:
  """A diffusers (peft) key as kohya's sd-scripts names it."""
  component, module, part = re.match(r'^(unet|text_encoder)\.(.+)\.lora_([AB])\.weight$',
                                     key).groups()
  prefix = 'lora_unet_' if component == 'unet' else 'lora_te_'
  return f'{prefix}{module.replace(".", "_")}.lora_{"down" if part == "A" else "up"}.weight'


def _as_kohya(lora_dir, out_path):
  """The file with kohya's keys, and each layer's alpha (8 over rank 4 in the U-Net, 2 over
  rank 2 in the text encoder) as kohya stores it."""
  state = safetensors.numpy.load_file(os.path.join(lora_dir, lora_files.WEIGHTS_NAME))
  kohya = {_kohya_name(k): v for k, v in state.items()}
  for key in list(kohya):
    if key.endswith('.lora_down.weight'):
      alpha = 8.0 if key.startswith('lora_unet_') else 2.0
      kohya[key.replace('.lora_down.weight', '.alpha')] = np.asarray(alpha, np.float32)
  safetensors.numpy.save_file(kohya, out_path)
  return out_path


def test_kohya_keys_load_as_the_diffusers_file(sd_folder, lora_dir, ours, latents, tmp_path):
  kohya = _as_kohya(lora_dir, str(tmp_path / 'kohya.safetensors'))
  from_kohya = _our_images(ours.with_lora(kohya, 0.5), latents)
  np.testing.assert_allclose(from_kohya, _our_images(ours.with_lora(lora_dir, 0.5), latents),
                             atol=1e-5, rtol=0)
  # diffusers reads kohya's keys too, to the same images.
  np.testing.assert_allclose(from_kohya, _diffusers_images(sd_folder, kohya, 0.5, latents, True),
                             atol=PIXEL_TOLERANCE, rtol=0)
  # The 1x1 convolutions' LoRA stored as a Linear's, as for SD 2's linear projections.
  state = safetensors.numpy.load_file(kohya)
  flat = {k: (v[:, :, 0, 0] if v.ndim == 4 and v.shape[2:] == (1, 1) else v)
          for k, v in state.items()}
  assert any(v.ndim == 4 for v in state.values())
  safetensors.numpy.save_file(flat, str(tmp_path / 'flat.safetensors'))
  networks = {'unet': ours.unet_params, 'text_encoder': ours.text_encoder_params}
  jax.tree.map(np.testing.assert_array_equal,
               lora_files.read_lora(str(tmp_path / 'flat.safetensors'), networks),
               lora_files.read_lora(kohya, networks))


def test_exported_lora_loads_in_diffusers(sd_folder, ours, latents, tmp_path):
  lora = lora_lib.init_lora(ours.unet_params, ('to_q', 'to_v', 'proj_in'), 3, jax.random.key(0))
  lora = jax.tree.map(lambda x: np.asarray(x) + 0.2 * np.random.default_rng(0).standard_normal(
      x.shape).astype(np.float32), lora)  # a trained-looking LoRA: up no longer zero
  alpha = 6.0
  out = tmp_path / 'exported'
  out.mkdir()
  path = str(out / lora_files.WEIGHTS_NAME)
  lora_files.write_lora(path, lora, lora_files.kernel_shapes(ours.unet_params,
                                                             lora_lib.layers_of(lora)),
                        alpha / lora_lib.rank_of(lora))
  import dataclasses
  merged = dataclasses.replace(
      ours, unet_params=lora_lib.merge(ours.unet_params, lora, alpha / lora_lib.rank_of(lora)))
  reference = _diffusers_images(sd_folder, str(out), 1.0, latents, False)
  assert np.abs(reference - _our_images(ours, latents)).max() > 20 * PIXEL_TOLERANCE
  np.testing.assert_allclose(_our_images(merged, latents), reference, atol=PIXEL_TOLERANCE, rtol=0)


def _edited(lora_dir, tmp_path, edit):
  state = safetensors.numpy.load_file(os.path.join(lora_dir, lora_files.WEIGHTS_NAME))
  edit(state)
  path = str(tmp_path / 'edited.safetensors')
  safetensors.numpy.save_file(state, path)
  return path


def test_lora_of_another_architecture(lora_dir, ours, tmp_path):
  def sdxl_like(state):
    state['unet.down_blocks.2.attentions.1.transformer_blocks.9.attn1.to_q.lora_A.weight'] = (
        np.zeros((4, 1280), np.float32))
  path = _edited(lora_dir, tmp_path, sdxl_like)
  with pytest.raises(ConversionError, match=r"LoRA layer 'unet.down_blocks.2.attentions.1."
                     r"transformer_blocks.9.attn1.to_q' matches no layer of this model"
                     r" \(1 of \d+ match none\); the LoRA was made for another architecture"):
    ours.with_lora(path)


def test_rank_mismatch(lora_dir, ours, tmp_path):
  key = 'unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight'

  def cut(state):
    state[key] = state[key][:, :3]
  with pytest.raises(ConversionError, match=r'rank mismatch, its down weight has rank 4'):
    ours.with_lora(_edited(lora_dir, tmp_path, cut))


def test_not_a_lora_file(ours, sd_folder):
  with pytest.raises(ConversionError, match=r"key '.*' is not a LoRA weight"):
    ours.with_lora(os.path.join(sd_folder, 'unet', 'diffusion_pytorch_model.safetensors'))


def test_generate_command_with_lora(sd_folder, lora_dir, ours, tmp_path):
  from instaflow_jax import generate
  from instaflow_jax import images as image_io
  from PIL import Image
  out = tmp_path / 'out'
  generate.main(['generate', f'--model={sd_folder}', f'--prompt={PROMPTS[0]}', '--steps=2',
                 f'--lora={lora_dir}', '--lora_scale=0.5', f'--out={out}'])
  written = np.asarray(Image.open(out / '0000_a-red-dot.png'), np.int32)
  expected = image_io.to_uint8(ours.with_lora(lora_dir, 0.5).generate(
      PROMPTS[:1], num_inference_steps=2, seed=0))[0].astype(np.int32)
  assert np.abs(written - expected).max() <= 1


def test_generate_command_refuses_a_lora_of_another_model(sd_folder, lora_dir, tmp_path):
  from instaflow_jax import generate
  path = _edited(lora_dir, tmp_path, lambda s: s.update(
      {'unet.mid_block.attentions.0.transformer_blocks.3.attn2.to_k.lora_A.weight':
       np.zeros((4, 768), np.float32)}))
  out = tmp_path / 'out'
  with pytest.raises(SystemExit) as e:
    generate.main(['generate', f'--model={sd_folder}', '--prompt=a', f'--lora={path}',
                   f'--out={out}'])
  message = str(e.value.code)
  assert message.startswith(f'error: {path}: LoRA layer ') and '\n' not in message
  assert 'matches no layer of this model' in message and not out.exists()


@pytest.mark.parametrize('field,value,message', [
    ('stages', ('pairs',), "config.model.lora.stages names 'pairs', which is no training stage"),
    ('rank', 0, 'config.model.lora.rank = 0: must be a whole number >= 1'),
    ('alpha', -1.0, 'config.model.lora.alpha = -1.0: must be a finite number > 0'),
    ('target_modules', (), 'config.model.lora.target_modules is empty')])
def test_bad_lora_config_is_named(field, value, message):
  from configs import shapes
  from instaflow_jax import config_checks
  config = shapes.get_config('quick')
  config.model.lora.stages = ('reflow',)
  config.model.lora[field] = value
  with pytest.raises(ValueError, match=re.escape(message)):
    config_checks.check_config(config)


def test_target_modules_that_name_no_layer(ours):
  with pytest.raises(ValueError, match=r"model.lora.target_modules = \('to_x',\) names no layer"):
    lora_lib.init_lora(ours.unet_params, ('to_x',), 4, jax.random.key(0))
