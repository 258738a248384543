r"""The rf stage's training step with the frozen encoders in it, against the same step on
the encode stage's stored latent distributions and text states (data/encoded.py).

Both steps are the trainer's (training/step.py over training/flow_loss.py's loss, with
configs/sd15_rf.py's `rf` section: AdamW, EMA, caption dropout 0.1, uniform time), for
bench.py's model presets (benchmarks/bench_configs.py, random weights): with the encoders,
a batch is uint8 images and token ids, and the step runs the VAE encoder and the text
encoder before the U-Net; from encoded data, a batch is the latents' mean and std and the
text states, and the step only samples the latents. Milliseconds per step (median of
--steps after the compile) and images/s, each variant in turn --rounds times.

  JAX_PLATFORMS=cpu PYTHONPATH=. .venv/bin/python benchmarks/encoded_step.py --config small
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
  parser.add_argument('--out', default=None, help='write the numbers here as JSON')
  args = parser.parse_args()
  cfg = bench_configs.CONFIGS[args.config]
  batch = args.batch_size or cfg.train_batch
  built = bench_ours._modules(cfg, jnp.float32, jnp.float32)
  modules = bench_ours._pipeline_modules(built)
  frozen = {'vae': random_params(built['vae'], 1), 'text': random_params(built['text_encoder'], 2)}
  frozen['null_embeds'] = sampling.encode_text(modules, frozen, bench_configs.token_ids(cfg, 1))
  train = sd15_rf.get_config().rf
  train.log_every = 10 ** 9  # no timed step measures text_use
  tx = state_lib.make_optimizer(train.optimizer, train.steps)
  step = step_lib.make_train_step(flow_loss.flow_matching_loss(modules, train), train.ema_decay)
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
