"""Stage 'pairs': the teacher ODE turns noise X0 into X1 = ODE(X0 | text), for reflow.

The teacher (`pairs.teacher`) is a finished stage of the workdir or params at an absolute
path (a flow of the config's model, solved with `pairs.solver`), or a diffusers folder at
an absolute path: a diffusion model such as Stable Diffusion itself, as in the paper
(its probability-flow ODE, solved with `pairs.sampler`), or a flow (`pairs.solver`). A
folder teacher conditions on its own text encoder, and its tokenizer's ids are stored
with the pairs: reflow reads them with model.diffusers_path's tokenizer, so that folder
should be the teacher's (or share its tokenizer).

Pair i has the caption of example i of the prompt split, or prompt i of
data.prompts_file (the captions cycle when there are more pairs than examples), and the
noise X0 ~ N(0, I) drawn from a key folded from (seed, i), so any pair can be regenerated
alone. Pairs are written in numbered shards
(instaflow_jax/data/shards.py); a restarted stage skips the shards on disk, so a killed run
loses at most the shard in progress. Process p of n writes the shards j with j % n == p,
on its own devices (each batch split over them, the teacher replicated): once the teacher
is loaded, the processes work without waiting for each other until the stage ends.
"""
import dataclasses
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from instaflow_jax import parallel
from instaflow_jax import pipeline as pipeline_lib
from instaflow_jax import sampling
from instaflow_jax import workdir as workdir_lib
from instaflow_jax.convert import diffusers as diffusers_io
from instaflow_jax.data import input as input_lib
from instaflow_jax.data import pairs as pairs_lib
from instaflow_jax.data import shards
from instaflow_jax.flow import rectified_flow
from instaflow_jax.flow import samplers
from instaflow_jax.models import formulations
from instaflow_jax.stages import common

_NOISE_STREAM = 0x70616972  # 'pair': keeps pair noise apart from other uses of the seed


def pair_noise(seed: int, indices: np.ndarray, latent_shape) -> jax.Array:
  """X0 of each pair index, from a key folded from (seed, index)."""
  base = jax.random.fold_in(jax.random.key(seed), _NOISE_STREAM)
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base, i), latent_shape))(
      jnp.asarray(indices, jnp.uint32))


def pair_captions(captions: Sequence[list], indices) -> list:
  """Pair i takes example i % N of `captions` (each example's list of captions); its c-th
  pass over the examples takes caption c."""
  chosen = []
  for i in indices:
    choices = captions[int(i) % len(captions)]
    chosen.append(choices[(int(i) // len(captions)) % len(choices)])
  return chosen


def prompt_captions(config: ml_collections.ConfigDict) -> Sequence[list]:
  """The pairs' prompts: data.prompts_file's lines, or the captions of pairs.split."""
  return input_lib.example_captions(config.data, config.pairs.split, common.prompts_file(config))


def prompts_description(config: ml_collections.ConfigDict) -> str:
  """Where the pairs' prompts come from, as meta.json records it."""
  if common.prompts_file(config):
    return f'file:{common.prompts_file(config)}'
  return input_lib.describe(input_lib.input_config(config.data, config.pairs.split))


@dataclasses.dataclass(frozen=True)
class Teacher:
  """The pairs' teacher: its pipeline (U-Net params, text side), the solver of its ODE,
  and what meta.json records of it."""
  pipe: pipeline_lib.Pipeline
  solver: sampling.AnySolver
  name: str  # pairs.teacher: a stage of the workdir, or an absolute path

  def description(self, guidance: float) -> dict:
    solver = self.solver
    described = {'kind': self.pipe.kind, 'name': self.name, 'solver': solver.kind,
                 'num_steps': solver.num_steps, 'guidance': guidance}
    if isinstance(solver, samplers.Solver):
      described.update(rtol=solver.rtol, atol=solver.atol)
    return described


def flow_solver(pairs_config: ml_collections.ConfigDict) -> samplers.Solver:
  return samplers.Solver(pairs_config.solver, pairs_config.num_steps, pairs_config.rtol,
                         pairs_config.atol)


def is_teacher_folder(teacher: str) -> bool:
  return os.path.isabs(teacher) and diffusers_io.is_pipeline_folder(teacher)


def load_teacher(config: ml_collections.ConfigDict, workdir: str) -> Teacher:
  """The teacher `pairs.teacher` names: a diffusers folder (a diffusion model or a flow,
  as pairs.teacher_kind or its class name says), or a stage's params for the config's
  model. A missing teacher or an unsupported scheduler config stops here, before compute."""
  pairs_config = config.pairs
  if is_teacher_folder(pairs_config.teacher):
    pipe = pipeline_lib.Pipeline.from_diffusers(  # frozen: all of it in the compute dtype
        pairs_config.teacher, kind=pairs_config.get('teacher_kind') or None,
        dtype=jnp.dtype(config.model.compute_dtype))
    if pipe.kind == 'diffusion':  # a config without pairs.sampler: the kind's default
      solver = pipe.solver(pairs_config.get('sampler'), pairs_config.num_steps)
    else:
      solver = flow_solver(pairs_config)
    return Teacher(pipe, solver, pairs_config.teacher)
  workdir_lib.stage_params_path(workdir, pairs_config.teacher, 'pairs.teacher')
  pipe = pipeline_lib.Pipeline.from_config(config.model, seed=config.seed, workdir=workdir)
  pipe = dataclasses.replace(pipe, unet_params=common.initial_unet_params(
      pipe, workdir, pairs_config.teacher, 'pairs.teacher'))
  return Teacher(pipe, flow_solver(pairs_config), pairs_config.teacher)


def teacher_solver(modules: sampling.PipelineModules, solver: sampling.AnySolver,
                   layout: parallel.Layout):
  """(params, token_ids, uncond_ids, x0, guidance) -> (X1, NFE), compiled for `layout`:
  params replicated, the batch split over the batch axes."""
  def solve(params, token_ids, uncond_ids, x0, guidance):
    solution = sampling.sample_latents(modules, params, token_ids, uncond_ids, x0,
                                       guidance, solver)
    return solution.x1, solution.nfe

  batch = layout.batch_sharding
  return formulations.jit(solve,
                          in_shardings=(layout.replicated, batch, batch, batch,
                                        layout.replicated),
                          out_shardings=(batch, layout.replicated))


def run_pairs(config: ml_collections.ConfigDict, stage_dir: str) -> Mapping[str, Any]:
  # Each process makes its own shards on its own devices.
  with parallel.use(parallel.data_parallel(jax.local_devices())) as layout:
    return _write_pairs(config, stage_dir, layout)


def _write_pairs(config: ml_collections.ConfigDict, stage_dir: str,
                 layout: parallel.Layout) -> Mapping[str, Any]:
  pairs_config = config.pairs
  layout.check_batch_size(pairs_config.batch_size, 'pairs.batch_size (per process)')
  workdir = os.path.dirname(stage_dir)
  teacher = load_teacher(config, workdir)
  captions = prompt_captions(config)
  pipe = teacher.pipe
  params = parallel.put(pipe.params, layout.replicated)
  latent_shape = pipe.latent_shape
  ranges = shards.shard_ranges(pairs_config.num_pairs, pairs_config.shard_size)
  meta = {
      'latent_shape': list(latent_shape), 'max_length': int(pipe.tokenizer.model_max_length),
      'num_pairs': pairs_config.num_pairs, 'shard_size': pairs_config.shard_size,
      'num_shards': len(ranges), 'seed': config.seed,
      'prompts': prompts_description(config),
      'teacher': teacher.description(pairs_config.guidance)}
  # meta.json first: it refuses pairs on disk made with other settings.
  parallel.process_0_first('pairs meta', lambda: shards.write_meta(stage_dir, pairs_lib.KIND,
                                                                   meta))
  workdir_lib.write_stage_config(stage_dir, config)
  solve = teacher_solver(pipe.modules, teacher.solver, layout)
  guided = rectified_flow.uses_guidance(pairs_config.guidance)
  uncond_ids = pipe.tokenize([''] * pairs_config.batch_size) if guided else None
  logging.info('pairs: %s teacher, %s, guidance %.2f', pipe.kind, teacher.solver,
               pairs_config.guidance)
  evaluations = []

  def make_records(indices, padded):
    x0 = pair_noise(config.seed, padded, latent_shape)
    ids = pipe.tokenize(pair_captions(captions, padded))
    x1, nfe = solve(params, *layout.shard_batch((ids, uncond_ids, x0)),
                    jnp.float32(pairs_config.guidance))
    evaluations.append(int(nfe))
    x0, x1 = np.asarray(x0), np.asarray(x1)
    return [{'index': int(i), 'x0': x0[k], 'x1': x1[k], 'input_ids': ids[k]}
            for k, i in enumerate(indices)]

  written = shards.write_missing_shards(
      stage_dir, pairs_lib.KIND, ranges, pairs_config.batch_size, make_records, 'pairs',
      lambda: f', mean NFE {np.mean(evaluations):.1f}')
  return {'num_pairs': pairs_config.num_pairs, 'num_shards': len(ranges),
          'written_now': written['written_now'], 'seconds': written['seconds'],
          'mean_nfe': float(np.mean(evaluations)) if evaluations else None}
