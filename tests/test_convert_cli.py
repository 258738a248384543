"""`python -m instaflow_jax.convert`, run in-process: our runs <-> diffusers folders."""
import os
import subprocess
import sys
import types

import jax
import numpy as np
import optax
import pytest
import safetensors.numpy
import torch

from configs import shapes
from instaflow_jax import checkpoint
from instaflow_jax import convert_cli as cli
from instaflow_jax import pipeline as pipeline_lib
from instaflow_jax import workdir as workdir_lib
from instaflow_jax.convert import diffusers as diffusers_io
from instaflow_jax.stages import common
from instaflow_jax.training.state import TrainState
from tests import fake_runs
from tests import runs
from tests import test_pipeline
from tests import tiny_models

PROMPTS = test_pipeline.PROMPTS
UNET_WEIGHTS = os.path.join('unet', 'diffusion_pytorch_model.safetensors')


def perturbed(params, seed: int):
  """Params that differ from the base model's, as training leaves them (numpy: jax would
  compile one program per parameter shape)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: (np.asarray(x) + 0.05 * rng.standard_normal(x.shape)).astype(np.float32), params)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A reflow stage fine-tuned from a tiny diffusers folder, with a train-state checkpoint."""
  folder = str(tmp_path_factory.mktemp('tiny_pipeline'))
  tiny_models.write_tiny_pipeline(folder)
  _, unet, base_params = diffusers_io.load_component(folder, 'unet')
  workdir = str(tmp_path_factory.mktemp('run'))
  ema = perturbed(base_params, seed=1)
  stage_dir = fake_runs.write_stage(workdir, 'reflow', fake_runs.diffusers_model_config(folder),
                                    params=ema)
  raw = perturbed(base_params, seed=2)
  tx = optax.sgd(0.1)
  state = TrainState(step=np.int32(7), params=raw, ema_params=ema, opt_state=tx.init(raw), tx=tx)
  checkpointer = checkpoint.Checkpointer(os.path.join(stage_dir, 'checkpoints'), save_every=1)
  checkpointer.save(7, state, {'step': 7})
  checkpointer.close()
  return dict(folder=folder, workdir=workdir, stage_dir=stage_dir, ema=ema, raw=raw, unet=unet)


def run_convert(*flags):
  cli.main(['convert', *flags])


def error_of(*flags) -> str:
  with pytest.raises(SystemExit) as e:
    run_convert(*flags)
  return str(e.value.code)


def read_params(path, unet):
  """Params at `path` as a stage reads its `init` (an absolute path) for `unet`."""
  return common.initial_unet_params(types.SimpleNamespace(unet=unet, unet_params=None), '',
                                    str(path), 'rf.init')


def assert_same_params(got, expected):
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def test_round_trip_ours_diffusers_ours_is_bitwise(run, tmp_path, capsys):
  exported, back = tmp_path / 'exported', tmp_path / 'back'
  run_convert(f'--src={run["workdir"]}', f'--out={exported}')
  assert {'model_index.json', 'unet', 'vae', 'text_encoder', 'tokenizer'} <= set(
      os.listdir(exported))
  run_convert(f'--src={exported}', f'--out={back}')
  assert_same_params(read_params(back, run['unet']), run['ema'])
  assert sorted(os.listdir(tmp_path)) == ['back', 'exported']  # no staging directory is left
  assert f'--config.<stage>.init={back}' in capsys.readouterr().out


@pytest.mark.slow  # a sweep beside the parity test of the quick tier
@torch.no_grad()
def test_diffusers_loads_the_export_and_computes_our_images(run, tmp_path):
  from diffusers import AutoencoderKL, UNet2DConditionModel
  from transformers import CLIPTextModel, CLIPTokenizer
  exported = str(tmp_path / 'exported')
  run_convert(f'--src={run["stage_dir"]}', f'--out={exported}')
  parts = {}
  for name, cls in [('unet', UNet2DConditionModel), ('vae', AutoencoderKL),
                    ('text_encoder', CLIPTextModel)]:
    parts[name], info = cls.from_pretrained(os.path.join(exported, name),
                                            output_loading_info=True)
    assert not info['missing_keys'] and not info['unexpected_keys'], name
    parts[name].eval()
  parts['tokenizer'] = CLIPTokenizer.from_pretrained(os.path.join(exported, 'tokenizer'))
  base_weights = safetensors.numpy.load_file(os.path.join(run['folder'], UNET_WEIGHTS))
  assert not np.allclose(parts['unet'].conv_in.weight.numpy(), base_weights['conv_in.weight'])

  ours = pipeline_lib.Pipeline.from_checkpoint(
      workdir_lib.find_trained_params(run['stage_dir']))
  latents = np.asarray(ours.initial_latents(len(PROMPTS), 16, 16, seed=5))
  expected = test_pipeline.reference_generate(parts, PROMPTS, latents, 1, 0.0)
  np.testing.assert_allclose(ours.generate(PROMPTS, latents=latents), expected, atol=2e-3, rtol=0)


def test_raw_or_ema_params_of_a_checkpoint_step(run, tmp_path):
  step_dir = os.path.join(run['stage_dir'], 'checkpoints', '7')
  exported, back = tmp_path / 'exported', tmp_path / 'back'
  run_convert(f'--src={step_dir}', '--params=raw', f'--out={exported}')
  run_convert(f'--src={exported}', f'--out={back}')
  assert_same_params(read_params(back, run['unet']), run['raw'])
  step = workdir_lib.find_trained_params(step_dir)
  assert_same_params(
      checkpoint.load_trained_params(step, checkpoint.abstract_like(run['ema'])), run['ema'])
  with pytest.raises(checkpoint.CheckpointError, match='its ema_params do not fit the model '
                     r'config: the checkpoint has parameter conv_norm_out/bias \(32,\), which '
                     'the model config lacks'):
    checkpoint.load_trained_params(
        step, {'conv_in': checkpoint.abstract_like(run['ema']['conv_in'])})


def test_the_embedded_model_is_refused_with_the_reason(tmp_path):
  stage_dir = fake_runs.write_stage(str(tmp_path / 'run'), 'rf', shapes.get_config('quick'))
  os.makedirs(os.path.join(stage_dir, 'params'))
  assert error_of(f'--src={stage_dir}', f'--out={tmp_path}/o').startswith(
      f'error: {stage_dir}/params: the embedded model is pixel space (identity autoencoder, '
      'word-level tokenizer); no diffusers pipeline runs it')
  assert not os.path.exists(tmp_path / 'o')


def test_bad_input_is_one_line_before_any_compute(run, tmp_path, monkeypatch):
  def must_not_load(*args, **kwargs):
    raise AssertionError('loaded a model before checking the input')

  monkeypatch.setattr(pipeline_lib.Pipeline, 'from_checkpoint', must_not_load)
  monkeypatch.setattr(diffusers_io, 'load_component', must_not_load)
  a_file = tmp_path / 'a_file'
  a_file.write_text('')
  folder, workdir = run['folder'], run['workdir']
  assert error_of(f'--src={workdir}', f'--out={a_file}') == (
      f'error: --out={a_file} exists; give a new path (nothing is overwritten)')
  assert error_of(f'--src={folder}', f'--out={a_file}/o').startswith(
      f'error: --out={a_file}/o is not writable')
  assert error_of(f'--src={tmp_path}', f'--out={tmp_path}/o') == (
      f'error: {tmp_path}: neither a diffusers folder (model_index.json) nor a workdir, stage '
      'directory, params/ or checkpoints/STEP directory of ours')
  assert error_of(f'--src={workdir}', '--stage=distill', f'--out={tmp_path}/o') == (
      f'error: {workdir}/distill: directory not found')
  assert error_of(f'--src={folder}', '--params=raw', f'--out={tmp_path}/o') == (
      f'error: {folder} is a diffusers folder: --stage and --params apply to our checkpoints only')
  assert not os.path.exists(tmp_path / 'o')


@pytest.mark.slow  # a subprocess
def test_the_module_runs_as_a_command(run):
  result = subprocess.run(
      [sys.executable, '-m', 'instaflow_jax.convert', f'--src={run["folder"]}',
       f'--out={run["folder"]}'], cwd=runs.REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert runs.last_line(result) == (f'error: --out={run["folder"]} exists; give a new path '
                                    '(nothing is overwritten)')
