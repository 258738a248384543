"""Stage 'pairs': the teacher ODE turns noise X0 into X1 = ODE(X0 | text), for reflow.

Pair i has the caption of example i of the prompt split (the captions cycle when there
are more pairs than examples) and the noise X0 ~ N(0, I) drawn from a key folded from
(seed, i), so any pair can be regenerated alone. Pairs are written in numbered shards
(instaflow_jax/data/pairs.py); a restarted stage skips the shards on disk, so a killed run
loses at most the shard in progress. Process p of n writes the shards j with j % n == p,
on its own devices (each batch split over them, the teacher replicated): once the teacher
is loaded, the processes work without waiting for each other until the stage ends.
"""
import os
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from instaflow_jax import parallel
from instaflow_jax import pipeline as pipeline_lib
from instaflow_jax import sampling
from instaflow_jax import workdir as workdir_lib
from instaflow_jax.data import input as input_lib
from instaflow_jax.data import pairs as pairs_lib
from instaflow_jax.flow import rectified_flow
from instaflow_jax.flow import samplers
from instaflow_jax.stages import common

_NOISE_STREAM = 0x70616972  # 'pair': keeps pair noise apart from other uses of the seed


def pair_noise(seed: int, indices: np.ndarray, latent_shape) -> jax.Array:
  """X0 of each pair index, from a key folded from (seed, index)."""
  base = jax.random.fold_in(jax.random.key(seed), _NOISE_STREAM)
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base, i), latent_shape))(
      jnp.asarray(indices, jnp.uint32))


def pair_captions(source, caption_key: str, indices) -> list:
  """Pair i takes example i % N; its c-th pass over the examples takes caption c."""
  captions = []
  for i in indices:
    choices = input_lib.captions_of(source[int(i) % len(source)], caption_key)
    captions.append(choices[(int(i) // len(source)) % len(choices)])
  return captions


def solver_of(config: ml_collections.ConfigDict) -> samplers.Solver:
  return samplers.Solver(config.solver, config.num_steps, config.rtol, config.atol)


def teacher_solver(modules: sampling.PipelineModules, solver: samplers.Solver,
                   layout: parallel.Layout):
  """(params, token_ids, uncond_ids, x0, guidance) -> (X1, NFE), compiled for `layout`:
  params replicated, the batch split over the batch axes."""
  def solve(params, token_ids, uncond_ids, x0, guidance):
    solution = sampling.sample_latents(modules, params, token_ids, uncond_ids, x0,
                                           guidance, solver)
    return solution.x1, solution.nfe

  batch = layout.batch_sharding
  return jax.jit(solve, in_shardings=(layout.replicated, batch, batch, batch, layout.replicated),
                 out_shardings=(batch, layout.replicated))


def run_pairs(config: ml_collections.ConfigDict, stage_dir: str) -> Mapping[str, Any]:
  pairs_config = config.pairs
  layout = parallel.data_parallel(jax.local_devices())
  layout.check_batch_size(pairs_config.batch_size, 'pairs.batch_size (per process)')
  workdir = os.path.dirname(stage_dir)
  workdir_lib.stage_params_path(workdir, pairs_config.teacher, 'pairs.teacher')
  pipe = pipeline_lib.Pipeline.from_config(config.model, seed=config.seed, workdir=workdir)
  teacher = common.initial_unet_params(pipe, workdir, pairs_config.teacher, 'pairs.teacher')
  params = parallel.put(dict(pipe.params, unet=teacher), layout.replicated)
  latent_shape = pipe.latent_shape
  solver = solver_of(pairs_config)
  ranges = pairs_lib.shard_ranges(pairs_config.num_pairs, pairs_config.shard_size)
  meta = {
      'latent_shape': list(latent_shape), 'max_length': int(pipe.tokenizer.model_max_length),
      'num_pairs': pairs_config.num_pairs, 'shard_size': pairs_config.shard_size,
      'num_shards': len(ranges), 'teacher': pairs_config.teacher, 'seed': config.seed,
      'solver': solver.kind, 'num_steps': solver.num_steps, 'rtol': solver.rtol,
      'atol': solver.atol, 'guidance': pairs_config.guidance,
      'prompts': f'{config.data.name}:{pairs_config.split}'}
  # meta.json first: it refuses pairs on disk made with other settings.
  parallel.process_0_first('pairs meta', lambda: pairs_lib.write_meta(stage_dir, meta))
  workdir_lib.write_stage_config(stage_dir, config)
  solve = teacher_solver(pipe.modules, solver, layout)
  source = input_lib.open_source(input_lib.input_config(config.data, pairs_config.split))
  guided = rectified_flow.uses_guidance(pairs_config.guidance)
  batch = pairs_config.batch_size
  uncond_ids = pipe.tokenize([''] * batch) if guided else None
  mine = [j for j in range(len(ranges)) if j % jax.process_count() == jax.process_index()]
  todo = [j for j in mine if not os.path.exists(pairs_lib.shard_path(stage_dir, j, len(ranges)))]
  logging.info('pairs: %d of %d shards to write (%s, guidance %.2f)', len(todo), len(mine),
               solver, pairs_config.guidance)
  start, done, evaluations = time.time(), 0, []
  for j in todo:
    records = []
    for first in range(ranges[j].start, ranges[j].stop, batch):
      indices = np.arange(first, min(first + batch, ranges[j].stop))
      # The last batch is padded to the full size: one compiled program for every batch.
      padded = np.concatenate([indices, np.full(batch - len(indices), indices[-1])])
      x0 = pair_noise(config.seed, padded, latent_shape)
      ids = pipe.tokenize(pair_captions(source, config.data.caption_key, padded))
      x1, nfe = solve(params, *layout.shard_batch((ids, uncond_ids, x0)),
                      jnp.float32(pairs_config.guidance))
      evaluations.append(int(nfe))
      x0, x1 = np.asarray(x0), np.asarray(x1)
      records += [{'index': int(i), 'x0': x0[k], 'x1': x1[k], 'input_ids': ids[k]}
                  for k, i in enumerate(indices)]
    pairs_lib.write_shard(pairs_lib.shard_path(stage_dir, j, len(ranges)), records)
    done += len(records)
    elapsed = time.time() - start
    remaining = sum(len(ranges[k]) for k in todo) - done
    logging.info('pairs: shard %d/%d written, %.1f pairs/s, ETA %.0f s, mean NFE %.1f',
                 j + 1, len(ranges), done / elapsed, remaining * elapsed / done,
                 np.mean(evaluations))
  return {'num_pairs': pairs_config.num_pairs, 'num_shards': len(ranges),
          'written_now': done, 'seconds': round(time.time() - start, 1),
          'mean_nfe': float(np.mean(evaluations)) if evaluations else None}
