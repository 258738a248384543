"""`python -m instaflow_jax.main` on configs/shapes.py:quick, as a user runs it."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import shapes
from instaflow_jax import checkpoint
from instaflow_jax import huge_pages
from instaflow_jax import workdir as workdir_lib
from instaflow_jax.training import loop
from tests import runs

pytestmark = pytest.mark.slow  # runs the quick chain and python -m instaflow_jax.main


def final_params(stage_dir):
  import jax
  import orbax.checkpoint as ocp
  path = os.path.join(stage_dir, workdir_lib.FINAL_PARAMS)
  metadata = ocp.StandardCheckpointer().metadata(path).item_metadata
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), metadata)
  return checkpoint.load_params(path, abstract)


def flat(tree):
  import jax
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return [jax.tree_util.keystr(p) for p, _ in leaves], [np.asarray(x) for _, x in leaves]


def assert_same_final_params(reference_dir, stage_dir):
  """The final params of two runs of a stage are bitwise equal."""
  reference_paths, reference = flat(final_params(reference_dir))
  paths, params = flat(final_params(stage_dir))
  assert paths == reference_paths
  for path, want, got in zip(reference_paths, reference, params):
    np.testing.assert_array_equal(got, want, err_msg=path)


def quick_config(tfds_dir, *stage_names):
  config = shapes.get_config('quick')
  config.data.data_dir = tfds_dir
  config.stages = stage_names
  return config


def test_quick_run_writes_checkpoints_metrics_and_sample_grids(quick_chain):
  stage_dir = os.path.join(quick_chain, 'rf')
  assert workdir_lib.is_complete(stage_dir)
  assert os.path.isfile(os.path.join(stage_dir, 'config.json'))
  assert sorted(os.listdir(os.path.join(stage_dir, 'checkpoints'))) == ['20', '30']
  losses = [row['loss'] for row in loop.read_metrics(stage_dir) if 'loss' in row]
  assert len(losses) == 6 and all(np.isfinite(losses)) and losses[-1] < losses[0]
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(stage_dir))
  assert sorted(os.listdir(os.path.join(stage_dir, 'samples'))) == ['step_000015.png',
                                                                    'step_000030.png']
  assert final_params(stage_dir)


def test_a_complete_stage_is_skipped_with_a_warning_for_what_changed(quick_chain, tfds_dir):
  result = runs.run_main(quick_chain, tfds_dir, '--config.pairs.num_pairs=128',
                         stages=('rf', 'pairs'))
  assert result.returncode == 0
  assert 'stage rf: already complete' in result.stderr
  assert (f'stage pairs is complete: pairs.num_pairs is 64 there, 128 in this config, which '
          f'does not apply to it; remove {quick_chain}/pairs to redo the stage with it'
          ) in result.stderr
  assert result.stderr.count(' is complete: ') == 1  # only the field that changed


def test_resume_after_sigkill_is_exact(quick_chain, tfds_dir, tmp_path):
  reference_dir = os.path.join(quick_chain, 'rf')
  workdir = str(tmp_path / 'killed')
  process = subprocess.Popen(runs.main_command(workdir, tfds_dir), cwd=runs.REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  first_checkpoint = os.path.join(workdir, 'rf', 'checkpoints', '10', 'commit_success.txt')
  deadline = time.time() + 600
  while not os.path.exists(first_checkpoint) and process.poll() is None:
    assert time.time() < deadline
    time.sleep(0.05)
  # The command restarted itself by exec with the huge-page tunable: the pid it was started
  # with is the training process, which the kill below ends.
  with open(f'/proc/{process.pid}/environ', 'rb') as f:
    tunable_set = b'glibc.malloc.hugetlb=1' in f.read()
  assert tunable_set == huge_pages._huge_pages_only_when_advised()
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not workdir_lib.is_complete(os.path.join(workdir, 'rf')), 'the run ended before the kill'

  result = runs.run_main(workdir, tfds_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'rf: resumed from step' in result.stderr
  assert_same_final_params(reference_dir, os.path.join(workdir, 'rf'))
  reference_losses = {r['step']: r['loss'] for r in loop.read_metrics(reference_dir) if 'loss' in r}
  resumed_losses = {r['step']: r['loss'] for r in loop.read_metrics(os.path.join(workdir, 'rf'))
                    if 'loss' in r}
  assert resumed_losses == reference_losses




def test_the_clip_score_loads_after_tensorflow_in_the_training_process():
  """Stage eval with eval.clip_path imports transformers' PyTorch CLIP after tfds and clu
  have loaded TensorFlow; torch's triton would crash the process there."""
  script = ('from instaflow_jax import main; main.configure_process(); '
            'import tensorflow_datasets, clu.metric_writers; '
            'from transformers import CLIPModel, CLIPProcessor; print("loaded")')
  result = subprocess.run([sys.executable, '-c', script], cwd=runs.REPO, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0 and result.stdout.split()[-1] == 'loaded', result.stderr[-2000:]
