r"""Memory per device of the SD 1.5 U-Net's train step (860M parameters), data parallel vs
FSDP on 8 devices, from the compiled step's memory analysis. Nothing is materialised: the
step is compiled ahead of time for abstract inputs on 8 simulated CPU devices.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
      .venv/bin/python -m benchmarks.sharding_memory --out=sharding_memory.json

The step is configs/sd15_rf.py's (AdamW, EMA, bf16 compute with float32 params, remat,
global batch rf.batch_size) on cached inputs (64x64x4 latents, 77x768 text embeddings), so
the frozen VAE and text encoder are not part of it. XLA's CPU compiler plans temporary
buffers differently from the TPU and GPU compilers: the state sizes carry over exactly, the
temporaries only roughly.
"""
import argparse
import json
import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from configs import sd15_rf
from instaflow_jax import checkpoint
from instaflow_jax import parallel
from instaflow_jax import sampling
from instaflow_jax.models.unet import UNet2DConditionModel
from instaflow_jax.models.unet import UNetConfig
from instaflow_jax.training import flow_loss
from instaflow_jax.training import state as state_lib
from instaflow_jax.training import step as step_lib

# SD 1.5's unet/config.json differs from diffusers' defaults only here.
SD15_UNET = UNetConfig(sample_size=64, cross_attention_dim=768)
MESHES = {'data parallel (data=8)': dict(data=8, fsdp=1, tensor=1),
          'FSDP (fsdp=8)': dict(data=1, fsdp=8, tensor=1),
          'FSDP + data (data=2, fsdp=4)': dict(data=2, fsdp=4, tensor=1)}
GIB = 2 ** 30


def abstract_inputs(config, batch_size: int):
  """Shapes of the U-Net's params (unboxed), the frozen inputs and a cached-input batch."""
  unet = UNet2DConditionModel(SD15_UNET, dtype=jnp.dtype(config.model.compute_dtype),
                              remat_policy=config.model.remat_policy)
  params = nn.meta.unbox(jax.eval_shape(unet.init, jax.random.key(0),
                                        *unet.example_inputs())['params'])
  frozen = {'null_embeds': jax.ShapeDtypeStruct((1, 77, 768), jnp.float32)}
  batch = {'latents': jax.ShapeDtypeStruct((batch_size, 64, 64, 4), jnp.float32),
           'text_embeds': jax.ShapeDtypeStruct((batch_size, 77, 768), jnp.float32)}
  return unet, params, frozen, batch


def placed(tree, sharding):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def shard_bytes(abstract_state, shardings) -> int:
  """Bytes of the train state that one device holds."""
  return sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize for a, s in zip(
      jax.tree.leaves(abstract_state), jax.tree.leaves(shardings)))


def analyse(config, mesh: dict, batch_size: int) -> dict:
  """The compiled step's memory analysis (bytes per device) on `mesh`."""
  train = config.rf
  layout = parallel.layout_from_config(ml_collections.ConfigDict(dict(
      mesh=mesh, axis_rules=parallel.AXIS_RULES, min_shard_size=config.min_shard_size)))
  layout.check_batch_size(batch_size, 'batch_size', train.grad_accum_steps)
  unet, params, frozen, batch = abstract_inputs(config, batch_size)
  tx = state_lib.make_optimizer(train.optimizer, train.steps)
  abstract = state_lib.abstract_state(params, tx)
  shardings = state_lib.state_shardings(
      abstract, layout.param_shardings(params, parallel.logical_axes(unet)), layout.replicated)
  step = step_lib.make_train_step(
      flow_loss.flow_matching_loss(sampling.PipelineModules(unet, None, None), train),
      train.ema_decay, train.grad_accum_steps, layout, shardings)
  start = time.time()
  compiled = step.lower(checkpoint.with_shardings(abstract, shardings),
                        placed(frozen, layout.replicated), placed(batch, layout.batch_sharding),
                        placed(jax.eval_shape(lambda: jax.random.key(0)),
                               layout.replicated)).compile()
  memory = compiled.memory_analysis()
  return {
      'params': sum(math.prod(a.shape) for a in jax.tree.leaves(params)),
      'state_per_device': shard_bytes(abstract, shardings),
      'arguments': memory.argument_size_in_bytes, 'outputs': memory.output_size_in_bytes,
      'aliased': memory.alias_size_in_bytes, 'temporaries': memory.temp_size_in_bytes,
      'peak_estimate': (memory.argument_size_in_bytes + memory.output_size_in_bytes
                        - memory.alias_size_in_bytes + memory.temp_size_in_bytes),
      'compile_seconds': round(time.time() - start, 1)}


def table(results: dict, batch_size: int) -> str:
  lines = [f'| layout (8 devices, global batch {batch_size}) | train state | arguments | '
           'temporaries | peak estimate |', '|---|---|---|---|---|']
  for name, r in results.items():
    lines.append(f"| {name} | {r['state_per_device'] / GIB:.2f} GiB | "
                 f"{r['arguments'] / GIB:.2f} GiB | {r['temporaries'] / GIB:.2f} GiB | "
                 f"{r['peak_estimate'] / GIB:.2f} GiB |")
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch_size', type=int, default=None,
                      help='global batch (default: configs/sd15_rf.py rf.batch_size)')
  parser.add_argument('--out', default=None, help='write the numbers here as JSON')
  args = parser.parse_args()
  if jax.device_count() != 8:
    raise SystemExit('run with XLA_FLAGS=--xla_force_host_platform_device_count=8')
  config = sd15_rf.get_config()
  batch_size = args.batch_size or config.rf.batch_size
  results = {}
  for name, mesh in MESHES.items():
    results[name] = analyse(config, mesh, batch_size)
    print(name, json.dumps(results[name]), flush=True)
  print(table(results, batch_size))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump({'batch_size': batch_size, 'results': results}, f, indent=2)


if __name__ == '__main__':
  main()
