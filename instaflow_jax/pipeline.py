"""Text-to-image sampling with a rectified flow, as the released InstaFlow pipeline does it.

    pipe = Pipeline.from_diffusers('path/to/instaflow-0.9b')
    images = pipe.generate(['a photo of a cat'], num_inference_steps=1)   # [B, H, W, 3] in [0, 1]

Prompts are tokenized (padded to the tokenizer's max length) on the host; everything
after that (text encoder, the Euler loop with optional classifier-free guidance, the VAE
decoder, the conversion to [0, 1]) is one jitted function, compiled once per
(batch, size, steps, guidance on/off).

The embedded model's text side (word tokenizer, frozen random text encoder) is made once
per run and stored in WORKDIR/text (store_text_side); every stage, generate and eval read
it from there (load_text_side).
"""
import dataclasses
import functools
import os
import shutil
import tempfile
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from instaflow_jax import parallel
from instaflow_jax import workdir as workdir_lib
from instaflow_jax.convert import diffusers as diffusers_io
from instaflow_jax.data.tokenizer import WordTokenizer
from instaflow_jax.data.tokenizer import tokenize
from instaflow_jax.flow import rectified_flow
from instaflow_jax.flow import samplers
from instaflow_jax.models.clip_text import CLIPTextConfig
from instaflow_jax.models.clip_text import CLIPTextModel
from instaflow_jax.models.pixel_space import IdentityAutoencoder
from instaflow_jax.models.pixel_space import IdentityConfig
from instaflow_jax.models.stacked_unet import StackedUNet
from instaflow_jax.models.stacked_unet import StackedUNetConfig
from instaflow_jax.models.stacked_unet import init_from_unet
from instaflow_jax.models.unet import UNet2DConditionModel
from instaflow_jax.models.unet import UNetConfig
from instaflow_jax.training import checkpoint

Prompts = Union[str, Sequence[str]]

# The stages whose final params are a U-Net, the latest of the recipe first.
TRAINED_STAGES = ('distill', 'reflow', 'rf')
STAGE_CONFIG = workdir_lib.CONFIG_FILE
# Bad input (a path, a file, a config) rather than a bug: command lines report it in one line.
LOAD_ERRORS = (ValueError, OSError, checkpoint.CheckpointError)


def _as_list(prompts: Prompts) -> list:
  return [prompts] if isinstance(prompts, str) else list(prompts)


@dataclasses.dataclass
class Pipeline:
  """The three networks of a text-to-image flow, their params, and the tokenizer."""
  unet: Any
  unet_params: Any
  vae: Any
  vae_params: Any
  text_encoder: Any
  text_encoder_params: Any
  tokenizer: Any
  source: Optional[str] = None  # the diffusers folder it came from, for export of extras

  @classmethod
  def from_diffusers(cls, path: str, dtype=jnp.float32) -> 'Pipeline':
    """Loads a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/)."""
    diffusers_io.read_model_index(path)
    parts = {name: diffusers_io.load_component(path, name, dtype)
             for name in ('unet', 'vae', 'text_encoder')}
    return cls(unet=parts['unet'][1], unet_params=parts['unet'][2],
               vae=parts['vae'][1], vae_params=parts['vae'][2],
               text_encoder=parts['text_encoder'][1],
               text_encoder_params=parts['text_encoder'][2],
               tokenizer=load_tokenizer(os.path.join(path, 'tokenizer')), source=path)

  @classmethod
  def from_config(cls, config, seed: int = 0, workdir: str = '') -> 'Pipeline':
    """The pipeline a training config's `model` section describes.

    source='diffusers': everything from the folder `diffusers_path`.
    source='embedded': the text side that the run in `workdir` stored (a word tokenizer
    and a small CLIP text encoder with random weights, frozen, never trained; see
    load_text_side), pixel space (identity autoencoder), and a freshly initialised U-Net
    from `config.unet`.
    In both cases the U-Net computes in `compute_dtype`, with float32 params.
    unet_kind='stacked' makes it two such U-Nets in series (InstaFlow-1.7B, with the
    removals of `config.stacked`), both initialised from the one U-Net.
    """
    kind = config.get('unet_kind', 'unet')
    if kind not in ('unet', 'stacked'):
      raise ValueError(f"model.unet_kind {kind!r} is unknown; use 'unet' or 'stacked'")
    pipe = cls._single_unet_pipeline(config, seed, workdir)
    if kind == 'unet':
      return pipe
    stacked = StackedUNetConfig(pipe.unet.config, **config.stacked.to_dict())
    return dataclasses.replace(
        pipe, unet=StackedUNet(stacked, dtype=pipe.unet.dtype, remat_blocks=config.remat),
        unet_params=init_from_unet(pipe.unet_params, stacked))

  @classmethod
  def _single_unet_pipeline(cls, config, seed: int, workdir: str) -> 'Pipeline':
    compute_dtype = jnp.dtype(config.compute_dtype)
    if config.source == 'diffusers':
      if not config.diffusers_path:
        raise ValueError('model.diffusers_path is empty: give the diffusers folder, e.g. '
                         '--config=configs/sd15_rf.py:/path/to/stable-diffusion-v1-5')
      pipe = cls.from_diffusers(config.diffusers_path)
      unet = UNet2DConditionModel(pipe.unet.config, dtype=compute_dtype, remat_blocks=config.remat)
      return dataclasses.replace(pipe, unet=unet)
    if config.source != 'embedded':
      raise ValueError(f"model.source {config.source!r} is unknown; use 'embedded' or 'diffusers'")
    if config.autoencoder != 'identity':
      raise ValueError(f"model.autoencoder {config.autoencoder!r}: the embedded model is pixel "
                       "space; use 'identity'")
    text = load_text_side(workdir, config)
    unet = UNet2DConditionModel(UNetConfig.from_diffusers_config(config.unet.to_dict()),
                                dtype=compute_dtype, remat_blocks=config.remat)
    vae = IdentityAutoencoder(IdentityConfig(channels=unet.config.in_channels))
    return cls(unet=unet, unet_params=init_params(unet, seed), vae=vae, vae_params={},
               text_encoder=text.encoder, text_encoder_params=text.params,
               tokenizer=text.tokenizer)

  @classmethod
  def from_checkpoint(cls, trained: 'TrainedParams') -> 'Pipeline':
    """The model that a stage's config.json describes, with the text side of its run and
    the stage's trained U-Net params (`trained` comes from find_trained_params)."""
    pipe = cls.from_config(trained.model_config(), workdir=trained.workdir)
    return dataclasses.replace(pipe, unet_params=trained.load(
        checkpoint.abstract_like(pipe.unet_params)))

  @property
  def vae_scale_factor(self) -> int:
    return self.vae.config.downsample_factor

  @property
  def default_size(self) -> int:
    """The image side the U-Net was configured for (config.sample_size latents)."""
    sample_size = self.unet.config.sample_size
    if not isinstance(sample_size, int):
      raise ValueError(f'the U-Net config gives no single sample_size ({sample_size!r}); '
                       'pass height and width')
    return sample_size * self.vae_scale_factor

  @property
  def latent_shape(self) -> tuple:
    """(height, width, channels) of the U-Net's input at the default size."""
    size = self.default_size // self.vae_scale_factor
    return (size, size, self.unet.config.in_channels)

  def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
    """Token ids padded (and truncated) to the tokenizer's max length, as the pipeline does."""
    return tokenize(self.tokenizer, prompts)

  def initial_latents(self, batch: int, height: int, width: int, seed: int) -> jax.Array:
    """N(0, I) noise, NHWC, at latent resolution (no sigma scaling for a flow)."""
    shape = (batch, height // self.vae_scale_factor, width // self.vae_scale_factor,
             self.unet.config.in_channels)
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)

  def generate(self, prompts: Prompts, num_inference_steps: int = 1,
               guidance_scale: float = 0.0, negative_prompts: Optional[Prompts] = None,
               seed: int = 0, latents: Optional[np.ndarray] = None,
               height: Optional[int] = None, width: Optional[int] = None) -> np.ndarray:
    """Images float32 [B, H, W, 3] in [0, 1] (diffusers' output_type='np').

    `latents`, when given, is the NHWC float32 initial noise; otherwise it is drawn from
    `seed`. Guidance is used only when guidance_scale > 1, with the negative prompts (or
    the empty prompt) as the unconditional branch.
    """
    prompts = _as_list(prompts)
    if latents is None:
      latents = self.initial_latents(len(prompts), height or self.default_size,
                                     width or self.default_size, seed)
    latents = jnp.asarray(latents, jnp.float32)
    if latents.shape[0] != len(prompts):
      raise ValueError(f'latents have batch {latents.shape[0]} but there are {len(prompts)} prompts')
    guided = rectified_flow.uses_guidance(guidance_scale)
    uncond_ids = None
    if guided:
      negative = [''] * len(prompts) if negative_prompts is None else _as_list(negative_prompts)
      if len(negative) == 1 and len(prompts) > 1:
        negative = negative * len(prompts)
      if len(negative) != len(prompts):
        raise ValueError(f'{len(negative)} negative prompts for {len(prompts)} prompts')
      uncond_ids = self.tokenize(negative)
    images, _ = sample_images(self.modules, self.params, self.tokenize(prompts), uncond_ids,
                              latents, jnp.float32(guidance_scale),
                              samplers.Solver('euler', num_inference_steps))
    return np.asarray(images, np.float32)

  @property
  def modules(self) -> "PipelineModules":
    return PipelineModules(self.unet, self.vae, self.text_encoder)

  @property
  def params(self) -> dict:
    """All params, keyed as encode_text, encode_images and decode_to_images expect."""
    return {'unet': self.unet_params, 'vae': self.vae_params, 'text': self.text_encoder_params}

  def save_diffusers(self, path: str) -> None:
    """Writes a diffusers folder that diffusers/transformers `from_pretrained` load."""
    os.makedirs(path, exist_ok=True)
    diffusers_io.save_component(path, 'unet', self.unet.config, self.unet_params)
    diffusers_io.save_component(path, 'vae', self.vae.config, self.vae_params)
    diffusers_io.save_component(path, 'text_encoder', self.text_encoder.config,
                                self.text_encoder_params)
    self.tokenizer.save_pretrained(os.path.join(path, 'tokenizer'))
    base = diffusers_io.read_model_index(self.source) if self.source else None
    for name, entry in (base or {}).items():
      converted = name in diffusers_io.COMPONENTS or name == 'tokenizer'
      if (not converted and isinstance(entry, list) and entry[0] is not None
          and os.path.isdir(os.path.join(self.source, name))):
        diffusers_io.copy_component(self.source, path, name)
    components = {name: (spec.library, spec.class_name)
                  for name, spec in diffusers_io.COMPONENTS.items()}
    components['tokenizer'] = ('transformers', 'CLIPTokenizer')
    diffusers_io.write_json(os.path.join(path, diffusers_io.MODEL_INDEX),
                            diffusers_io.model_index_for(components, base))


@dataclasses.dataclass(frozen=True)
class TrainedParams:
  """Where the U-Net params of one of our training stages are, and its config.json."""
  config_path: str
  params_path: str  # a final params/ directory, or a checkpoints/STEP directory
  state_key: str = ''  # for checkpoints/STEP: 'ema_params' or 'params' of the train state

  def model_config(self) -> ml_collections.ConfigDict:
    """The `model` section of the stage's config.json: what Pipeline.from_config builds."""
    config = diffusers_io.read_json(self.config_path)
    if not isinstance(config.get('model'), dict):
      raise ValueError(f'{self.config_path}: no model section; not the config.json of a stage')
    return ml_collections.ConfigDict(config['model'])

  @property
  def workdir(self) -> str:
    """The run the stage belongs to (its text side is there)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(self.config_path)))

  def load(self, abstract_params):
    if not self.state_key:
      return checkpoint.load_params(self.params_path, abstract_params)
    return _train_state_params(self.params_path, self.state_key, abstract_params)


def find_trained_params(path: str, stage: str = '', params: str = 'ema') -> TrainedParams:
  """Finds (without loading anything) the params of one of our training stages.

  path: a workdir (its stage `stage`, or else its latest finished stage of TRAINED_STAGES),
  a stage directory or its final params/ (the EMA params), or one of its checkpoints/STEP
  directories (the EMA params, or the raw ones with params='raw').
  """
  from instaflow_jax.training import loop  # imports clu and TensorFlow: only when needed
  if params not in ('ema', 'raw'):
    raise ValueError(f"params={params!r}: use 'ema' or 'raw'")
  if stage and stage not in TRAINED_STAGES:
    raise ValueError(f'stage {stage!r} has no U-Net params; use one of {TRAINED_STAGES}')
  path = os.path.abspath(os.path.join(path, stage))
  if not os.path.isdir(path):
    raise checkpoint.CheckpointError(f'{path}: directory not found')
  if any(os.path.isfile(os.path.join(path, s, STAGE_CONFIG)) for s in TRAINED_STAGES):
    path = _latest_finished_stage(path, loop)
  if os.path.isfile(os.path.join(path, STAGE_CONFIG)):
    stage_dir, path = path, os.path.join(path, loop.FINAL_PARAMS)
    if not os.path.isdir(path):
      raise checkpoint.CheckpointError(
          f'{stage_dir}: no final params ({loop.FINAL_PARAMS}/): the stage has not finished; '
          'give one of its checkpoints/STEP directories')
  elif os.path.isdir(os.path.join(path, checkpoint.STATE_ITEM)):  # <stage>/checkpoints/STEP
    return TrainedParams(os.path.join(os.path.dirname(os.path.dirname(path)), STAGE_CONFIG),
                         path, 'ema_params' if params == 'ema' else 'params')
  elif os.path.basename(path) == loop.FINAL_PARAMS:
    stage_dir = os.path.dirname(path)
  else:
    raise ValueError(f'{path}: neither a diffusers folder ({diffusers_io.MODEL_INDEX}) nor a '
                     'workdir, stage directory, params/ or checkpoints/STEP directory of ours')
  if params == 'raw':
    raise ValueError(f'{path}: final params are the EMA params; for the raw ones give a '
                     'checkpoints/STEP directory')
  return TrainedParams(os.path.join(stage_dir, STAGE_CONFIG), path)


def _latest_finished_stage(workdir: str, loop) -> str:
  for stage in TRAINED_STAGES:
    stage_dir = os.path.join(workdir, stage)
    if loop.is_complete(stage_dir) and os.path.isdir(os.path.join(stage_dir, loop.FINAL_PARAMS)):
      return stage_dir
  raise checkpoint.CheckpointError(f'{workdir}: no finished stage with params '
                                   f'(looked for {", ".join(TRAINED_STAGES)})')


def _train_state_params(step_dir: str, key: str, abstract_params):
  """The params `key` of a train state that Checkpointer saved, read alone (the
  optimizer state stays on disk), with the model's parameter names and shapes."""
  handler = ocp.PyTreeCheckpointHandler()
  state_dir = epath.Path(step_dir) / checkpoint.STATE_ITEM
  mismatch = checkpoint.first_mismatch(handler.metadata(state_dir).tree.get(key),
                                       abstract_params)
  if mismatch:
    raise checkpoint.CheckpointError(f'{step_dir}: its {key} do not fit the model config: '
                                     f'{mismatch}')
  target = {key: abstract_params}
  try:
    restored = handler.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
  except ValueError as e:
    raise checkpoint.CheckpointError(f'{step_dir}: does not fit the model config: '
                                     f'{str(e).splitlines()[0]}') from None
  return restored[key]


def base_unet(unet):
  """The single U-Net a model is built from: itself, or a stack's (the teacher's model)."""
  return unet.base_unet() if isinstance(unet, StackedUNet) else unet


def init_params(module, seed: int):
  """Freshly initialised float params of a module (logical-axis boxes removed).

  Jitted: running init op by op takes tens of seconds for a U-Net on a CPU. Compiled at
  the backend's lowest optimisation level: it runs once, and hundreds of random draws
  (one per param) compile 1.7x faster so (a small U-Net on a CPU: 20 -> 12 s)."""
  init = jax.jit(module.init, compiler_options={'xla_backend_optimization_level': 0})
  variables = init(jax.random.key(seed), *module.example_inputs())
  return nn.meta.unbox(variables)['params']


TEXT_DIR = 'text'  # WORKDIR/text: tokenizer/ (word_tokenizer.json) and text_encoder/


@dataclasses.dataclass(frozen=True)
class TextSide:
  """The embedded model's word tokenizer and frozen CLIP text encoder (module, params)."""
  tokenizer: WordTokenizer
  encoder: CLIPTextModel
  params: Any


def store_text_side(config: ml_collections.ConfigDict, workdir: str) -> bool:
  """Makes the embedded model's text side (make_text_side) and stores it in WORKDIR/text,
  once, before a run's first stage, so that every later use reads what training used
  whatever the data, the config or this code's defaults become.

  Nothing to do for a diffusers model (its folder holds its text side), for a workdir that
  has one, or for a run begun before text sides were stored (it keeps legacy_text_side).
  Returns whether it stored one.
  """
  if config.model.source != 'embedded':
    return False
  path = os.path.join(workdir, TEXT_DIR)
  missing = not os.path.isdir(path) and not workdir_lib.has_begun_stages(workdir)
  parallel.sync('text side: looked')  # by every process, before process 0 writes it
  if not missing:
    return False
  # Made by every process (the same): reading the data is a step they take together.
  text = make_text_side(config)
  if jax.process_index() == 0:
    _write_text_side(path, text)
    logging.info('text side: %d words and a text encoder from model.text_seed=%d, stored in '
                 '%s', len(text.tokenizer.words), config.model.text_seed, path)
  parallel.sync('text side: stored')
  return True


def remove_text_side(workdir: str) -> None:
  if jax.process_index() == 0:
    shutil.rmtree(os.path.join(workdir, TEXT_DIR))


def _write_text_side(path: str, text: TextSide) -> None:
  """Writes beside `path`, then renames: a crash leaves no half-written text side for a
  later run to trust."""
  staging = tempfile.mkdtemp(prefix=f'.{TEXT_DIR}.tmp-', dir=os.path.dirname(path))
  try:
    text.tokenizer.save_pretrained(os.path.join(staging, TEXT_DIR, 'tokenizer'))
    diffusers_io.save_component(os.path.join(staging, TEXT_DIR), 'text_encoder',
                                text.encoder.config, text.params)
    os.rename(os.path.join(staging, TEXT_DIR), path)
  finally:
    shutil.rmtree(staging)


def load_text_side(workdir: str, model_config: ml_collections.ConfigDict) -> TextSide:
  """The text side that the run in `workdir` stored (store_text_side); legacy_text_side
  for a run begun before text sides were stored."""
  if not workdir:
    raise ValueError("model.source='embedded': its text side is stored with its run; give "
                     'the workdir')
  path = os.path.join(workdir, TEXT_DIR)
  if not os.path.isdir(path):
    logging.warning('%s has no %s/: a run from before text sides were stored; using the '
                    'captioned-shapes vocabulary and a text encoder from model.text_seed=%d, '
                    'as it did', workdir, TEXT_DIR, model_config.text_seed)
    return legacy_text_side(model_config)
  _, encoder, params = diffusers_io.load_component(path, 'text_encoder')
  return TextSide(WordTokenizer.from_pretrained(os.path.join(path, 'tokenizer')), encoder,
                  params)


def make_text_side(config: ml_collections.ConfigDict) -> TextSide:
  """A new text side: the tokenizer of new_tokenizer and a text encoder with random
  weights from model.text_seed."""
  return _with_random_encoder(new_tokenizer(config), config.model)


def new_tokenizer(config: ml_collections.ConfigDict) -> WordTokenizer:
  """The words of the file model.vocabulary (one a line, or a word_tokenizer.json) or, when
  it is '', every word of the training captions (config.data's train_split), sorted."""
  model = config.model
  if model.get('vocabulary'):
    return WordTokenizer.from_vocabulary_file(model.vocabulary, model.max_length)
  from instaflow_jax.data import input as input_lib  # imports tfds and TensorFlow
  captions = input_lib.all_captions(input_lib.input_config(config.data, config.data.train_split))
  return WordTokenizer.from_captions(captions, model.max_length)


def legacy_text_side(model_config: ml_collections.ConfigDict) -> TextSide:
  """The text side of a run begun before text sides were stored, rebuilt as it was then
  at every use: the captioned-shapes vocabulary and model.text_seed's random encoder."""
  return _with_random_encoder(WordTokenizer.for_shapes(model_config.max_length), model_config)


def _with_random_encoder(tokenizer: WordTokenizer, model_config) -> TextSide:
  encoder = CLIPTextModel(CLIPTextConfig(
      vocab_size=len(tokenizer), max_position_embeddings=model_config.max_length,
      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id, projection_dim=None, **model_config.text_encoder))
  return TextSide(tokenizer, encoder, init_params(encoder, model_config.text_seed))


def load_tokenizer(path: str):
  """The CLIP tokenizer saved in a pipeline folder."""
  from transformers import CLIPTokenizer
  if not os.path.isdir(path):
    raise diffusers_io.ConversionError(f'{path}: no tokenizer folder')
  return CLIPTokenizer.from_pretrained(path)


@dataclasses.dataclass(frozen=True)
class PipelineModules:
  """The (hashable) modules, a static argument of the jitted sampler."""
  unet: Any
  vae: Any
  text_encoder: Any


def encode_images(modules: PipelineModules, params, images: jax.Array, rng: jax.Array) -> jax.Array:
  """Images in [-1, 1] -> scaled latents, a sample of the autoencoder's posterior."""
  mean, logvar = modules.vae.apply({'params': params['vae']}, images, method='encode')
  noise = jax.random.normal(rng, mean.shape, mean.dtype)
  return (mean + jnp.exp(0.5 * logvar) * noise) * modules.vae.config.scaling_factor


def encode_text(modules: PipelineModules, params, token_ids: jax.Array) -> jax.Array:
  """The text encoder's last hidden state, which conditions the U-Net."""
  return modules.text_encoder.apply({'params': params['text']}, token_ids)[0]


def decode_to_images(modules: PipelineModules, params, latents: jax.Array) -> jax.Array:
  """decode(latents / scaling_factor) mapped from [-1, 1] to [0, 1]."""
  latents = latents / modules.vae.config.scaling_factor
  images = modules.vae.apply({'params': params['vae']}, latents, method='decode')
  return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


@functools.partial(jax.jit, static_argnums=(0, 6))
def sample_latents(modules: PipelineModules, params, token_ids, uncond_ids, latents,
                   guidance_scale, solver: samplers.Solver):
  """Integrates the text-conditioned flow from the noise `latents`: a samplers.Solution
  (X1 latents, NFE, straightness).

  With `uncond_ids` (the negative or empty prompts), classifier-free guidance with
  `guidance_scale` is applied; without, the text branch alone.
  """
  text_embeds = encode_text(modules, params, token_ids)
  uncond_embeds = None if uncond_ids is None else encode_text(modules, params, uncond_ids)

  def apply_unet(x, t, embeds):
    return modules.unet.apply({'params': params['unet']}, x, t, embeds)

  velocity = samplers.conditional_velocity(apply_unet, text_embeds, uncond_embeds, guidance_scale)
  return samplers.integrate(velocity, latents, solver)


@functools.partial(jax.jit, static_argnums=(0, 6))
def sample_images(modules: PipelineModules, params, token_ids, uncond_ids, latents,
                  guidance_scale, solver: samplers.Solver):
  """sample_latents, decoded to images in [0, 1]: (images, its samplers.Solution)."""
  solution = sample_latents(modules, params, token_ids, uncond_ids, latents, guidance_scale,
                            solver)
  return decode_to_images(modules, params, solution.x1), solution
