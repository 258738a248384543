"""Stage 'rf': train a text-conditioned rectified flow v(x_s, s | text).

The path is x_s = s*X1 + (1-s)*X0 with X0 ~ N(0, I) drawn independently of the data X1
(or, for reflow, X0 given by the batch as the teacher's coupled noise), and the network
regresses the velocity X1 - X0 at time input 1000*(1-s). The text encoder and the
autoencoder are frozen: they run inside the step but are not part of the train state.
A batch may carry 'latents' and 'text_embeds' already computed (cached), in which case
the frozen networks are skipped.
"""
import dataclasses
import functools
import os
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from instaflow_jax import parallel
from instaflow_jax import pipeline as pipeline_lib
from instaflow_jax.convert import diffusers as diffusers_io
from instaflow_jax.data import input as input_lib
from instaflow_jax.data import pairs as pairs_lib
from instaflow_jax.flow import rectified_flow
from instaflow_jax.models.stacked_unet import StackedUNet
from instaflow_jax.models.stacked_unet import init_from_unet
from instaflow_jax.training import checkpoint
from instaflow_jax.training import loop


def frozen_params(pipe: pipeline_lib.Pipeline) -> dict:
  """What the step needs besides the trained params: frozen networks and the empty
  prompt's embedding (the unconditional input for classifier-free guidance)."""
  params = pipe.params
  null_embeds = pipeline_lib.encode_text(pipe.modules, params, pipe.tokenize(['']))
  return {'text': params['text'], 'vae': params['vae'], 'null_embeds': null_embeds}


def model_inputs(modules: pipeline_lib.PipelineModules, frozen, batch, rng):
  """(X1 latents, text embeddings) of a batch, computed unless cached in it."""
  if 'latents' in batch:
    x1 = batch['latents']
  else:
    x1 = pipeline_lib.encode_images(modules, frozen, batch['image'], rng)
  if 'text_embeds' in batch:
    embeds = batch['text_embeds']
  else:
    embeds = pipeline_lib.encode_text(modules, frozen, batch['input_ids'])
  return x1, embeds


def drop_captions(embeds: jax.Array, null_embeds: jax.Array, probability: float,
                  rng: jax.Array) -> jax.Array:
  """Replaces each example's text by the empty prompt with `probability` (CFG training)."""
  drop = jax.random.bernoulli(rng, probability, (embeds.shape[0],))
  return jnp.where(drop[:, None, None], null_embeds.astype(embeds.dtype), embeds)


TEXT_USE_METRICS = ('text_loss_matched', 'text_loss_shuffled', 'text_use')


def text_use(loss_of_embeds, embeds: jax.Array) -> dict:
  """How much the model uses the text: the loss of the batch with its own captions
  against the same batch (same noise and times) with the captions shifted by one
  example. text_use = 1 - matched / shuffled: 0 when the text is ignored."""
  matched = loss_of_embeds(embeds).astype(jnp.float32)
  shuffled = loss_of_embeds(jnp.roll(embeds, 1, axis=0)).astype(jnp.float32)
  return dict(zip(TEXT_USE_METRICS, (matched, shuffled, 1.0 - matched / shuffled)))


def flow_matching_loss(modules: pipeline_lib.PipelineModules, config: ml_collections.ConfigDict):
  """loss_fn(params, frozen, batch, rng, step) for rectified-flow (and reflow) training.

  At the steps the loop logs (every log_every, and the last), its metrics include
  text_use (two more forward passes, without gradient); zeros at the other steps."""
  time_config = config.time

  def loss_fn(params, frozen, batch, rng, step):
    latent_rng, drop_rng, noise_rng, time_rng = jax.random.split(rng, 4)
    x1, text_embeds = model_inputs(modules, frozen, batch, latent_rng)
    embeds = drop_captions(text_embeds, frozen['null_embeds'], config.caption_dropout, drop_rng)
    x0 = batch['x0'] if 'x0' in batch else jax.random.normal(noise_rng, x1.shape, x1.dtype)
    s = rectified_flow.sample_time(
        time_rng, x1.shape[0], time_config.kind, logit_mean=time_config.logit_mean,
        logit_std=time_config.logit_std, u_shape_a=time_config.u_shape_a)
    x_s = rectified_flow.interpolate(x0, x1, s)
    target = rectified_flow.velocity_target(x0, x1)

    def loss_of(unet_params, embeds):
      v = modules.unet.apply({'params': unet_params}, x_s, rectified_flow.network_time(s), embeds)
      return jnp.mean(rectified_flow.per_example_loss(v, target, config.loss))

    measure = lambda: text_use(functools.partial(loss_of, jax.lax.stop_gradient(params)),
                               jax.lax.stop_gradient(text_embeds))
    logged = ((step + 1) % config.log_every == 0) | (step + 1 == config.steps)
    not_measured = lambda: dict.fromkeys(TEXT_USE_METRICS, jnp.zeros((), jnp.float32))
    metrics = jax.lax.cond(logged, measure, not_measured)
    return loss_of(params, embeds), metrics

  return loss_fn


def sample_prompts(config: ml_collections.ConfigDict, count: int) -> list:
  """The first `count` captions of the held-out split: fixed prompts for sample grids."""
  source = input_lib.open_source(input_lib.input_config(config.data, config.data.eval_split))
  return [input_lib.captions_of(source[i], config.data.caption_key)[0] for i in range(count)]


def make_sample_fn(pipe: pipeline_lib.Pipeline, prompts, train_config, seed: int) -> Callable:
  """params -> images of the fixed prompts from fixed noise (for the periodic grid)."""
  size = pipe.default_size
  latents = pipe.initial_latents(len(prompts), size, size, seed)

  def sample(params):
    return dataclasses.replace(pipe, unet_params=params).generate(
        prompts, num_inference_steps=train_config.sample_steps,
        guidance_scale=train_config.sample_guidance, latents=latents)

  return sample


def stage_params_path(workdir: str, init: str, what: str) -> str:
  """Where the params named by `init` are (a stage of this workdir, or a path), checked
  to exist so that a missing teacher stops a stage before any compute."""
  path = init if os.path.isabs(init) else os.path.join(workdir, init, loop.FINAL_PARAMS)
  if not os.path.isdir(path):
    raise checkpoint.CheckpointError(f'{what}: checkpoint {path} not found; run stage {init!r} '
                                     'first or point the config at existing params')
  return path


def initial_unet_params(pipe: pipeline_lib.Pipeline, workdir: str, init: str, what: str):
  """The U-Net params a stage starts from: the base model's, or a finished stage's."""
  if not init:
    return pipe.unet_params
  return load_unet_params(pipe.unet, stage_params_path(workdir, init, what), what)


def load_unet_params(unet, path: str, what: str):
  """The params of `unet` saved at `path`. A stacked U-Net also starts from a single
  U-Net's params (InstaFlow-1.7B from the 2-RF): both halves get a copy."""
  if isinstance(unet, StackedUNet) and not {'unet_1', 'unet_2'} <= checkpoint.top_level_names(path):
    return init_from_unet(load_unet_params(unet.base_unet(), path, what), unet.config)
  abstract = nn.meta.unbox(diffusers_io.abstract_variables(unet))['params']
  return checkpoint.load_params(path, abstract, what=what)


def training_input(config: ml_collections.ConfigDict, stage_dir: str, pipe, train_config):
  """The stage's batches: images and captions, or (for reflow) the teacher's pairs."""
  kwargs = dict(global_batch_size=train_config.batch_size, seed=config.seed,
                process_index=jax.process_index(), process_count=jax.process_count())
  if not train_config.pairs:
    return input_lib.create_input(input_lib.input_config(config.data, config.data.train_split),
                                  pipe.tokenizer, **kwargs)
  pairs_dir = os.path.join(os.path.dirname(stage_dir), train_config.pairs)
  data = pairs_lib.PairsInput(pairs_dir, **kwargs)
  pairs_lib.check_compatible(data.meta, pipe.latent_shape,
                             pipe.tokenizer.model_max_length, pairs_dir)
  return data


def train_flow_stage(config: ml_collections.ConfigDict, stage_dir: str,
                     stage: str) -> Mapping[str, Any]:
  """Stage 'rf' (independent noise) or 'reflow' (the teacher's coupled pairs)."""
  train_config = config[stage]
  pipe = pipeline_lib.Pipeline.from_config(config.model, seed=config.seed,
                                           workdir=os.path.dirname(stage_dir))
  init_params = initial_unet_params(pipe, os.path.dirname(stage_dir), train_config.init,
                                    f'{stage}.init')
  data = training_input(config, stage_dir, pipe, train_config)
  loop.train(
      train_config, stage_dir, stage=stage, init_params=init_params,
      frozen=frozen_params(pipe), loss_fn=flow_matching_loss(pipe.modules, train_config),
      batches=data.batches,
      sample_fn=make_sample_fn(pipe, sample_prompts(config, train_config.num_samples),
                               train_config, config.seed),
      seed=config.seed, param_axes=parallel.logical_axes(pipe.unet), run_config=config)
  return {'steps': train_config.steps, 'examples_per_epoch': len(data)}


def run_rf(config: ml_collections.ConfigDict, stage_dir: str) -> Mapping[str, Any]:
  return train_flow_stage(config, stage_dir, 'rf')


def run_reflow(config: ml_collections.ConfigDict, stage_dir: str) -> Mapping[str, Any]:
  return train_flow_stage(config, stage_dir, 'reflow')
