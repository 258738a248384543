"""Pipeline.from_diffusers / generate / save_diffusers against PyTorch, on a tiny random folder."""
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch

from instaflow_jax import sampling
from instaflow_jax.convert.torch_names import ConversionError
from instaflow_jax.pipeline import Pipeline
from tests import tiny_models

PROMPTS = ['a red dot', 'two blue cubes']
NEGATIVE = ['blurry', 'green']


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tiny_pipeline'))
  torch_parts = tiny_models.write_tiny_pipeline(path)
  return path, torch_parts


@pytest.fixture(scope='module')
def pipe(folder):
  return Pipeline.from_diffusers(folder[0])


def _torch_embeds(parts, prompts):
  ids = parts['tokenizer'](prompts, padding='max_length',
                           max_length=parts['tokenizer'].model_max_length, truncation=True,
                           return_tensors='pt').input_ids
  return parts['text_encoder'](ids)[0]


@torch.no_grad()
def reference_generate(parts, prompts, latents_nhwc, num_steps, guidance_scale, negative=None):
  """The released RectifiedFlowPipeline's loop, written out in PyTorch."""
  embeds = _torch_embeds(parts, prompts)
  guided = guidance_scale > 1.0
  if guided:
    uncond = _torch_embeds(parts, negative if negative is not None else [''] * len(prompts))
    embeds = torch.cat([uncond, embeds])
  latents = torch.from_numpy(np.array(latents_nhwc)).permute(0, 3, 1, 2)
  dt = 1.0 / num_steps
  for t in [(1.0 - i / num_steps) * 1000.0 for i in range(num_steps)]:
    model_input = torch.cat([latents] * 2) if guided else latents
    v = parts['unet'](model_input, torch.ones(model_input.shape[0]) * t,
                      encoder_hidden_states=embeds).sample
    if guided:
      v_neg, v_text = v.chunk(2)
      v = v_neg + guidance_scale * (v_text - v_neg)
    latents = latents + dt * v
  vae = parts['vae']
  image = vae.decode(latents / vae.config.scaling_factor).sample
  return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize('steps,guidance,negative', [(1, 0.0, None), (4, 1.5, NEGATIVE),
                                                     (2, 3.0, None)])
def test_generate_matches_released_pipeline_semantics(folder, pipe, steps, guidance, negative):
  latents = np.asarray(pipe.initial_latents(len(PROMPTS), 16, 16, seed=3))
  ours = pipe.generate(PROMPTS, num_inference_steps=steps, guidance_scale=guidance,
                       negative_prompts=negative, latents=latents)
  ref = reference_generate(folder[1], PROMPTS, latents, steps, guidance, negative)
  assert ours.shape == (2, 16, 16, 3) and ours.dtype == np.float32
  assert ours.std() > 0.01, 'images are flat: the comparison would prove nothing'
  np.testing.assert_allclose(ours, ref, atol=2e-3, rtol=0)


def test_generate_draws_noise_from_seed(pipe):
  a = pipe.generate(PROMPTS[:1], seed=1)
  b = pipe.generate(PROMPTS[:1], seed=1)
  c = pipe.generate(PROMPTS[:1], seed=2)
  assert a.shape == (1, 16, 16, 3)
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).max() > 1e-3


@torch.no_grad()
def test_save_diffusers_loads_in_diffusers_and_transformers(folder, pipe, tmp_path):
  from diffusers import AutoencoderKL, UNet2DConditionModel
  from transformers import CLIPTextModel, CLIPTokenizer
  out = str(tmp_path / 'exported')
  pipe.save_diffusers(out)
  parts = folder[1]
  unet, info = UNet2DConditionModel.from_pretrained(os.path.join(out, 'unet'),
                                                    output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys']
  vae, info = AutoencoderKL.from_pretrained(os.path.join(out, 'vae'), output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys']
  text, info = CLIPTextModel.from_pretrained(os.path.join(out, 'text_encoder'),
                                             output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys']
  tokenizer = CLIPTokenizer.from_pretrained(os.path.join(out, 'tokenizer'))
  assert tokenizer(PROMPTS).input_ids == parts['tokenizer'](PROMPTS).input_ids

  torch.manual_seed(0)
  x = torch.randn(2, 4, 8, 8)
  ids = parts['tokenizer'](PROMPTS, padding='max_length', truncation=True, return_tensors='pt').input_ids
  emb = parts['text_encoder'](ids)[0]
  torch.testing.assert_close(text.eval()(ids)[0], emb, rtol=0, atol=0)
  torch.testing.assert_close(unet.eval()(x, 500.0, encoder_hidden_states=emb).sample,
                             parts['unet'](x, 500.0, encoder_hidden_states=emb).sample, rtol=0, atol=0)
  images = torch.randn(2, 3, 16, 16)
  torch.testing.assert_close(vae.eval()(images).sample, parts['vae'](images).sample, rtol=0, atol=0)

  # And our own loader reads the export back to the same images.
  again = Pipeline.from_diffusers(out)
  np.testing.assert_array_equal(again.generate(PROMPTS, seed=0), pipe.generate(PROMPTS, seed=0))


def test_folder_without_model_index(folder, tmp_path):
  bad = tmp_path / 'bad'
  shutil.copytree(folder[0], bad)
  os.remove(bad / 'model_index.json')
  with pytest.raises(ConversionError, match=r'bad: no model_index.json'):
    Pipeline.from_diffusers(str(bad))


def _edit_unet_weights(folder, tmp_path, edit):
  bad = tmp_path / 'bad'
  shutil.copytree(folder[0], bad)
  path = str(bad / 'unet' / 'diffusion_pytorch_model.safetensors')
  state = safetensors.numpy.load_file(path)
  edit(state)
  safetensors.numpy.save_file(state, path)
  return str(bad), path


def test_missing_key_names_file_and_key(folder, tmp_path):
  bad, path = _edit_unet_weights(folder, tmp_path, lambda s: s.pop('conv_in.weight'))
  with pytest.raises(ConversionError) as e:
    Pipeline.from_diffusers(bad)
  assert str(e.value).startswith(f"{path}: missing key 'conv_in.weight'")


def test_wrong_shape_names_file_and_key(folder, tmp_path):
  def edit(state):
    state['conv_out.bias'] = np.zeros(5, np.float32)
  bad, path = _edit_unet_weights(folder, tmp_path, edit)
  with pytest.raises(ConversionError) as e:
    Pipeline.from_diffusers(bad)
  assert str(e.value) == f"{path}: key 'conv_out.bias' has shape (5,), the model expects (4,)"


def test_unexpected_key_names_file_and_key(folder, tmp_path):
  def edit(state):
    state['extra.weight'] = np.zeros(3, np.float32)
  bad, path = _edit_unet_weights(folder, tmp_path, edit)
  with pytest.raises(ConversionError, match=r"unexpected key 'extra.weight'") as e:
    Pipeline.from_diffusers(bad)
  assert str(e.value).startswith(path)


def test_truncated_safetensors_names_file(folder, tmp_path):
  bad = tmp_path / 'bad'
  shutil.copytree(folder[0], bad)
  path = bad / 'vae' / 'diffusion_pytorch_model.safetensors'
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(ConversionError) as e:
    Pipeline.from_diffusers(str(bad))
  assert str(e.value).startswith(f'{path}: cannot read safetensors file')
  assert 'truncated or corrupt' in str(e.value)


def test_bin_weights_are_read_when_no_safetensors(folder, tmp_path, pipe):
  converted = tmp_path / 'bin'
  shutil.copytree(folder[0], converted)
  weights = converted / 'text_encoder' / 'model.safetensors'
  state = {k: torch.from_numpy(v) for k, v in safetensors.numpy.load_file(str(weights)).items()}
  state['text_model.embeddings.position_ids'] = torch.arange(16)[None]  # old checkpoints kept it
  torch.save(state, str(converted / 'text_encoder' / 'model.bin'))
  os.remove(weights)
  again = Pipeline.from_diffusers(str(converted))
  np.testing.assert_array_equal(again.generate(PROMPTS[:1], seed=0), pipe.generate(PROMPTS[:1], seed=0))


def test_frozen_networks_run_in_the_compute_dtype(pipe):
  """What a training stage runs (frozen_in): VAE and text encoder computing and stored in
  bf16, the U-Net as it was; their outputs near the float32 ones."""
  frozen = pipe.frozen_in(jnp.bfloat16)
  for module, params in ((frozen.vae, frozen.vae_params),
                         (frozen.text_encoder, frozen.text_encoder_params)):
    assert module.dtype == jnp.bfloat16
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  assert frozen.unet is pipe.unet and frozen.unet_params is pipe.unet_params
  ids = pipe.tokenize(PROMPTS)
  embeds = sampling.encode_text(frozen.modules, frozen.params, ids)
  reference = sampling.encode_text(pipe.modules, pipe.params, ids)
  assert embeds.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(embeds, np.float32), reference,
                             atol=5e-2 * np.abs(reference).max())
