"""Training on meshes of 8 simulated CPU devices, run by tests/test_parallel.py in its own
process (the device count is fixed when jax starts; pytest's process has one):

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python -m tests.sharded_training OUT.json TFDS_DIR WORKDIR

A tiny U-Net trains for a few steps on one device and on the meshes (8 data), (4 data x 2
fsdp), (2 data x 4 fsdp); the (2 x 4) run's checkpoint is restored on (8 data); the
quick config's stage rf runs on 4 of the devices (the reference of the two-process run);
bad meshes and batch sizes are tried. Writes what the test checks as JSON.
"""
import functools
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import shapes
from instaflow_jax import checkpoint
from instaflow_jax import parallel
from instaflow_jax import sampling
from instaflow_jax import stages
from instaflow_jax.models.unet import UNet2DConditionModel
from instaflow_jax.models.unet import UNetConfig
from instaflow_jax.training import flow_loss
from instaflow_jax.training import loop
from instaflow_jax.training import state as state_lib

STEPS = 3
BATCH = 16
MIN_SHARD_SIZE = 1024  # small enough that most of the tiny U-Net is sharded
MESHES = {'data8': (8, 1), 'data4_fsdp2': (4, 2), 'data2_fsdp4': (2, 4)}
# configs/shapes.py:quick as the two-process run and its one-process reference run it: a
# few steps, a few pairs, and a U-Net of one level with attention in the mid block only
# (compiling it takes a third of the time of the quick config's).
QUICK_OVERRIDES = {
    'rf.steps': STEPS, 'rf.log_every': 1,
    'model.unet.block_out_channels': (16,),
    'model.unet.down_block_types': ('DownBlock2D',),
    'model.unet.up_block_types': ('UpBlock2D',),
    'pairs.num_pairs': 16, 'pairs.shard_size': 4, 'pairs.batch_size': 4, 'pairs.num_steps': 2,
}


def quick_flags() -> list:
  """QUICK_OVERRIDES as command-line flags of instaflow_jax.main."""
  return [f'--config.{path}={value!r}' for path, value in QUICK_OVERRIDES.items()]


def quick_config(tfds_dir: str) -> ml_collections.ConfigDict:
  """QUICK_OVERRIDES applied to configs/shapes.py:quick, stage rf only."""
  config = shapes.get_config('quick')
  config.data.data_dir = tfds_dir
  config.stages = ('rf',)
  for path, value in QUICK_OVERRIDES.items():
    *parents, name = path.split('.')
    setattr(functools.reduce(getattr, parents, config), name, value)
  return config


def tiny_unet() -> UNet2DConditionModel:
  """One level, cross-attention in the mid block only: every kind of layer and a skip
  concatenation, with as few operations to trace and compile as possible."""
  return UNet2DConditionModel(UNetConfig(
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32,),
      down_block_types=('DownBlock2D',), up_block_types=('UpBlock2D',), layers_per_block=1,
      attention_head_dim=2, norm_num_groups=8, cross_attention_dim=16))


@functools.lru_cache(maxsize=1)
def initial_params():
  """(params, their logical axes), made once for every run. Seeded random values, drawn on
  the host: compiling the U-Net's init would cost more than all the steps."""
  unet = tiny_unet()
  abstract = nn.meta.unbox(jax.eval_shape(unet.init, jax.random.key(0),
                                          *unet.example_inputs())['params'])
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: (0.2 * rng.normal(size=a.shape)).astype(a.dtype), abstract)
  return params, parallel.logical_axes(unet)


def train_config(batch_size: int) -> ml_collections.ConfigDict:
  config = shapes.training_config(quick=True, steps=STEPS)
  config.update(dict(batch_size=batch_size, log_every=1, checkpoint_every=STEPS,
                     ema_decay=0.0))  # EMA = params: the final params are the updated ones
  config.optimizer.update(dict(warmup_steps=0, schedule='constant'))
  return config


def layout(data: int, fsdp: int, devices=None, tensor: int = 1) -> parallel.Layout:
  mesh_config = ml_collections.ConfigDict(dict(
      mesh=dict(data=data, fsdp=fsdp, tensor=tensor), axis_rules=parallel.AXIS_RULES,
      min_shard_size=MIN_SHARD_SIZE))
  return parallel.layout_from_config(mesh_config, devices)


def batches(start_step: int):
  """Latents and text embeddings as a stage with cached inputs gets them."""
  for step in range(start_step + 1, STEPS + 1):
    rng = np.random.default_rng(step)
    yield {'latents': rng.normal(size=(BATCH, 8, 8, 4)).astype(np.float32),
           'text_embeds': rng.normal(size=(BATCH, 4, 16)).astype(np.float32)}


def train_on(run_layout: parallel.Layout, stage_dir: str, batch_size: int = BATCH):
  """(metrics rows, final params) of the tiny U-Net trained on `run_layout`."""
  unet = tiny_unet()
  config = train_config(batch_size)
  init_params, axes = initial_params()
  with parallel.use(run_layout):
    params = loop.train(
        config, stage_dir, stage='tiny', init_params=init_params,
        frozen={'null_embeds': jnp.zeros((1, 4, 16))},
        loss_fn=flow_loss.flow_matching_loss(sampling.PipelineModules(unet, None, None),
                                              config),
        batches=batches, param_axes=axes)
  return [row for row in loop.read_metrics(stage_dir) if 'loss' in row], params


def relative(ours, reference) -> float:
  """||ours - reference|| / ||reference||."""
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


def differences(rows, params, reference_rows, reference_params) -> dict:
  """Relative differences from the one-device run: of the losses and gradient norms of
  every step, of all parameters together, and of the array that differs most."""
  metric = lambda rs, key: [r[key] for r in rs]
  flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
  per_array = {jax.tree_util.keystr(path): relative(x, y) for (path, x), y in zip(
      jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(reference_params))}
  worst = max(per_array, key=per_array.get)
  return {'steps': [r['step'] for r in rows],
          'loss_rel': relative(metric(rows, 'loss'), metric(reference_rows, 'loss')),
          'grad_norm_rel': relative(metric(rows, 'grad_norm'),
                                    metric(reference_rows, 'grad_norm')),
          'params_rel': relative(flat(params), flat(reference_params)),
          'worst_array': worst, 'worst_array_rel': per_array[worst]}


def placement(params) -> list:
  """Each array's shape, partition spec, the shape of one device's shard, and how many
  devices hold which slice."""
  return [{'path': jax.tree_util.keystr(path), 'shape': list(x.shape),
           'spec': str(x.sharding.spec), 'shard_shape': list(x.addressable_shards[0].data.shape),
           'distinct_shards': len({str(s.index) for s in x.addressable_shards})}
          for path, x in jax.tree_util.tree_leaves_with_path(params)]


def restore_on(run_layout: parallel.Layout, stage_dir: str):
  """The latest train state of `stage_dir`, restored onto `run_layout` as the loop does."""
  init_params, axes = initial_params()
  abstract = state_lib.abstract_state(init_params, loop.make_optimizer(
      train_config(BATCH).optimizer, STEPS))
  shardings = state_lib.state_shardings(abstract, run_layout.param_shardings(init_params, axes),
                                        run_layout.replicated)
  checkpointer = checkpoint.Checkpointer(os.path.join(stage_dir, 'checkpoints'), STEPS)
  state, _ = checkpointer.restore_latest(checkpoint.with_shardings(abstract, shardings))
  checkpointer.close()
  return state


def compare(workdir: str) -> dict:
  """One device vs each mesh; the (2 x 4) run's last checkpoint restored on (8 data)."""
  ref_rows, ref_params = train_on(layout(1, 1, jax.devices()[:1]), f'{workdir}/one_device')
  results, final_params = {'reference_losses': [row['loss'] for row in ref_rows]}, {}
  for name, (data, fsdp) in MESHES.items():
    rows, final_params[name] = train_on(layout(data, fsdp), f'{workdir}/{name}')
    results[name] = {**differences(rows, final_params[name], ref_rows, ref_params),
                     'params': placement(final_params[name])}
  state = restore_on(layout(8, 1), f'{workdir}/data2_fsdp4')
  results['data2_fsdp4_restored_on_data8'] = {
      'equal': all(np.array_equal(a, b) for a, b in zip(
          jax.tree.leaves(state.params), jax.tree.leaves(final_params['data2_fsdp4']))),
      'params': placement(state.params), 'opt_state': placement(state.opt_state)}
  return results


def error_of(fn) -> str:
  try:
    fn()
  except ValueError as e:
    return str(e)
  return ''


def bad_inputs(workdir: str) -> dict:
  return {
      'mesh_3': error_of(lambda: layout(3, 1)),
      'mesh_fsdp_3': error_of(lambda: layout(-1, 3)),
      'fsdp_and_tensor': error_of(lambda: layout(2, 2, tensor=2)),
      'batch_12_on_8': error_of(lambda: train_on(layout(8, 1), f'{workdir}/bad_batch',
                                                 batch_size=12)),
      'bad_batch_dir_created': os.path.exists(f'{workdir}/bad_batch'),
  }


def quick_rf_on_four_devices(tfds_dir: str, workdir: str) -> None:
  """Stage rf of the quick config as main runs it, in one process on 4 devices."""
  config = quick_config(tfds_dir)
  with parallel.use(parallel.layout_from_config(config, jax.devices()[:4])):
    stages.run_all(config, workdir)


def main(out_path: str, tfds_dir: str, workdir: str) -> None:
  if jax.device_count() != 8:
    sys.exit(f'run with XLA_FLAGS=--xla_force_host_platform_device_count=8, not '
             f'{jax.device_count()} devices')
  results = {'min_shard_size': MIN_SHARD_SIZE,
             **compare(workdir),
             'errors': bad_inputs(workdir)}
  quick_rf_on_four_devices(tfds_dir, f'{workdir}/quick_four_devices')
  with open(out_path, 'w') as f:
    json.dump(results, f, indent=1)


if __name__ == '__main__':
  main(*sys.argv[1:])
