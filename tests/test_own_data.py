"""The recipe on a user's own data: an image folder with .txt sidecars through the quick
chain (shortened), webdataset tar shards through a `python -m instaflow_jax.main` killed
and restarted that ends as the uninterrupted run on the folder, a prompts file; the encode
stage (on a metadata.jsonl folder) against the encoders in the step."""
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from configs import sd15_rf
from configs import shapes
from instaflow_jax import stages
from instaflow_jax import text_side
from instaflow_jax import workdir as workdir_lib
from instaflow_jax.data import input as input_lib
from instaflow_jax.data import shards
from instaflow_jax.training import loop
from tests import own_data
from tests import runs
from tests import tiny_models
from tests.test_main import assert_same_final_params

pytestmark = pytest.mark.slow  # the chain on each layout, python -m instaflow_jax.main

COUNT, HELD_OUT = 40, 8
CHAIN = ('rf', 'pairs', 'reflow', 'distill')  # eval's shapes evaluator needs scene labels
# The quick chain, shorter: every stage runs, checkpoints and samples.
SHORT = {'rf.steps': 6, 'rf.checkpoint_every': 3, 'rf.log_every': 3, 'rf.sample_every': 6,
         'pairs.num_pairs': 16, 'reflow.steps': 4, 'reflow.checkpoint_every': 4,
         'reflow.log_every': 2, 'reflow.sample_every': 4, 'distill.steps': 2,
         'distill.checkpoint_every': 2, 'distill.log_every': 2, 'distill.sample_every': 2}


def source_fields(source: str, path: str) -> dict:
  """A folder or webdataset as the data, its last HELD_OUT examples held out."""
  return {'data.source': source, 'data.path': path, 'data.train_split': f'train[:-{HELD_OUT}]',
          'data.eval_split': f'train[-{HELD_OUT}:]'}


def as_flags(fields: dict) -> list:
  return [f'--config.{field}={value}' for field, value in fields.items()]


def short_config(fields: dict):
  """configs/shapes.py:quick with the short chain and `fields` ('section.name': value)."""
  config = shapes.get_config('quick')
  config.stages = CHAIN
  for field, value in {**SHORT, **fields}.items():
    section, name = field.split('.')
    config[section][name] = value
  return config


@pytest.fixture(scope='module')
def layouts(tmp_path_factory):
  """Each layout on disk, the same images and captions in the same order: name -> the
  fields that select it."""
  root = tmp_path_factory.mktemp('own_data')
  return {
      'txt sidecars': source_fields(
          'folder', own_data.write_sidecar_folder(str(root / 'txt'), COUNT)),
      'webdataset': source_fields(
          'webdataset', own_data.write_webdataset(str(root / 'tars'), COUNT)),
  }


@pytest.fixture(scope='module')
def reference_chain(layouts, tmp_path_factory):
  """The workdir of one uninterrupted run of the short chain on the .txt sidecar folder."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  stages.run_all(short_config(layouts['txt sidecars']), workdir)
  return workdir


def losses(stage_dir):
  return [r['loss'] for r in loop.read_metrics(stage_dir) if 'loss' in r]


def assert_stages_complete(workdir: str, source: str, stage_names=CHAIN) -> None:
  for stage in stage_names:
    assert workdir_lib.is_complete(os.path.join(workdir, stage)), stage
  assert len(shards.read_records(os.path.join(workdir, 'pairs'), 'pairs')) == 16
  assert shards.read_meta(os.path.join(workdir, 'pairs'), 'pairs')['prompts'].startswith(
      f'{source} ')  # the captions of the layout's pairs.split
  for stage in [name for name in stage_names if name in ('rf', 'reflow', 'distill')]:
    assert losses(os.path.join(workdir, stage)) and np.all(np.isfinite(
        losses(os.path.join(workdir, stage)))), stage


def test_the_chain_runs_on_a_folder_with_txt_sidecars(reference_chain):
  assert_stages_complete(reference_chain, 'folder')


def test_a_killed_chain_resumes_exactly(reference_chain, layouts, tmp_path):
  """`python -m instaflow_jax.main` on webdataset shards, killed after its first checkpoint
  and restarted, runs rf and pairs to their end, its rf params bitwise those of the
  uninterrupted run on the same images and captions in the sidecar layout. (That each
  layout reads the same examples is tests/test_files.py's; reflow and distill read no
  data: the reference chain runs them.)"""
  workdir = str(tmp_path / 'killed')
  command = runs.main_command(workdir, workdir, *as_flags({**SHORT, **layouts['webdataset']}),
                              stages=('rf', 'pairs'))
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
  assert_stages_complete(workdir, 'webdataset', ('rf', 'pairs'))
  reference = os.path.join(reference_chain, 'rf')
  assert_same_final_params(reference, os.path.join(workdir, 'rf'))
  assert losses(os.path.join(workdir, 'rf')) == losses(reference)


def test_pairs_and_reflow_take_their_prompts_from_a_file(reference_chain, layouts, tmp_path):
  """The stages that need prompts alone, from a prompts file, the teacher an earlier rf."""
  workdir = str(tmp_path / 'w')
  for name in ('text', 'rf'):
    shutil.copytree(os.path.join(reference_chain, name), os.path.join(workdir, name))
  prompts = own_data.write_prompts(str(tmp_path / 'prompts.txt'), 12)
  config = short_config({**layouts['txt sidecars'], 'data.prompts_file': prompts,
                         'data.eval_prompts_file': prompts})
  config.stages = ('rf', 'pairs', 'reflow')
  stages.run_all(config, workdir)
  pairs_dir = os.path.join(workdir, 'pairs')
  assert shards.read_meta(pairs_dir, 'pairs')['prompts'] == f'file:{prompts}'
  records = shards.read_records(pairs_dir, 'pairs')
  tokenizer = text_side.load_text_side(workdir, config.model).tokenizer
  assert [tokenizer.decode(r['input_ids']) for r in records[:12]] == (
      input_lib.read_prompts(prompts))
  assert workdir_lib.is_complete(os.path.join(workdir, 'reflow'))


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
  # A run killed while writing the second shard resumes it: the same records.
  encode_dir = str(tmp_path / 'encoded' / 'encode')
  os.remove(os.path.join(encode_dir, workdir_lib.DONE_FILE))
  os.rename(shards.shard_path(encode_dir, 'encode', 1, 2),
            shards.shard_path(encode_dir, 'encode', 1, 2) + '.tmp')
  stages.run_all(config('encode'), str(tmp_path / 'encoded'))
  resumed = shards.read_records(encode_dir, 'encode')
  for want, got in zip(records, resumed, strict=True):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
