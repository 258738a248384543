"""Diffusion models (flow/diffusion.py, Pipeline of kind 'diffusion') against diffusers:
timestep and sigma tables against the schedulers' set_timesteps, and final latents against
StableDiffusionPipeline(..., output_type='latent') on tiny random Stable Diffusion folders."""
import json
import os

import numpy as np
import pytest
import torch

from instaflow_jax.flow import diffusion
from instaflow_jax.pipeline import Pipeline
from tests import tiny_models

PROMPTS = ['a red dot', 'two blue cubes']
SD15_SCHEDULER = tiny_models.SD15_SCHEDULER


def _diffusers_scheduler(sampler: str, config: dict):
  from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
  scheduler = DPMSolverMultistepScheduler if sampler == 'dpm_solver++' else DDIMScheduler
  return scheduler.from_config(config)


@pytest.fixture(scope='module', params=['epsilon', 'v_prediction'])
def sd_folder(request, tmp_path_factory):
  path = str(tmp_path_factory.mktemp(f'tiny_sd_{request.param}'))
  return path, tiny_models.write_tiny_sd_pipeline(path, request.param)


@pytest.fixture(scope='module')
def sd_pipe(sd_folder):
  return Pipeline.from_diffusers(sd_folder[0])


@torch.no_grad()
def reference_latents(parts, sampler, latents_nhwc, num_steps, guidance_scale):
  """diffusers' StableDiffusionPipeline's final latents, NHWC."""
  from diffusers import StableDiffusionPipeline
  pipe = StableDiffusionPipeline(
      vae=parts['vae'], text_encoder=parts['text_encoder'], tokenizer=parts['tokenizer'],
      unet=parts['unet'], scheduler=_diffusers_scheduler(sampler, parts['scheduler_config']),
      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  assert pipe.scheduler.init_noise_sigma == 1.0  # so both start from the same latents
  latents = torch.from_numpy(np.array(latents_nhwc)).permute(0, 3, 1, 2)
  out = pipe(PROMPTS, num_inference_steps=num_steps, guidance_scale=guidance_scale,
             latents=latents, output_type='latent').images
  return out.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize('sampler', ['dpm_solver++', 'ddim'])
@pytest.mark.parametrize('num_steps,guidance_scale', [
    pytest.param(25, 5.0, marks=pytest.mark.slow), (8, 1.0)])
def test_final_latents_match_stable_diffusion_pipeline(sd_folder, sd_pipe, sampler, num_steps,
                                                       guidance_scale):
  latents = np.asarray(sd_pipe.initial_latents(len(PROMPTS), 16, 16, seed=5))
  ours = sd_pipe.generate(PROMPTS, num_inference_steps=num_steps, guidance_scale=guidance_scale,
                          latents=latents, sampler=sampler, output_type='latent')
  ref = reference_latents(sd_folder[1], sampler, latents, num_steps, guidance_scale)
  assert ours.shape == ref.shape == latents.shape and ours.dtype == np.float32
  assert np.abs(ref - latents).max() > 0.1, 'the sampler did nothing: the test proves nothing'
  relative = np.abs(ours - ref).max() / np.abs(ref).max()
  print(f'{sd_pipe.noise_schedule.prediction_type} {sampler} {num_steps} steps w={guidance_scale}: '
        f'max |ours - diffusers| / max |diffusers| = {relative:.2e}')
  assert relative <= 1e-3


def test_kind_default_sampler_and_images(sd_pipe):
  assert sd_pipe.kind == 'diffusion'
  assert sd_pipe.solver(None, 3).kind == 'dpm_solver++'
  images = sd_pipe.generate(PROMPTS[:1], num_inference_steps=2, seed=0)
  assert images.shape == (1, 16, 16, 3) and 0 <= images.min() and images.max() <= 1


def test_save_diffusers_keeps_class_and_scheduler(sd_folder, sd_pipe, tmp_path):
  out = str(tmp_path / 'exported')
  sd_pipe.save_diffusers(out)
  with open(os.path.join(out, 'model_index.json')) as f:
    index = json.load(f)
  assert index['_class_name'] == 'StableDiffusionPipeline'
  assert index['scheduler'] == ['diffusers', 'PNDMScheduler']
  assert Pipeline.from_diffusers(out).noise_schedule == sd_pipe.noise_schedule


def test_flow_folder_and_explicit_kind(tmp_path):
  path = str(tmp_path / 'flow')
  tiny_models.write_tiny_pipeline(path, class_name='MyPipeline')
  with pytest.raises(ValueError, match=r"names the class 'MyPipeline'.*pass kind "
                                       r"\('flow' or 'diffusion'\)"):
    Pipeline.from_diffusers(path)
  pipe = Pipeline.from_diffusers(path, kind='flow')
  assert pipe.kind == 'flow' and pipe.noise_schedule is None
  with pytest.raises(ValueError, match=r"sampler 'ddim' does not fit a flow model; use one of "
                                       r"'euler'"):
    pipe.generate(PROMPTS, sampler='ddim')
  with pytest.raises(ValueError, match=r"kind 'sd' is unknown"):
    Pipeline.from_diffusers(path, kind='sd')
  exported = str(tmp_path / 'exported')
  pipe.save_diffusers(exported)
  assert Pipeline.from_diffusers(exported).kind == 'flow'  # written as a RectifiedFlowPipeline


def test_diffusion_pipeline_refuses_euler(sd_pipe):
  with pytest.raises(ValueError, match=r"sampler 'euler' does not fit a diffusion model; use "
                                       r"one of 'dpm_solver\+\+', 'ddim'"):
    sd_pipe.generate(PROMPTS, sampler='euler')
  with pytest.raises(ValueError, match=r"output_type 'pil' is unknown"):
    sd_pipe.generate(PROMPTS, output_type='pil')


# ---- Tables against diffusers' schedulers, no network ----------------------------------

SCHEDULE_CASES = [
    dict(SD15_SCHEDULER),
    {**SD15_SCHEDULER, 'timestep_spacing': 'trailing', 'steps_offset': 0},
    {**SD15_SCHEDULER, 'timestep_spacing': 'linspace', 'steps_offset': 0},
    {**SD15_SCHEDULER, 'timestep_spacing': 'leading', 'steps_offset': 0},
    {**SD15_SCHEDULER, 'timestep_spacing': 'trailing', 'steps_offset': 1},
    {'beta_schedule': 'linear', 'num_train_timesteps': 1000, 'clip_sample': False},  # defaults
    {'beta_schedule': 'squaredcos_cap_v2', 'num_train_timesteps': 500, 'clip_sample': False,
     'set_alpha_to_one': True, 'timestep_spacing': 'linspace'},
]


@pytest.mark.parametrize('config', SCHEDULE_CASES)
@pytest.mark.parametrize('sampler', ['dpm_solver++', 'ddim'])
@pytest.mark.parametrize('num_steps', [1, 7, 25, 50])
def test_tables_match_diffusers_set_timesteps(config, sampler, num_steps):
  schedule = diffusion.NoiseSchedule.from_config(config)
  reference = _diffusers_scheduler(sampler, config)
  reference.set_timesteps(num_steps)
  tables = diffusion.DiffusionSolver(schedule, sampler, num_steps).tables()
  np.testing.assert_array_equal(tables.timesteps, reference.timesteps.numpy())
  np.testing.assert_allclose(schedule.alphas_cumprod(), reference.alphas_cumprod.numpy(),
                             rtol=2e-5)
  if sampler == 'dpm_solver++':
    # diffusers' sigmas are sigma/alpha, ending at 0
    np.testing.assert_allclose(tables.sigma / tables.alpha, reference.sigmas.numpy()[:-1],
                               rtol=2e-5)


@pytest.mark.parametrize('field,value,message', [
    ('prediction_type', 'flow_prediction',
     "prediction_type 'flow_prediction' is not supported; use one of 'epsilon', "
     "'v_prediction', 'sample' instead"),
    ('beta_schedule', 'cosine',
     "beta_schedule 'cosine' is not supported; use one of 'linear', 'scaled_linear', "
     "'squaredcos_cap_v2' instead"),
    ('timestep_spacing', 'uniform',
     "timestep_spacing 'uniform' is not supported; use one of 'leading', 'trailing', "
     "'linspace' instead"),
])
def test_unsupported_scheduler_config_names_file_and_field(tmp_path, field, value, message):
  os.makedirs(tmp_path / 'scheduler')
  path = tmp_path / 'scheduler' / 'scheduler_config.json'
  path.write_text(json.dumps({**SD15_SCHEDULER, field: value}))
  with pytest.raises(ValueError) as e:
    diffusion.read_noise_schedule(str(tmp_path))
  assert str(e.value) == f'{path}: {message}'


def test_missing_scheduler_config(tmp_path):
  with pytest.raises(OSError, match=r'scheduler_config.json: file not found'):
    diffusion.read_noise_schedule(str(tmp_path))


def test_bad_solver_settings():
  schedule = diffusion.NoiseSchedule.from_config(SD15_SCHEDULER)
  with pytest.raises(ValueError, match=r'clip_sample true is not supported by the ddim sampler'):
    diffusion.DiffusionSolver(diffusion.NoiseSchedule(), 'ddim', 10)
  with pytest.raises(ValueError, match=r'num_steps 0 must be in \[1, 1000\]'):
    diffusion.DiffusionSolver(schedule, 'dpm_solver++', 0)
  with pytest.raises(ValueError, match=r"sampler 'heun' is not supported"):
    diffusion.DiffusionSolver(schedule, 'heun', 10)
  with pytest.raises(ValueError, match=r'trained_betas has 2 values but num_train_timesteps '
                                       r'is 1000'):
    diffusion.NoiseSchedule.from_config({'trained_betas': [0.1, 0.2]})
