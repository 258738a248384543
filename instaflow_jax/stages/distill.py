"""Stage 'distill': a student that maps noise to image in k Euler steps (InstaFlow: k=1).

The student starts from the 2-RF and is trained so that its k-step Euler solution from X0
(one step: X0 + v(X0, time input 1000)) matches X1, the frozen teacher's ODE solution from
the same X0 with the same text. X1 is computed inside the step by the teacher (an N-step
Euler solve with guidance w) from the batch's prompts alone (data.prompts_file's, or the
dataset's captions), or read from a pairs stage (`distill.pairs`).

Losses: 'l2', 'l1' and 'pseudo_huber' on latents, 'lpips' on decoded images, 'lpips_huber'
(LPIPS + pseudo-Huber, 2-RF++); `loss` is used until `switch_step`, then `loss_after`
(the released InstaFlow-0.9B: L2, then LPIPS). LPIPS needs pretrained trunk weights
(`lpips_trunk_path`); there is no fallback.
"""
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from instaflow_jax import pipeline as pipeline_lib
from instaflow_jax import sampling
from instaflow_jax import workdir as workdir_lib
from instaflow_jax.flow import rectified_flow
from instaflow_jax.flow import samplers
from instaflow_jax.models import abstract
from instaflow_jax.models import stacked_unet
from instaflow_jax.stages import common
from instaflow_jax.training import loop

LATENT_LOSSES = ('l2', 'l1', 'pseudo_huber')
IMAGE_LOSSES = ('lpips', 'lpips_huber')


def _losses_used(config) -> tuple:
  used = (config.loss,) + ((config.loss_after,) if config.switch_step >= 0 else ())
  for kind in used:
    if kind not in LATENT_LOSSES + IMAGE_LOSSES:
      raise ValueError(f'distill loss {kind!r} is unknown; use one of '
                       f'{LATENT_LOSSES + IMAGE_LOSSES}')
  return used


def load_lpips_if_needed(config, dtype=jnp.float32):
  """(module, params) of LPIPS, frozen in `dtype`, when a loss needs it; fails before any
  compute otherwise."""
  if not set(_losses_used(config)) & set(IMAGE_LOSSES):
    return None, None
  from instaflow_jax.convert import lpips_weights
  module, params = lpips_weights.load_lpips(
      config.lpips_net, trunk_path=config.lpips_trunk_path or None, dtype=dtype)
  return module, abstract.cast_floats(params, dtype)


def student_sample(modules, params, x0, embeds, num_steps: int):
  """The student's k-step Euler solution from X0 (no guidance: the student is distilled
  from a guided teacher and is used at guidance 1)."""
  velocity = samplers.conditional_velocity(
      lambda x, t, e: modules.unet.apply({'params': params}, x, t, e), embeds)
  return samplers.euler_sample(velocity, x0, num_steps, unroll=True)  # differentiated


def teacher_target(teacher_unet, frozen, x0, embeds, config):
  """X1 = the teacher's ODE solution from X0 with guidance w (no gradient)."""
  guided = rectified_flow.uses_guidance(config.teacher_guidance)
  uncond = jnp.broadcast_to(frozen['null_embeds'], embeds.shape) if guided else None
  velocity = samplers.conditional_velocity(
      lambda x, t, e: teacher_unet.apply({'params': frozen['teacher']}, x, t, e), embeds,
      uncond, config.teacher_guidance)
  return jax.lax.stop_gradient(samplers.euler_sample(velocity, x0, config.teacher_steps))


def distillation_loss(modules, config, latent_shape, lpips_module=None):
  """loss_fn(params, frozen, batch, rng, step) of the student. The teacher is the single
  U-Net the student is built from (itself, or the one a stacked student copies twice).
  Without stored pairs, a batch needs only its prompts: X0 ~ N(0, I) of `latent_shape`."""
  teacher_unet = stacked_unet.base_unet(modules.unet)

  def per_example(kind, frozen, prediction, target):
    if kind in LATENT_LOSSES:
      return rectified_flow.per_example_loss(prediction, target, kind)
    to_lpips = lambda z: sampling.decode_to_images(modules, frozen, z) * 2.0 - 1.0
    distance = lpips_module.apply({'params': frozen['lpips']}, to_lpips(prediction),
                                  to_lpips(target))
    if kind == 'lpips_huber':
      distance = distance + rectified_flow.per_example_loss(prediction, target, 'pseudo_huber')
    return distance

  def loss_fn(params, frozen, batch, rng, step):
    _, noise_rng = jax.random.split(rng)  # the second key: the noise earlier runs drew
    embeds = sampling.text_embeddings(modules, frozen, batch)
    if 'latents' in batch and 'x0' in batch:  # stored pairs
      x0, x1 = batch['x0'], batch['latents']
    else:
      x0 = jax.random.normal(noise_rng, (embeds.shape[0],) + tuple(latent_shape), jnp.float32)
      x1 = teacher_target(teacher_unet, frozen, x0, embeds, config)
    prediction = student_sample(modules, params, x0, embeds, config.student_steps)
    if config.switch_step < 0:
      losses = per_example(config.loss, frozen, prediction, x1)
    else:
      losses = jax.lax.cond(step < config.switch_step,
                            lambda: per_example(config.loss, frozen, prediction, x1),
                            lambda: per_example(config.loss_after, frozen, prediction, x1))
    return jnp.mean(losses), {'student_l2': jnp.mean(jnp.square(prediction - x1))}

  return loss_fn


def run_distill(config: ml_collections.ConfigDict, stage_dir: str) -> Mapping[str, Any]:
  stage = os.path.basename(os.path.normpath(stage_dir))  # its config section
  distill_config = config[stage]
  workdir = os.path.dirname(stage_dir)
  # Everything that can be missing is checked before the first compile.
  workdir_lib.stage_params_path(workdir, distill_config.teacher, f'{stage}.teacher')
  if distill_config.init:
    workdir_lib.stage_params_path(workdir, distill_config.init, f'{stage}.init')
  lpips_module, lpips_params = load_lpips_if_needed(distill_config,
                                                    jnp.dtype(config.model.compute_dtype))
  pipe = pipeline_lib.Pipeline.for_training(config.model, seed=config.seed, workdir=workdir)
  teacher_unet = stacked_unet.base_unet(pipe.unet)
  teacher = abstract.cast_floats(common.load_unet_params(
      teacher_unet,
      workdir_lib.stage_params_path(workdir, distill_config.teacher, f'{stage}.teacher'),
      f'{stage}.teacher', pipe.unet_params if teacher_unet is pipe.unet else None),
      pipe.unet.dtype)  # frozen: in the compute dtype
  student = common.initial_unet_params(pipe, workdir, distill_config.init, f'{stage}.init')
  frozen = dict(common.frozen_params(pipe), teacher=teacher)
  if lpips_module is not None:
    frozen['lpips'] = lpips_params
  data = common.training_input(config, stage_dir, pipe, distill_config, prompts_only=True)
  loop.train(
      distill_config, stage_dir, stage=stage, batches=data.batches, seed=config.seed,
      run_config=config, **common.trained_part(
          config, stage, pipe, student, frozen,
          distillation_loss(pipe.modules, distill_config, pipe.latent_shape, lpips_module),
          common.make_sample_fn(pipe, common.sample_prompts(config, distill_config.num_samples),
                                distill_config, config.seed)))
  return {'steps': distill_config.steps, 'student_steps': distill_config.student_steps}
