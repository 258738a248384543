"""The recipe on a user's own data, typed as a user types it: an image folder
(metadata.jsonl, .txt sidecars), webdataset tar shards and a prompts file, each through
the quick chain; a killed run resumed exactly; the encode stage against the encoders in
the step."""
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from configs import sd15_rf
from instaflow_jax import stages
from instaflow_jax import workdir as workdir_lib
from instaflow_jax.data import shards
from instaflow_jax.training import loop
from tests import own_data
from tests import runs
from tests import tiny_models
from tests.test_main import final_params
from tests.test_main import flat

pytestmark = pytest.mark.slow  # python -m instaflow_jax.main in subprocesses, several stages

COUNT, HELD_OUT = 40, 8
CHAIN = ('rf', 'pairs', 'reflow', 'distill')  # eval's shapes evaluator needs scene labels
# The quick chain, shorter: every stage runs, checkpoints and samples.
SHORT = ['--config.rf.steps=6', '--config.rf.checkpoint_every=3', '--config.rf.log_every=3',
         '--config.rf.sample_every=6', '--config.pairs.num_pairs=16',
         '--config.reflow.steps=4', '--config.reflow.checkpoint_every=4',
         '--config.reflow.log_every=2', '--config.reflow.sample_every=4',
         '--config.distill.steps=2', '--config.distill.checkpoint_every=2',
         '--config.distill.log_every=2', '--config.distill.sample_every=2']


def source_flags(source: str, path: str) -> list:
  """A folder or webdataset as the data, its last HELD_OUT examples held out."""
  return [f'--config.data.source={source}', f'--config.data.path={path}',
          f'--config.data.train_split=train[:-{HELD_OUT}]',
          f'--config.data.eval_split=train[-{HELD_OUT}:]']


@pytest.fixture(scope='module')
def layouts(tmp_path_factory):
  """Each layout on disk: name -> the flags that select it."""
  root = tmp_path_factory.mktemp('own_data')
  return {
      'metadata.jsonl': source_flags(
          'folder', own_data.write_metadata_folder(str(root / 'jsonl'), COUNT)),
      'txt sidecars': source_flags(
          'folder', own_data.write_sidecar_folder(str(root / 'txt'), COUNT)),
      'webdataset': source_flags(
          'webdataset', own_data.write_webdataset(str(root / 'tars'), COUNT)),
  }


@pytest.fixture(scope='module')
def chains(layouts, tmp_path_factory):
  """name -> the workdir of one uninterrupted run of the short chain on that layout."""
  done = {}

  def run(name):
    if name not in done:
      workdir = str(tmp_path_factory.mktemp('chain'))
      result = runs.run_main(workdir, workdir, *layouts[name], *SHORT, stages=CHAIN)
      assert result.returncode == 0, result.stderr[-3000:]
      done[name] = workdir
    return done[name]
  return run


def losses(stage_dir):
  return [r['loss'] for r in loop.read_metrics(stage_dir) if 'loss' in r]


@pytest.mark.parametrize('name', ['metadata.jsonl', 'txt sidecars', 'webdataset'])
def test_the_chain_runs_on_each_layout(chains, name):
  workdir = chains(name)
  for stage in CHAIN:
    assert workdir_lib.is_complete(os.path.join(workdir, stage)), stage
  assert len(shards.read_records(os.path.join(workdir, 'pairs'), 'pairs')) == 16
  source = name.split(' ')[0] if name == 'webdataset' else 'folder'
  assert shards.read_meta(os.path.join(workdir, 'pairs'), 'pairs')['prompts'].startswith(
      f'{source} ')  # the captions of the layout's pairs.split
  for stage in ('rf', 'reflow', 'distill'):
    assert losses(os.path.join(workdir, stage)) and np.all(np.isfinite(
        losses(os.path.join(workdir, stage)))), stage


def test_the_chain_takes_its_prompts_from_a_file(chains, tmp_path):
  """pairs, reflow and distill from a prompts file alone, the teacher an earlier rf."""
  workdir = str(tmp_path / 'w')
  for name in ('text', 'rf'):
    shutil.copytree(os.path.join(chains('metadata.jsonl'), name), os.path.join(workdir, name))
  prompts = own_data.write_prompts(str(tmp_path / 'prompts.txt'), 12)
  flags = source_flags('folder', '/nowhere')[2:] + [f'--config.data.prompts_file={prompts}',
                                                    f'--config.data.eval_prompts_file={prompts}']
  result = runs.run_main(workdir, workdir, *flags, *SHORT, stages=CHAIN)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'stage rf: already complete' in result.stderr
  pairs_dir = os.path.join(workdir, 'pairs')
  assert shards.read_meta(pairs_dir, 'pairs')['prompts'] == f'file:{prompts}'
  for stage in CHAIN:
    assert workdir_lib.is_complete(os.path.join(workdir, stage)), stage


@pytest.mark.parametrize('name', ['metadata.jsonl', 'webdataset'])
def test_a_killed_run_resumes_exactly(chains, layouts, tmp_path, name):
  reference = os.path.join(chains(name), 'rf')
  workdir = str(tmp_path / 'killed')
  command = runs.main_command(workdir, workdir, *layouts[name], *SHORT)
  process = subprocess.Popen(command, cwd=runs.REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  first_checkpoint = os.path.join(workdir, 'rf', 'checkpoints', '3', 'commit_success.txt')
  deadline = time.time() + 600
  while not os.path.exists(first_checkpoint) and process.poll() is None:
    assert time.time() < deadline
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not workdir_lib.is_complete(os.path.join(workdir, 'rf')), 'the run ended before the kill'

  result = subprocess.run(command, cwd=runs.REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'rf: resumed from step 3' in result.stderr
  reference_paths, expected = flat(final_params(reference))
  resumed_paths, resumed = flat(final_params(os.path.join(workdir, 'rf')))
  assert resumed_paths == reference_paths
  for path, want, got in zip(reference_paths, expected, resumed):
    np.testing.assert_array_equal(got, want, err_msg=path)


def test_encode_then_rf_trains_as_rf_with_the_encoders_in_the_step(tmp_path):
  """A tiny random SD-like folder (VAE, CLIP text encoder) on an image folder: the same
  losses, step by step, from the stored latent distributions and text states."""
  folder = str(tmp_path / 'tiny_sd')
  tiny_models.write_tiny_pipeline(folder)
  images = own_data.write_metadata_folder(str(tmp_path / 'images'), 12)

  def config(*stage_names, **rf):
    c = sd15_rf.get_config(folder)
    c.stages = stage_names
    c.model.update(dict(compute_dtype='float32', remat_policy='none'))
    c.data.update(dict(source='folder', path=images, train_split='train',
                       eval_split='train[-2:]', image_size=16))
    c.encode.update(dict(batch_size=4, shard_size=8, dtype='float32'))
    c.rf.update(dict(steps=6, batch_size=4, log_every=1, checkpoint_every=6, sample_every=6,
                     num_samples=2, sample_steps=1, **rf))
    return c

  stages.run_all(config('rf'), str(tmp_path / 'in_step'))
  stages.run_all(config('encode', 'rf', encoded='encode'), str(tmp_path / 'encoded'))
  records = shards.read_records(str(tmp_path / 'encoded' / 'encode'), 'encode')
  assert [int(r['index']) for r in records] == list(range(12))
  assert records[0]['latent_mean'].shape == records[0]['latent_std'].shape == (8, 8, 4)
  assert records[0]['text_embeds'].shape == (tiny_models.TOKENIZER_MAX_LENGTH, 32)
  assert np.all(records[0]['latent_std'] > 0)
  in_step = losses(str(tmp_path / 'in_step' / 'rf'))
  encoded = losses(str(tmp_path / 'encoded' / 'rf'))
  assert len(in_step) == 6
  np.testing.assert_allclose(encoded, in_step, rtol=1e-4)
