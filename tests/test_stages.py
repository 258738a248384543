"""The InstaFlow stages on configs/shapes.py:quick: pairs, reflow and distill."""
import os
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from instaflow_jax import checkpoint
from instaflow_jax import pipeline as pipeline_lib
from instaflow_jax import stages
from instaflow_jax import text_side
from instaflow_jax import workdir as workdir_lib
from instaflow_jax.data import shards
from instaflow_jax.models.stacked_unet import init_from_unet
from instaflow_jax.stages import common
from instaflow_jax.training import loop
from tests import runs
from tests.test_main import quick_config

pytestmark = pytest.mark.slow  # runs the quick chain and python -m instaflow_jax.main


def read_pairs(pairs_dir):
  return shards.read_records(pairs_dir, 'pairs')


def test_chain_completes_every_stage(quick_chain):
  for stage in runs.CHAIN:
    assert workdir_lib.is_complete(os.path.join(quick_chain, stage)), stage
  records = read_pairs(os.path.join(quick_chain, 'pairs'))
  assert [int(r['index']) for r in records] == list(range(64))
  assert records[0]['x0'].shape == records[0]['x1'].shape == (16, 16, 3)
  assert not np.allclose(records[0]['x0'], records[0]['x1'])
  for stage in ('reflow', 'distill'):
    losses = [r['loss'] for r in loop.read_metrics(os.path.join(quick_chain, stage)) if 'loss' in r]
    assert losses and all(np.isfinite(losses)), stage
    assert os.listdir(os.path.join(quick_chain, stage, 'samples'))


def _shards(workdir):
  pairs_dir = os.path.join(workdir, 'pairs')
  if not os.path.isdir(pairs_dir):
    return []
  return [f for f in os.listdir(pairs_dir) if f.endswith('.array_record')]


def test_pairs_resume_after_sigkill_is_complete_and_identical(quick_chain, tfds_dir, tmp_path):
  workdir = str(tmp_path / 'killed')
  for name in ('text', 'rf'):  # the run's text side: the text encoder its stage rf trained
    shutil.copytree(os.path.join(quick_chain, name), os.path.join(workdir, name))
  process = subprocess.Popen(runs.main_command(workdir, tfds_dir, stages=('pairs',)),
                             cwd=runs.REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  while len(_shards(workdir)) < 2 and process.poll() is None:
    assert time.time() < deadline
    time.sleep(0.01)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert 2 <= len(_shards(workdir)) < 8, 'the kill did not land in the middle of the stage'

  result = runs.run_main(workdir, tfds_dir, stages=('pairs',))
  assert result.returncode == 0, result.stderr[-3000:]
  assert not [f for f in os.listdir(os.path.join(workdir, 'pairs')) if f.endswith('.tmp')]
  expected = read_pairs(os.path.join(quick_chain, 'pairs'))
  got = read_pairs(os.path.join(workdir, 'pairs'))
  assert [int(r['index']) for r in got] == list(range(64))
  for want, have in zip(expected, got):
    for key in ('x0', 'x1', 'input_ids'):
      np.testing.assert_array_equal(have[key], want[key])


def test_pairs_from_another_teacher_shape_are_refused(quick_chain, tfds_dir, tmp_path):
  for name in ('text', 'pairs'):
    shutil.copytree(os.path.join(quick_chain, name), str(tmp_path / name))
  config = quick_config(tfds_dir, 'reflow')
  config.model.unet.sample_size = config.data.image_size = 8
  config.reflow.init = ''
  with pytest.raises(ValueError, match=r'have latents of shape \(16, 16, 3\) but the model takes '
                                       r'\(8, 8, 3\): they come from a different teacher'):
    stages.run_all(config, str(tmp_path))


def test_distill_without_its_teacher_fails_before_compute(tfds_dir, tmp_path):
  config = quick_config(tfds_dir, 'distill')
  # The run's text side comes first (reading the dataset, preparing it if need be), untimed.
  text_side.store_text_side(config, str(tmp_path))
  started = time.time()
  with pytest.raises(FileNotFoundError,
                     match=f"distill.teacher: checkpoint {tmp_path}/reflow/params not found; "
                           "run stage 'reflow' first"):
    stages.run_all(config, str(tmp_path))
  assert time.time() - started < 5


def test_lpips_without_trunk_weights_fails_before_compute(quick_chain, tfds_dir, tmp_path):
  for name in ('text', 'reflow'):
    shutil.copytree(os.path.join(quick_chain, name), str(tmp_path / name))
  config = quick_config(tfds_dir, 'distill')
  config.distill.loss = 'lpips'
  started = time.time()
  with pytest.raises(Exception, match='LPIPS needs pretrained vgg trunk weights: pass trunk_path='):
    stages.run_all(config, str(tmp_path))
  assert time.time() - started < 5


def tiny_sd_rf_config(folder: str, tfds_dir: str):
  """configs/sd15_rf.py on a tiny random SD-like folder written to `folder`, 4 steps on
  16-pixel shapes."""
  from configs import sd15_rf
  from tests import tiny_models
  tiny_models.write_tiny_pipeline(folder)
  config = sd15_rf.get_config(folder)
  config.data.update(dict(name='captioned_shapes/size16', data_dir=tfds_dir,
                          train_split='train[:64]', eval_split='validation',
                          caption_key='caption', image_size=16))
  config.rf.update(dict(steps=4, batch_size=4, log_every=2, checkpoint_every=2, sample_every=4,
                        num_samples=2, sample_steps=2))
  return config


def test_rf_fine_tunes_a_diffusers_pipeline_in_latent_space(tfds_dir, tmp_path):
  """configs/sd15_rf.py on a tiny random SD-like folder: VAE latents, CLIP tokenizer, bf16
  compute with float32 master weights, rematerialised U-Net blocks, guided sample grids."""
  config = tiny_sd_rf_config(str(tmp_path / 'tiny_sd'), tfds_dir)
  config.rf.sample_guidance = 1.5
  stages.run_all(config, str(tmp_path / 'work'))
  stage_dir = str(tmp_path / 'work' / 'rf')
  assert workdir_lib.is_complete(stage_dir)
  losses = [r['loss'] for r in loop.read_metrics(stage_dir) if 'loss' in r]
  assert len(losses) == 2 and all(np.isfinite(losses))
  assert os.listdir(os.path.join(stage_dir, 'samples')) == ['step_000004.png']


def test_stacked_student_starts_from_the_2rf_and_is_distilled_by_it(quick_chain, tfds_dir,
                                                                    tmp_path):
  """InstaFlow-1.7B's wiring: a stacked student, both halves copied from the single-U-Net
  2-RF, which stays the teacher."""
  workdir = str(tmp_path / 'stacked')
  for name in ('text', 'rf', 'reflow'):
    shutil.copytree(os.path.join(quick_chain, name), os.path.join(workdir, name))
  stacked = ('--config.model.unet_kind=stacked', '--config.model.stacked.keep_mid=False')
  result = runs.run_main(workdir, tfds_dir, *stacked, '--config.distill.steps=2',
                         stages=('distill',))
  assert result.returncode == 0, result.stderr[-3000:]
  student = pipeline_lib.Pipeline.from_checkpoint(
      workdir_lib.find_trained_params(workdir, stage='distill'))
  assert set(student.unet_params) == {'unet_1', 'unet_2'}
  assert 'mid_block' not in student.unet_params['unet_1']
  # The start: both halves copied from the 2-RF's params.
  reflow_params = os.path.join(workdir, 'reflow', workdir_lib.FINAL_PARAMS)
  start = common.load_unet_params(student.unet, reflow_params, 'init')
  single = common.load_unet_params(student.unet.base_unet(), reflow_params, 'init')
  expected = init_from_unet(single, student.unet.config)
  assert jax.tree.all(jax.tree.map(np.array_equal, start, expected))
  assert checkpoint.top_level_names(reflow_params) >= {'conv_in', 'mid_block'}


def test_a_second_phase_at_a_larger_batch_is_a_stage_of_its_own(quick_chain, tfds_dir, tmp_path):
  """The 2-RF's two phases in one config: stage 'reflow_large', of kind 'reflow', starts from
  the first phase's params and trains at twice its batch; the first phase is not rerun."""
  workdir = str(tmp_path / 'w')
  for name in ('text', 'pairs', 'reflow'):
    shutil.copytree(os.path.join(quick_chain, name), os.path.join(workdir, name))
  config = quick_config(tfds_dir, 'pairs', 'reflow', 'reflow_large')
  with config.unlocked():
    config.reflow_large = config.reflow.copy_and_resolve_references()
  config.reflow_large.update(dict(kind='reflow', init='reflow', steps=4, log_every=2,
                                  checkpoint_every=4, sample_every=4,
                                  batch_size=2 * config.reflow.batch_size))
  stages.run_all(config, workdir)
  stage_dir = os.path.join(workdir, 'reflow_large')
  assert workdir_lib.is_complete(stage_dir)
  assert workdir_lib.read_stage_config(os.path.join(workdir, 'reflow'))['reflow']['steps'] == (
      config.reflow.steps)  # the first phase's own config.json, untouched
  assert workdir_lib.read_stage_config(stage_dir)['reflow_large']['batch_size'] == (
      2 * config.reflow.batch_size)
  losses = [r['loss'] for r in loop.read_metrics(stage_dir) if 'loss' in r]
  assert len(losses) == 2 and all(np.isfinite(losses))
  trained = workdir_lib.find_trained_params(workdir, stage='reflow_large')
  assert trained.params_path == os.path.join(stage_dir, workdir_lib.FINAL_PARAMS)
