"""`python -m instaflow_jax.generate`, run in-process, and how it finds our checkpoints."""
import dataclasses
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from instaflow_jax import cli
from instaflow_jax import generate
from instaflow_jax import images as image_io
from instaflow_jax import pipeline as pipeline_lib
from instaflow_jax import workdir as workdir_lib
from tests import fake_runs
from tests import runs
from tests import tiny_models

PROMPTS = ['a red dot', 'two blue cubes']


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tiny_pipeline'))
  tiny_models.write_tiny_pipeline(path)
  return path


@pytest.fixture(scope='module')
def pipe(folder):
  return pipeline_lib.Pipeline.from_diffusers(folder)


def run_generate(*flags):
  generate.main(['generate', *flags])


def error_of(*flags) -> str:
  with pytest.raises(SystemExit) as e:
    run_generate(*flags)
  return str(e.value.code)


def read_png(path) -> np.ndarray:
  return np.asarray(Image.open(path), np.int32)


def test_images_are_those_of_pipeline_generate(folder, pipe, tmp_path, capsys):
  prompts_file = tmp_path / 'prompts.txt'
  prompts_file.write_text(f'\n{PROMPTS[1]}\n\n')
  out = tmp_path / 'out'
  run_generate(f'--model={folder}', f'--prompt={PROMPTS[0]}', f'--prompts_file={prompts_file}',
               '--seed=3', '--batch_size=2', f'--out={out}')
  assert sorted(os.listdir(out)) == ['0000_a-red-dot.png', '0001_two-blue-cubes.png',
                                     generate.GRID]
  expected = image_io.to_uint8(pipe.generate(PROMPTS, seed=3)).astype(np.int32)
  assert expected.std() > 2, 'flat images would prove nothing'
  written = np.stack([read_png(out / name) for name in sorted(os.listdir(out))[:2]])
  assert np.abs(written - expected).max() <= 1  # one level of rounding
  np.testing.assert_array_equal(read_png(out / generate.GRID),
                                image_io.to_uint8(image_io.make_grid(written / 255.0)))
  printed = capsys.readouterr().out
  assert 'compile: ' in printed and ' ms/image (2 images, batches of 2)' in printed


def test_batches_are_padded_and_the_noise_is_drawn_once(pipe):
  calls = []

  def fake_generate(prompts, num_inference_steps, guidance_scale, latents, sampler):
    calls.append(list(prompts))
    return np.asarray(latents)[..., :3]  # the images show which noise each one got

  stub = dataclasses.replace(pipe)
  stub.generate = fake_generate
  prompts = [f'prompt {i}' for i in range(5)]
  images, timing = generate.generate_images(stub, prompts, steps=1, guidance=0.0, seed=7,
                                            batch_size=2)
  np.testing.assert_array_equal(images, np.asarray(pipe.initial_latents(5, 16, 16, 7))[..., :3])
  assert calls == [prompts[0:2], prompts[2:4], [prompts[4]] * 2]
  assert timing.compile_s >= 0 and timing.per_image_s > 0


def test_a_workdir_gives_its_latest_stage_and_a_grid(quick_chain, tmp_path, capsys):
  out = tmp_path / 'out'
  run_generate(f'--model={quick_chain}', '--prompt=a red circle', '--prompt=a blue square',
               '--prompt=a green cross', f'--out={out}')
  assert len(os.listdir(out)) == 4
  assert read_png(out / generate.GRID).shape == (35, 35, 3)  # 2x2 cells of 16 px, 1 px pad
  assert 'wrote 3 images' in capsys.readouterr().out


def test_find_trained_params_in_each_kind_of_path(tmp_path):
  workdir = str(tmp_path / 'run')
  config = fake_runs.diffusers_model_config('/base')
  rf = fake_runs.write_stage(workdir, 'rf', config, params={'w': jnp.zeros(2)})
  fake_runs.write_stage(workdir, 'reflow', config, done=False)  # interrupted: no params
  os.makedirs(os.path.join(rf, 'checkpoints', '10', 'state'))
  find = workdir_lib.find_trained_params
  final = workdir_lib.TrainedParams(os.path.join(rf, 'config.json'), os.path.join(rf, 'params'))
  assert find(workdir) == find(workdir, stage='rf') == find(rf) == find(final.params_path) == final
  step = os.path.join(rf, 'checkpoints', '10')
  assert find(step) == workdir_lib.TrainedParams(final.config_path, step, 'ema_params')
  assert find(step, params='raw').state_key == 'params'
  assert find(workdir).model_config().diffusers_path == '/base'
  with pytest.raises(FileNotFoundError, match='reflow: no final params'):
    find(workdir, stage='reflow')
  with pytest.raises(ValueError, match='final params are the EMA params'):
    find(rf, params='raw')
  with pytest.raises(ValueError, match="stage 'pairs' has no U-Net params"):
    find(workdir, stage='pairs')
  with pytest.raises(ValueError, match='neither a diffusers folder'):
    find(str(tmp_path))


def test_bad_input_is_one_line_before_any_compute(folder, tmp_path, monkeypatch):
  def must_not_load(source):
    raise AssertionError('loaded a model before checking the input')

  monkeypatch.setattr(pipeline_lib, 'load_pipeline', must_not_load)
  a_file = tmp_path / 'a_file'
  a_file.write_text('')
  ok = [f'--model={folder}', '--prompt=x']
  missing = tmp_path / 'missing.txt'
  assert error_of(f'--model={folder}', f'--prompts_file={missing}', f'--out={tmp_path}/o') == (
      f'error: --prompts_file={missing}: file not found')
  assert error_of(f'--model={tmp_path}', '--prompt=x', f'--out={tmp_path}/o') == (
      f'error: {tmp_path}: neither a diffusers folder (model_index.json) nor a workdir, stage '
      'directory, params/ or checkpoints/STEP directory of ours')
  assert error_of(*ok, f'--out={a_file}/o').startswith(f'error: --out={a_file}/o is not writable')
  assert error_of(f'--model={folder}', f'--out={tmp_path}/o') == (
      'error: no prompts: give --prompt or --prompts_file')
  assert error_of(*ok, f'--out={tmp_path}/o', '--stage=rf') == (
      f'error: {folder} is a diffusers folder: --stage and --params apply to our checkpoints only')
  assert error_of(*ok, f'--out={tmp_path}/o', '--sampler=ddim') == (
      "error: sampler 'ddim' does not fit a flow model; use one of 'euler' (default 'euler')")
  assert error_of('--prompt=x') == ('error: flag --model=None: Flag --model must have a value '
                                    'other than None.; flag --out=None: Flag --out must have a '
                                    'value other than None.')
  assert not os.path.exists(tmp_path / 'o')


def test_sampler_of_a_diffusion_model(tmp_path):
  folder = str(tmp_path / 'sd')
  tiny_models.write_tiny_sd_pipeline(folder)
  out = tmp_path / 'out'
  run_generate(f'--model={folder}', f'--prompt={PROMPTS[0]}', '--steps=2', '--sampler=ddim',
               f'--out={out}')
  expected = pipeline_lib.Pipeline.from_diffusers(folder).generate(
      PROMPTS[:1], num_inference_steps=2, sampler='ddim', seed=0)
  assert np.abs(read_png(out / '0000_a-red-dot.png') - image_io.to_uint8(expected[0])).max() <= 1
  assert error_of(f'--model={folder}', '--prompt=x', '--sampler=euler', f'--out={tmp_path}/o') == (
      "error: sampler 'euler' does not fit a diffusion model; use one of 'dpm_solver++', "
      "'ddim' (default 'dpm_solver++')")


def test_a_failure_leaves_no_output(tmp_path):
  new, existing = tmp_path / 'new', tmp_path / 'existing'
  existing.mkdir()
  (existing / 'old.png').write_text('old')
  for out in (new, existing):
    with pytest.raises(KeyboardInterrupt):
      with cli.staged_output(str(out), into_existing=True) as staging:
        (tmp_path / staging / '0000_x.png').write_text('half')
        raise KeyboardInterrupt
  assert not new.exists() and os.listdir(existing) == ['old.png']


@pytest.mark.slow  # a subprocess
def test_the_module_runs_as_a_command(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'instaflow_jax.generate', f'--model={tmp_path}',
       f'--prompts_file={tmp_path}/missing.txt', f'--out={tmp_path}/o'],
      cwd=runs.REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert runs.last_line(result) == f'error: --prompts_file={tmp_path}/missing.txt: file not found'
