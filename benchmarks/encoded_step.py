r"""The rf stage's training step with the frozen encoders in it, against the same step on
the encode stage's stored latent distributions and text states (data/encoded.py).

Both steps are the trainer's (training/step.py over training/flow_loss.py's loss, with
configs/sd15_rf.py's `rf` section: AdamW, EMA, caption dropout 0.1, uniform time), for
bench.py's model presets (benchmarks/bench_configs.py, random weights): with the encoders,
a batch is uint8 images and token ids, and the step runs the VAE encoder and the text
encoder before the U-Net; from encoded data, a batch is the latents' mean and std and the
text states, and the step only samples the latents. Milliseconds per step (median of
--steps after the compile) and images/s, each variant in turn --rounds times.

--flops runs nothing: it counts each step's FLOPs (XLA's cost analysis of the lowered
step, from shapes alone, so the sd15 preset's too), without remat.

  JAX_PLATFORMS=cpu PYTHONPATH=. .venv/bin/python benchmarks/encoded_step.py --config small
  JAX_PLATFORMS=cpu PYTHONPATH=. .venv/bin/python benchmarks/encoded_step.py --config sd15 --flops
"""
import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import bench_configs
import bench_ours
from configs import sd15_rf
from instaflow_jax import sampling
from instaflow_jax.models import abstract
from instaflow_jax.training import flow_loss
from instaflow_jax.training import state as state_lib
from instaflow_jax.training import step as step_lib


def random_params(module, seed: int):
  """N(0, 0.02^2) params from numpy (compiling the init's random draws takes long)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: np.asarray(0.02 * rng.standard_normal(a.shape), a.dtype),
                      abstract.abstract_params(module))


def batches(cfg, batch: int, modules, frozen) -> dict:
  """variant -> the batch of each: images and token ids, or their encodings."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (batch, cfg.image_size, cfg.image_size, 3), np.uint8)
  ids = bench_configs.token_ids(cfg, batch)
  encode = jax.jit(lambda p, x, t: (*sampling.encode_posterior(
      modules, p, x.astype(jnp.float32) / 127.5 - 1.0), sampling.encode_text(modules, p, t)))
  mean, std, text = encode(frozen, images, ids)
  return {'encoders in the step': {'image': images, 'input_ids': ids},
          'encoded data': {'latent_mean': mean, 'latent_std': std, 'text_embeds': text}}


def abstract_batches(cfg, batch: int, latent_channels: int) -> dict:
  """variant -> ShapeDtypeStructs of its batch (as batches() makes them)."""
  size, tokens = cfg.latent_size, cfg.text['max_position_embeddings']
  latent = jax.ShapeDtypeStruct((batch, size, size, latent_channels), jnp.float32)
  return {'encoders in the step': {
              'image': jax.ShapeDtypeStruct((batch, cfg.image_size, cfg.image_size, 3), jnp.uint8),
              'input_ids': jax.ShapeDtypeStruct((batch, tokens), jnp.int32)},
          'encoded data': {
              'latent_mean': latent, 'latent_std': latent,
              'text_embeds': jax.ShapeDtypeStruct((batch,) + cfg.text_shape, jnp.float32)}}


def flops(step, built, cfg, batch: int, tx) -> dict:
  """variant -> GFLOPs of one step, counted on the lowered program."""
  frozen = {'vae': abstract.abstract_params(built['vae']),
            'text': abstract.abstract_params(built['text_encoder']),
            'null_embeds': jax.ShapeDtypeStruct((1,) + cfg.text_shape, jnp.float32)}
  state = state_lib.abstract_state(abstract.abstract_params(built['unet']), tx)
  rng = jax.random.key(0)
  variants = abstract_batches(cfg, batch, cfg.vae['latent_channels'])
  return {name: step.lower(state, frozen, shapes, rng).cost_analysis()['flops'] / 1e9
          for name, shapes in variants.items()}


def measure(step, state, frozen, batch, steps: int):
  """(ms per step: the median of `steps` after the first, which compiles; the state)."""
  rng = jax.random.key(0)
  state, metrics = step(state, frozen, batch, rng)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = step(state, frozen, batch, rng)
    jax.block_until_ready(metrics)
    times.append(1e3 * (time.perf_counter() - start))
  return statistics.median(times), state


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='small', choices=sorted(bench_configs.CONFIGS))
  parser.add_argument('--batch_size', type=int, default=None, help="default: the config's")
  parser.add_argument('--steps', type=int, default=5, help='timed steps per round')
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--flops', action='store_true', help='count FLOPs, run nothing')
  parser.add_argument('--out', default=None, help='write the numbers here as JSON')
  args = parser.parse_args()
  cfg = bench_configs.CONFIGS[args.config]
  batch = args.batch_size or cfg.train_batch
  built = bench_ours._modules(cfg, jnp.float32, jnp.float32)
  modules = bench_ours._pipeline_modules(built)
  train = sd15_rf.get_config().rf
  train.log_every = 10 ** 9  # no timed step measures text_use
  tx = state_lib.make_optimizer(train.optimizer, train.steps)
  step = step_lib.make_train_step(flow_loss.flow_matching_loss(modules, train), train.ema_decay)
  if args.flops:
    counted = flops(step, built, cfg, batch, tx)
    for name, gflops in counted.items():
      print(f'{args.config}, batch {batch}, {name}: {gflops:.1f} GFLOPs per step')
    first, second = counted.values()
    print(f'encoded data: {1 - second / first:.0%} fewer FLOPs per step')
    return
  frozen = {'vae': random_params(built['vae'], 1), 'text': random_params(built['text_encoder'], 2)}
  frozen['null_embeds'] = sampling.encode_text(modules, frozen, bench_configs.token_ids(cfg, 1))
  state = state_lib.TrainState.create(random_params(built['unet'], 0), tx)
  inputs = batches(cfg, batch, modules, frozen)
  measured = {name: [] for name in inputs}
  for _ in range(args.rounds):
    for name, variant in inputs.items():
      ms, state = measure(step, state, frozen, variant, args.steps)
      measured[name].append(ms)
      print(f'{name}: {ms:.1f} ms/step', flush=True)
  rows = {name: {'ms_per_step': statistics.median(ms), 'images_per_s':
                 1e3 * batch / statistics.median(ms), 'ms_each_round': ms}
          for name, ms in measured.items()}
  result = {'config': args.config, 'batch_size': batch, 'image_size': cfg.image_size,
            'steps': args.steps, 'rounds': args.rounds, 'cpus': os.cpu_count(),
            'machine': platform.platform(), 'load_average': list(os.getloadavg()), 'rows': rows}
  print('| step | ms/step | images/s |\n|---|---|---|')
  for name, row in rows.items():
    print(f"| {name} | {row['ms_per_step']:.1f} | {row['images_per_s']:.1f} |")
  first, second = rows.values()
  print(f"encoded data: {first['ms_per_step'] / second['ms_per_step']:.2f}x faster per step")
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  main()
