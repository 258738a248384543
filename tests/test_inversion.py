"""Inversion, editing and image to image with a flow (Pipeline.invert / edit / generate's
init_images, generate --init_image), on a tiny random flow folder, against the flow's ODE
written out in PyTorch."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from instaflow_jax import generate
from instaflow_jax import images as image_io
from instaflow_jax.pipeline import Pipeline
from tests import tiny_models
from tests.test_pipeline import _torch_embeds

PROMPTS = ['a red dot', 'two blue cubes']


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tiny_flow'))
  return path, tiny_models.write_tiny_pipeline(path)


@pytest.fixture(scope='module')
def pipe(folder):
  return Pipeline.from_diffusers(folder[0])


@pytest.fixture(scope='module')
def images(pipe):
  return pipe.generate(PROMPTS, num_inference_steps=2, seed=1)


@torch.no_grad()
def reference_invert(parts, prompts, images_nhwc, num_steps, guidance_scale):
  """The flow's ODE from s=1 back to 0 in PyTorch: latents = the VAE posterior's mean,
  then N Euler steps v(x, s_k) at s_k = 1 - k/N (timestep 1000 k/N), x -= v/N."""
  embeds = _torch_embeds(parts, prompts)
  guided = guidance_scale > 1.0
  if guided:
    embeds = torch.cat([_torch_embeds(parts, [''] * len(prompts)), embeds])
  vae = parts['vae']
  pixels = torch.from_numpy(np.array(images_nhwc)).permute(0, 3, 1, 2) * 2 - 1
  latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
  for k in range(num_steps):
    model_input = torch.cat([latents] * 2) if guided else latents
    v = parts['unet'](model_input, torch.ones(model_input.shape[0]) * 1000.0 * k / num_steps,
                      encoder_hidden_states=embeds).sample
    if guided:
      v_neg, v_text = v.chunk(2)
      v = v_neg + guidance_scale * (v_text - v_neg)
    latents = latents - v / num_steps
  return latents.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize('steps,guidance', [(1, 0.0), (3, 2.0)])
def test_invert_matches_the_backward_ode_in_pytorch(folder, pipe, images, steps, guidance):
  noise = pipe.invert(images, PROMPTS, num_inference_steps=steps, guidance_scale=guidance)
  reference = reference_invert(folder[1], PROMPTS, images, steps, guidance)
  assert noise.shape == (2, 8, 8, 4)
  relative = np.abs(noise - reference).max() / np.abs(reference).max()
  assert relative <= 1e-4, relative


def test_invert_then_generate_reconstructs_as_the_steps_grow(pipe, images):
  """The ODE is reversible: the error of generate(invert(x)) falls with the step count."""
  latents = np.asarray(pipe.encode(images))
  errors = []
  for steps in (1, 16):
    noise = pipe.invert(images, PROMPTS, num_inference_steps=steps)
    again = pipe.generate(PROMPTS, num_inference_steps=steps, latents=noise, output_type='latent')
    errors.append(float(np.sqrt(np.mean(np.square(again - latents)))))
  assert errors[1] < errors[0] / 4, errors


def test_edit_generates_from_the_inverted_noise(pipe, images):
  edited = pipe.edit(images, PROMPTS, PROMPTS[::-1], num_inference_steps=2)
  noise = pipe.invert(images, PROMPTS, num_inference_steps=2)
  np.testing.assert_array_equal(edited, pipe.generate(PROMPTS[::-1], 2, latents=noise))


def test_image_to_image_starts_on_the_flow_path(pipe, images):
  noise = np.asarray(pipe.initial_latents(2, 16, 16, seed=3))
  full = pipe.generate(PROMPTS, 2, latents=noise, init_images=images, strength=1.0)
  np.testing.assert_array_equal(full, pipe.generate(PROMPTS, 2, latents=noise))
  light = pipe.generate(PROMPTS, 2, latents=noise, init_images=images, strength=0.3)
  assert np.abs(light - images).mean() < np.abs(full - images).mean()
  with pytest.raises(ValueError, match=r'strength 0.0: must be in \(0, 1\]'):
    pipe.generate(PROMPTS, 2, latents=noise, init_images=images, strength=0.0)


def test_generate_command_with_init_image(folder, pipe, images, tmp_path):
  path = str(tmp_path / 'init.png')
  image_io.save_png(path, images[0])
  out = tmp_path / 'out'
  generate.main(['generate', f'--model={folder[0]}', f'--prompt={PROMPTS[1]}', '--steps=2',
                 f'--init_image={path}', '--strength=0.5', f'--out={out}'])
  written = np.asarray(Image.open(out / '0000_two-blue-cubes.png'), np.int32)
  init = image_io.resized_pixels(image_io.read_image(path), 16)
  expected = image_io.to_uint8(pipe.generate(PROMPTS[1:], 2, seed=0, init_images=init[None],
                                             strength=0.5))[0].astype(np.int32)
  assert np.abs(written - expected).max() <= 1


def test_init_image_that_is_not_an_image(folder, tmp_path):
  bad = tmp_path / 'notes.png'
  bad.write_text('not an image')
  out = tmp_path / 'out'
  with pytest.raises(SystemExit) as e:
    generate.main(['generate', f'--model={folder[0]}', '--prompt=a', f'--init_image={bad}',
                   f'--out={out}'])
  message = str(e.value.code)
  assert message.startswith(f'error: {bad}: not an image (') and '\n' not in message
  assert message.endswith('give a PNG or JPEG file') and not os.path.exists(out)
