"""What every stage that builds on the model shares: its frozen networks' inputs, the
params a stage starts from, its batches, and the fixed prompts of its sample grids."""
import dataclasses
import os
from typing import Callable, Sequence

import jax
import ml_collections

from instaflow_jax import checkpoint
from instaflow_jax import parallel
from instaflow_jax import pipeline as pipeline_lib
from instaflow_jax import sampling
from instaflow_jax import trained_unet
from instaflow_jax import workdir as workdir_lib
from instaflow_jax.data import encoded as encoded_lib
from instaflow_jax.data import input as input_lib
from instaflow_jax.data import pairs as pairs_lib
from instaflow_jax.models import abstract
from instaflow_jax.models.stacked_unet import StackedUNet
from instaflow_jax.models.stacked_unet import init_from_unet
from instaflow_jax.stages import encode


def frozen_params(pipe: pipeline_lib.Pipeline) -> dict:
  """What the step needs besides the trained params: frozen networks and the empty
  prompt's embedding (the unconditional input for classifier-free guidance)."""
  params = pipe.params
  null_embeds = sampling.encode_text(pipe.modules, params, pipe.tokenize(['']))
  return {'text': params['text'], 'vae': params['vae'], 'null_embeds': null_embeds}


def prompts_file(config: ml_collections.ConfigDict, field: str = 'prompts_file') -> str:
  """data.<field>, '' where the config has none (configs written before the field)."""
  return config.data.get(field, '')


def held_out_captions(config: ml_collections.ConfigDict) -> Sequence[list]:
  """Each held-out example's captions: data.eval_prompts_file's lines, or eval_split's."""
  return input_lib.example_captions(config.data, config.data.eval_split,
                                    prompts_file(config, 'eval_prompts_file'))


def sample_prompts(config: ml_collections.ConfigDict, count: int) -> list:
  """The first `count` held-out prompts (cycled when fewer): fixed prompts for sample grids."""
  captions = held_out_captions(config)
  return [captions[i % len(captions)][0] for i in range(count)]


def check_prompts_files(config: ml_collections.ConfigDict) -> None:
  """Every prompts file the config names is readable and holds a prompt: checked before
  the first stage, so that a later stage cannot fail on it after hours of work."""
  for field in ('prompts_file', 'eval_prompts_file'):
    if prompts_file(config, field):
      input_lib.read_prompts(prompts_file(config, field))


def make_sample_fn(pipe: pipeline_lib.Pipeline, prompts, train_config, seed: int) -> Callable:
  """(U-Net params[, text encoder params]) -> images of the fixed prompts from fixed noise
  (for the periodic grid)."""
  size = pipe.default_size
  latents = pipe.initial_latents(len(prompts), size, size, seed)

  def sample(unet_params, text_encoder_params=None):
    sampled = dataclasses.replace(pipe, unet_params=unet_params)
    if text_encoder_params is not None:
      sampled = dataclasses.replace(sampled, text_encoder_params=text_encoder_params)
    return sampled.generate(
        prompts, num_inference_steps=train_config.sample_steps,
        guidance_scale=train_config.sample_guidance, latents=latents)

  return sample


def initial_unet_params(pipe: pipeline_lib.Pipeline, workdir: str, init: str, what: str):
  """The U-Net params a stage starts from: the base model's, or a finished stage's."""
  if not init:
    return pipe.unet_params
  return load_unet_params(pipe.unet, workdir_lib.stage_params_path(workdir, init, what), what,
                          pipe.unet_params)


def load_unet_params(unet, path: str, what: str, base_params=None):
  """The params of `unet` saved at `path` (a LoRA stage's merged onto what it started from,
  `base_params` where that is the base model). A stacked U-Net also starts from a single
  U-Net's params (InstaFlow-1.7B from the 2-RF): both halves get a copy."""
  if isinstance(unet, StackedUNet) and not {'unet_1', 'unet_2'} <= checkpoint.top_level_names(path):
    return init_from_unet(load_unet_params(unet.base_unet(), path, what), unet.config)
  return trained_unet.params_at(path, abstract.abstract_params(unet), base_params, what)


LORA_BASE = 'lora_base'  # the frozen params a LoRA stage's LoRA is merged onto


def trained_part(config: ml_collections.ConfigDict, stage: str, pipe: pipeline_lib.Pipeline,
                 init_params, frozen: dict, loss_fn, sample_fn) -> dict:
  """loop.train's init_params, frozen, loss_fn, sample_fn and param_axes for the U-Net
  that starts from `init_params`: the whole U-Net, or, when the stage trains a LoRA
  (model.lora.stages names it), a LoRA (replicated: it is small), with `init_params`
  frozen as its base and merged with it inside the loss and the sampler; or the U-Net and
  the text encoder (the stage's `train_text_encoder`: _with_text_encoder)."""
  if config[stage].get('train_text_encoder'):
    return _with_text_encoder(pipe, init_params, frozen, loss_fn, sample_fn)
  lora_config = trained_unet.stage_lora(config, stage)
  if lora_config is None:
    return dict(init_params=init_params, frozen=frozen, loss_fn=loss_fn, sample_fn=sample_fn,
                param_axes=parallel.logical_axes(pipe.unet))

  def lora_loss(lora, frozen, *rest):
    return loss_fn(trained_unet.merged(frozen[LORA_BASE], lora, lora_config), frozen, *rest)

  return dict(init_params=trained_unet.init_lora(init_params, lora_config, config.seed),
              frozen=dict(frozen, **{LORA_BASE: init_params}), loss_fn=lora_loss,
              sample_fn=lambda lora: sample_fn(trained_unet.merged(init_params, lora, lora_config)),
              param_axes=None)


TRAINED_TEXT_ENCODER = 'text_encoder'  # its params beside the U-Net's where both train


def _with_text_encoder(pipe: pipeline_lib.Pipeline, init_params, frozen: dict, loss_fn,
                       sample_fn) -> dict:
  """loop.train's arguments for the U-Net and the text encoder trained together (config
  `train_text_encoder`): params {'unet', 'text_encoder'}; the loss encodes the captions,
  and the empty prompt of caption dropout, with the text encoder being trained; the
  stage's final params are the U-Net's (the text encoder's go to the run's text side)."""
  null_ids = pipe.tokenize([''])

  def loss_with_text_encoder(params, frozen, *rest):
    text = {'text': params[TRAINED_TEXT_ENCODER]}
    null_embeds = sampling.encode_text(pipe.modules, text, null_ids)
    return loss_fn(params['unet'], dict(frozen, null_embeds=null_embeds, **text), *rest)

  return dict(init_params={'unet': init_params, TRAINED_TEXT_ENCODER: pipe.text_encoder_params},
              frozen={k: v for k, v in frozen.items() if k not in ('text', 'null_embeds')},
              loss_fn=loss_with_text_encoder,
              sample_fn=lambda params: sample_fn(params['unet'], params[TRAINED_TEXT_ENCODER]),
              # The text encoder replicated: it is small, and process 0 writes it whole.
              param_axes={'unet': parallel.logical_axes(pipe.unet),
                          TRAINED_TEXT_ENCODER: jax.tree.map(lambda _: jax.sharding.PartitionSpec(),
                                                             pipe.text_encoder_params)},
              stage_params=lambda params: params['unet'])


def training_input(config: ml_collections.ConfigDict, stage_dir: str, pipe, train_config,
                   prompts_only: bool = False):
  """The stage's batches: images and captions, the encode stage's latents and text states
  (`encoded`), or (for reflow) the teacher's pairs. A stage that needs `prompts_only` reads
  data.prompts_file's prompts when it names one."""
  kwargs = dict(global_batch_size=train_config.batch_size, seed=config.seed,
                process_index=jax.process_index(), process_count=jax.process_count())
  if train_config.get('encoded'):
    encoded_dir = os.path.join(os.path.dirname(stage_dir), train_config.encoded)
    data = encoded_lib.EncodedInput(encoded_dir, **kwargs)
    encoded_lib.check_compatible(data.meta, pipe.latent_shape, encode.text_shape(pipe),
                                 encoded_dir)
    return data
  if not train_config.pairs and prompts_only and prompts_file(config):
    return input_lib.PromptsInput(input_lib.read_prompts(prompts_file(config)),
                                  pipe.tokenizer, **kwargs)
  if not train_config.pairs:
    return input_lib.create_input(input_lib.input_config(config.data, config.data.train_split),
                                  pipe.tokenizer, **kwargs)
  pairs_dir = os.path.join(os.path.dirname(stage_dir), train_config.pairs)
  data = pairs_lib.PairsInput(pairs_dir, **kwargs)
  pairs_lib.check_compatible(data.meta, pipe.latent_shape,
                             pipe.tokenizer.model_max_length, pairs_dir)
  return data
