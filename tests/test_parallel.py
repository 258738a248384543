"""Sharded and multi-process training: meshes of 8 simulated CPU devices against one device,
FSDP really partitioning the params, a checkpoint moving between meshes, two processes
(jax.distributed on 127.0.0.1) against one process with 4 devices, and bad layouts."""
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import serialization

from configs import shapes
from instaflow_jax import checkpoint
from instaflow_jax import parallel
from instaflow_jax import stages
from instaflow_jax import workdir as workdir_lib
from instaflow_jax.data import input as input_lib
from instaflow_jax.data import pairs as pairs_lib
from instaflow_jax.training import loop
from tests import runs
from tests import sharded_training

pytestmark = pytest.mark.slow  # trains on device meshes and in several processes

TOLERANCE = 1e-5


def two_process_command(workdir, tfds_dir):
  """The quick config (stages rf and pairs) in 2 processes of 2 CPU devices each."""
  main_args = runs.main_command(workdir, tfds_dir, *sharded_training.quick_flags(),
                                stages=('rf', 'pairs'))
  return [sys.executable, os.path.join('launch', 'local.py'), '--num_processes=2',
          '--devices_per_process=2', '--', *main_args[1:]]


def subprocess_env(*xla_flags):
  """The environment of the runs below: the tests' own (conftest.py), plus `xla_flags`."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env['XLA_FLAGS'] = ' '.join([env.get('XLA_FLAGS', ''), *xla_flags]).strip()
  return env


@pytest.fixture(scope='module')
def runs_dir(tfds_dir, tmp_path_factory):
  """The 8-device runs (tests/sharded_training.py) and the two-process run, side by side."""
  workdir = str(tmp_path_factory.mktemp('parallel'))
  # Prepared here once, so that the runs below only read the dataset.
  input_lib.open_source(input_lib.InputConfig(name=shapes.get_config('quick').data.name,
                                              data_dir=tfds_dir))
  two_processes = subprocess.Popen(
      two_process_command(os.path.join(workdir, 'two_processes'), tfds_dir), cwd=runs.REPO,
      env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  sharded = subprocess.run(
      [sys.executable, '-m', 'tests.sharded_training', os.path.join(workdir, 'sharded.json'),
       tfds_dir, os.path.join(workdir, 'sharded')], cwd=runs.REPO,
      env=subprocess_env('--xla_force_host_platform_device_count=8'), capture_output=True,
      text=True, timeout=900)
  output = two_processes.communicate(timeout=900)[0]
  assert sharded.returncode == 0, sharded.stderr[-3000:]
  assert two_processes.returncode == 0, output[-3000:]
  return workdir


@pytest.fixture(scope='module')
def sharded(runs_dir):
  with open(os.path.join(runs_dir, 'sharded.json')) as f:
    return json.load(f)


def test_sharded_steps_match_one_device(sharded):
  losses = sharded['reference_losses']
  assert len(losses) == 3 and len(set(losses)) == 3
  for mesh in ('data8', 'data4_fsdp2', 'data2_fsdp4'):
    result = sharded[mesh]
    print(f"{mesh}: loss {result['loss_rel']:.1e}, grad norm {result['grad_norm_rel']:.1e}, "
          f"params {result['params_rel']:.1e} (worst array {result['worst_array']}: "
          f"{result['worst_array_rel']:.1e}) relative to one device")
    assert result['steps'] == [1, 2, 3]
    assert result['loss_rel'] < TOLERANCE and result['grad_norm_rel'] < TOLERANCE
    assert result['params_rel'] < TOLERANCE and result['worst_array_rel'] < TOLERANCE


@pytest.mark.parametrize('mesh,fsdp', [('data4_fsdp2', 2), ('data2_fsdp4', 4)])
def test_fsdp_partitions_the_params(sharded, mesh, fsdp):
  params = sharded[mesh]['params']
  for p in params:
    size = np.prod(p['shape'])
    if size < sharded['min_shard_size']:
      assert p['shard_shape'] == p['shape'] and p['spec'] == 'P()', p
    else:  # conv_in / embed axis split over fsdp: each device holds 1/fsdp of the array
      assert np.prod(p['shard_shape']) * fsdp == size and 'fsdp' in p['spec'], p
      assert p['distinct_shards'] == fsdp, p
  sharded_count = sum(p['spec'] != 'P()' for p in params)
  assert sharded_count > len(params) // 3
  assert all(p['spec'] == 'P()' for p in sharded['data8']['params'])  # data parallel: replicated


def test_checkpoint_of_one_mesh_restores_on_another(sharded):
  result = sharded['data2_fsdp4_restored_on_data8']
  assert result['equal']  # the (2 x 4) run's final params, exactly
  for array in result['params'] + result['opt_state']:  # now whole on each of the 8 devices
    assert array['spec'] == 'P()' and array['shard_shape'] == array['shape'], array
  assert any(array['shape'] for array in result['opt_state'])


def test_bad_mesh_or_batch_size_fails_before_any_compile(sharded):
  errors = sharded['errors']
  assert errors['mesh_3'] == ('config.mesh (data=3, fsdp=1, tensor=1) does not divide the 8 '
                              'devices of this run (1 process(es) x 8); the sizes must '
                              'multiply to 8')
  assert 'config.mesh (data=-1, fsdp=3, tensor=1) does not divide the 8 devices' in (
      errors['mesh_fsdp_3'])
  assert errors['fsdp_and_tensor'].startswith(
      'config.mesh (data=2 x fsdp=2 x tensor=2) splits params over fsdp and tensor at once')
  assert errors['batch_12_on_8'] == (
      'tiny.batch_size=12 is not divisible by the 8 devices of the batch axes data+fsdp (mesh '
      'data=8 x fsdp=1 x tensor=1); use a multiple of 8')
  assert not errors['bad_batch_dir_created']


def test_bad_layout_in_a_config_is_a_user_error():
  config = shapes.get_config('quick')
  config.mesh.fsdp = 2  # this process has one device
  with pytest.raises(ValueError, match=r'config.mesh \(data=-1, fsdp=2, tensor=1\) does not '
                                       r'divide the 1 devices') as error:
    parallel.layout_from_config(config)
  assert isinstance(error.value, stages.USER_ERRORS)  # main: one line, exit status 1
  config = ml_collections.ConfigDict(dict(mesh=dict(data=-1), axis_rules=parallel.AXIS_RULES,
                                          min_shard_size=0))
  with pytest.raises(ValueError, match="config.axis_rules map 'batch' to mesh axis 'fsdp', "
                                       r'which config.mesh \(data\) does not have'):
    parallel.layout_from_config(config)


def test_bad_distributed_flags_are_a_user_error():
  with pytest.raises(ValueError, match='--num_processes, --process_id not given'):
    parallel.initialize_distributed(coordinator_address='127.0.0.1:1234')


def losses_of(stage_dir):
  return [row['loss'] for row in loop.read_metrics(stage_dir) if 'loss' in row]


def test_two_processes_match_one_process_with_four_devices(runs_dir):
  two = os.path.join(runs_dir, 'two_processes', 'rf')
  four = os.path.join(runs_dir, 'sharded', 'quick_four_devices', 'rf')
  print(f'losses: two processes {losses_of(two)}, one process {losses_of(four)}')
  assert len(losses_of(two)) == 3
  assert sharded_training.relative(losses_of(two), losses_of(four)) < TOLERANCE
  with open(os.path.join(two, 'metrics.jsonl')) as f:  # process 0 alone writes metrics
    steps = [row['step'] for row in map(json.loads, f) if 'loss' in row]
  assert steps == [1, 2, 3]
  assert os.listdir(os.path.join(two, 'samples')) == ['step_000003.png']
  assert workdir_lib.is_complete(two)


def restore_state(stage_dir):
  """The train state of the stage's last checkpoint, into this process's one device."""
  path = os.path.join(stage_dir, 'checkpoints', '3', 'state')
  metadata = ocp.StandardCheckpointer().metadata(path).item_metadata
  return checkpoint.load_params(
      path, jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), metadata))


def test_two_process_checkpoint_restores_in_one_process(runs_dir):
  ours = restore_state(os.path.join(runs_dir, 'two_processes', 'rf'))
  reference = restore_state(os.path.join(runs_dir, 'sharded', 'quick_four_devices', 'rf'))
  assert int(ours['step']) == 3 and jax.process_count() == 1
  flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree['params'])])
  assert sharded_training.relative(flat(ours), flat(reference)) < TOLERANCE


def test_two_processes_write_each_pair_once(runs_dir):
  pairs_dir = os.path.join(runs_dir, 'two_processes', 'pairs')
  data = pairs_lib.PairsInput(pairs_dir, global_batch_size=1)
  records = [data.source[i] for i in range(len(data))]
  indices = sorted(int(serialization.msgpack_restore(r)['index']) for r in records)
  assert indices == list(range(16))
  assert workdir_lib.is_complete(pairs_dir)
