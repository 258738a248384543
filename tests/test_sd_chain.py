"""The paper's chain from a diffusion model, on a tiny random Stable Diffusion folder:
pairs from the diffusion teacher (prompts from a text file) -> reflow started from the
teacher's U-Net -> distill with LPIPS -> convert to a diffusers folder -> generate."""
import os

import jax
import numpy as np
import pytest
import torch
import torchvision

from configs import shapes
from instaflow_jax import convert_cli
from instaflow_jax import pipeline as pipeline_lib
from instaflow_jax import stages
from instaflow_jax import workdir as workdir_lib
from instaflow_jax.data import input as input_lib
from instaflow_jax.data import shards
from instaflow_jax.training import loop
from tests import tiny_models

PROMPTS = ['a red cat', 'a blue dog', '', '  a red cat  ', 'a green bird on a tree', 'a house']
EVAL_PROMPTS = ['a yellow boat', 'a black horse']
GUIDANCE, STEPS = 2.0, 3


def read_pairs(pairs_dir):
  return shards.read_meta(pairs_dir, 'pairs'), shards.read_records(pairs_dir, 'pairs')


def write_lines(path, lines) -> str:
  with open(path, 'w', encoding='utf-8') as f:
    f.write('\n'.join(lines) + '\n')
  return str(path)


def write_random_vgg_trunk(path) -> str:
  """A torchvision VGG16's convolutions with random weights, as LPIPS' trunk file (nothing
  can be downloaded here); its classifier is left out, LPIPS does not read it."""
  torch.manual_seed(0)
  features = torchvision.models.vgg16(weights=None).features
  torch.save({f'features.{k}': v for k, v in features.state_dict().items()}, path)
  return str(path)


def sd_config(folder: str, prompts_file: str, *stage_names):
  """configs/shapes.py:quick with the tiny SD folder as the model and the pairs' teacher,
  and every prompt from text files: no dataset is read."""
  config = shapes.get_config('quick')
  config.stages = stage_names
  config.data.update(dict(prompts_file=prompts_file, image_size=16))
  config.model.update(dict(source='diffusers', diffusers_path=folder))
  config.pairs.update(dict(teacher=folder, num_pairs=6, shard_size=4, batch_size=4,
                           num_steps=STEPS, guidance=GUIDANCE))
  return config


@pytest.fixture(scope='module')
def sd_folder(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp('tiny_sd'))
  tiny_models.write_tiny_sd_pipeline(folder, 'epsilon')
  return folder


def test_pairs_x1_is_what_the_teacher_generates(sd_folder, tmp_path):
  # DPM-Solver++; DDIM runs the same loop with other coefficients (test_diffusion.py).
  sampler = 'dpm_solver++'
  config = sd_config(sd_folder, write_lines(tmp_path / 'prompts.txt', PROMPTS), 'pairs')
  config.pairs.sampler = sampler
  stages.run_all(config, str(tmp_path / 'work'))

  meta, records = read_pairs(str(tmp_path / 'work' / 'pairs'))
  assert meta['teacher'] == {'kind': 'diffusion', 'name': sd_folder, 'solver': sampler,
                             'num_steps': STEPS, 'guidance': GUIDANCE}
  assert meta['prompts'] == f'file:{tmp_path}/prompts.txt'
  prompts = input_lib.read_prompts(config.data.prompts_file)
  assert prompts == ['a red cat', 'a blue dog', 'a red cat', 'a green bird on a tree', 'a house']
  teacher = pipeline_lib.Pipeline.from_diffusers(sd_folder)
  indices = [int(r['index']) for r in records]
  assert indices == list(range(6))
  pair_prompts = [prompts[i % len(prompts)] for i in indices]  # the sixth cycles to the first
  np.testing.assert_array_equal(np.stack([r['input_ids'] for r in records]),
                                teacher.tokenize(pair_prompts))
  x0 = np.stack([r['x0'] for r in records])
  expected = teacher.generate(pair_prompts, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                              latents=x0, sampler=sampler, output_type='latent')
  np.testing.assert_allclose(np.stack([r['x1'] for r in records]), expected,
                             rtol=0, atol=1e-5 * np.abs(expected).max())


@pytest.mark.slow  # runs three training stages and the conversion
def test_paper_chain_from_a_diffusion_teacher(sd_folder, tmp_path):
  config = sd_config(sd_folder, write_lines(tmp_path / 'prompts.txt', PROMPTS),
                     'pairs', 'reflow', 'distill')
  config.data.eval_prompts_file = write_lines(tmp_path / 'eval_prompts.txt', EVAL_PROMPTS)
  small = dict(batch_size=2, log_every=1, checkpoint_every=2, sample_every=2, num_samples=2,
               sample_steps=1)
  # A learning rate this small keeps the 2-RF at its start: the teacher's U-Net.
  config.reflow.update(dict(init='', steps=2, **small))
  config.reflow.optimizer.update(dict(lr=1e-9, warmup_steps=0))
  config.distill.update(dict(steps=2, teacher_steps=2, loss='lpips', lpips_net='vgg',
                             lpips_trunk_path=write_random_vgg_trunk(tmp_path / 'vgg16.pth'),
                             **small))
  workdir = str(tmp_path / 'work')
  stages.run_all(config, workdir)
  for stage in config.stages:
    assert workdir_lib.is_complete(os.path.join(workdir, stage)), stage
  for stage in ('reflow', 'distill'):
    losses = [r['loss'] for r in loop.read_metrics(os.path.join(workdir, stage)) if 'loss' in r]
    assert len(losses) == 2 and np.all(np.isfinite(losses)), stage

  teacher = pipeline_lib.Pipeline.from_diffusers(sd_folder)
  reflow = pipeline_lib.Pipeline.from_checkpoint(
      workdir_lib.find_trained_params(workdir, stage='reflow'))
  assert jax.tree.all(jax.tree.map(
      lambda a, b: np.allclose(a, b, rtol=0, atol=1e-6), reflow.unet_params,
      teacher.unet_params))

  exported = str(tmp_path / 'exported')
  convert_cli.convert(workdir, exported, stage='distill')
  converted = pipeline_lib.Pipeline.from_diffusers(exported)
  assert converted.kind == 'flow'
  student = pipeline_lib.Pipeline.from_checkpoint(
      workdir_lib.find_trained_params(workdir, stage='distill'))
  noise = student.initial_latents(len(EVAL_PROMPTS), 16, 16, seed=3)
  ours = student.generate(EVAL_PROMPTS, num_inference_steps=1, latents=noise)
  theirs = converted.generate(EVAL_PROMPTS, num_inference_steps=1, latents=noise)
  np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-6)
  assert not np.allclose(student.unet_params['conv_in']['kernel'],
                         teacher.unet_params['conv_in']['kernel'])
