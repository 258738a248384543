"""Text-to-image with a rectified flow, as the released InstaFlow pipeline does it, or
with a diffusion model (Stable Diffusion), as diffusers' StableDiffusionPipeline does it.

    pipe = Pipeline.from_diffusers('path/to/instaflow-0.9b')
    images = pipe.generate(['a photo of a cat'], num_inference_steps=1)   # [B, H, W, 3] in [0, 1]
    sd = Pipeline.from_diffusers('path/to/stable-diffusion-v1-5')        # kind 'diffusion'
    latents = sd.generate(['a photo of a cat'], num_inference_steps=25, guidance_scale=5.0,
                          output_type='latent')                           # DPM-Solver++ 2M

A Pipeline holds the three networks and their params, the tokenizer, and its kind: a
'flow' (a velocity network, solved with Euler) or a 'diffusion' model (with the noise
schedule of its folder's scheduler config, solved with DPM-Solver++ or DDIM). It is built
from a diffusers folder, from a training config's `model` section, or from the trained
params of one of our runs (workdir.find_trained_params); those of our configs and runs
are flows. Prompts are tokenized on the host; sampling.py's jitted sampler does the rest.
"""
import dataclasses
import os
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from instaflow_jax import checkpoint
from instaflow_jax import sampling
from instaflow_jax import text_side
from instaflow_jax import trained_unet
from instaflow_jax import workdir as workdir_lib
from instaflow_jax.convert import diffusers as diffusers_io
from instaflow_jax.convert import lora_files
from instaflow_jax.data.tokenizer import tokenize
from instaflow_jax.flow import diffusion
from instaflow_jax.flow import rectified_flow
from instaflow_jax.flow import samplers
from instaflow_jax.models import abstract
from instaflow_jax.models import lora as lora_lib
from instaflow_jax.models.pixel_space import IdentityAutoencoder
from instaflow_jax.models.pixel_space import IdentityConfig
from instaflow_jax.models.stacked_unet import StackedUNet
from instaflow_jax.models.stacked_unet import StackedUNetConfig
from instaflow_jax.models.stacked_unet import init_from_unet
from instaflow_jax.models.unet import UNet2DConditionModel
from instaflow_jax.models.unet import UNetConfig

Prompts = Union[str, Sequence[str]]

ModelSource = Union[str, workdir_lib.TrainedParams]  # a diffusers folder, or ours

# The samplers of each kind of model, its default first.
SAMPLERS = {'flow': ('euler',), 'diffusion': diffusion.SAMPLERS}
# model_index.json's _class_name of a diffusion model; a flow's names a rectified flow.
DIFFUSION_PIPELINE_CLASSES = ('StableDiffusionPipeline',)
FLOW_PIPELINE_MARKERS = ('RectifiedFlow', 'InstaFlow')
# What save_diffusers writes as a flow's class name (the released InstaFlow pipeline's).
FLOW_PIPELINE_CLASS = 'RectifiedFlowPipeline'


def _as_list(prompts: Prompts) -> list:
  return [prompts] if isinstance(prompts, str) else list(prompts)


def _remat_policy(model_config) -> str:
  """model.remat_policy; 'none' for the configs of runs made before the field (inference
  recomputes nothing anyway)."""
  return model_config.get('remat_policy', 'none')


def sampler_of(kind: str, sampler: Optional[str]) -> str:
  """`sampler`, or the default of this kind of model when None; a misfit is a ValueError."""
  choices = SAMPLERS[kind]
  sampler = sampler or choices[0]
  if sampler not in choices:
    raise ValueError(f'sampler {sampler!r} does not fit a {kind} model; use one of '
                     + ', '.join(repr(c) for c in choices) + f' (default {choices[0]!r})')
  return sampler


def folder_kind(path: str, model_index: dict, kind: Optional[str] = None) -> str:
  """'flow' or 'diffusion': `kind` when given, else what the folder's class name says."""
  if kind is not None:
    if kind not in SAMPLERS:
      raise ValueError(f"kind {kind!r} is unknown; use 'flow' or 'diffusion' instead")
    return kind
  class_name = str(model_index.get('_class_name', ''))
  if class_name in DIFFUSION_PIPELINE_CLASSES:
    return 'diffusion'
  if any(marker in class_name for marker in FLOW_PIPELINE_MARKERS):
    return 'flow'
  raise ValueError(f'{path}: model_index.json names the class {class_name!r}, neither a '
                   "flow nor a diffusion model; pass kind ('flow' or 'diffusion')")


@dataclasses.dataclass
class Pipeline:
  """The three networks of a text-to-image model, their params, the tokenizer, and the
  kind of model: 'flow', or 'diffusion' with its noise schedule."""
  unet: Any
  unet_params: Any
  vae: Any
  vae_params: Any
  text_encoder: Any
  text_encoder_params: Any
  tokenizer: Any
  source: Optional[str] = None  # the diffusers folder it came from, for export of extras
  kind: str = 'flow'
  noise_schedule: Optional[diffusion.NoiseSchedule] = None  # of a diffusion model

  @classmethod
  def from_diffusers(cls, path: str, kind: Optional[str] = None,
                     dtype=jnp.float32) -> 'Pipeline':
    """Loads a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
    and for a diffusion model scheduler/scheduler_config.json). `kind` ('flow' or
    'diffusion') overrides what model_index.json's class name says."""
    kind = folder_kind(path, diffusers_io.read_model_index(path), kind)
    schedule = diffusion.read_noise_schedule(path) if kind == 'diffusion' else None
    parts = {name: diffusers_io.load_component(path, name, dtype)
             for name in ('unet', 'vae', 'text_encoder')}
    return cls(unet=parts['unet'][1], unet_params=parts['unet'][2],
               vae=parts['vae'][1], vae_params=parts['vae'][2],
               text_encoder=parts['text_encoder'][1],
               text_encoder_params=parts['text_encoder'][2],
               tokenizer=load_tokenizer(os.path.join(path, 'tokenizer')), source=path,
               kind=kind, noise_schedule=schedule)

  @classmethod
  def from_config(cls, config, seed: int = 0, workdir: str = '') -> 'Pipeline':
    """The pipeline a training config's `model` section describes.

    source='diffusers': everything from the folder `diffusers_path`.
    source='embedded': the text side that the run in `workdir` stored (a word tokenizer
    and a small CLIP text encoder, random or as its stage rf trained it; see
    text_side.py), pixel space (identity autoencoder), and a freshly initialised U-Net
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
        pipe, unet=StackedUNet(stacked, dtype=pipe.unet.dtype, remat_policy=_remat_policy(config)),
        unet_params=init_from_unet(pipe.unet_params, stacked))

  @classmethod
  def _single_unet_pipeline(cls, config, seed: int, workdir: str) -> 'Pipeline':
    compute_dtype = jnp.dtype(config.compute_dtype)
    if config.source == 'diffusers':
      if not config.diffusers_path:
        raise ValueError('model.diffusers_path is empty: give the diffusers folder, e.g. '
                         '--config=configs/sd15_rf.py:/path/to/stable-diffusion-v1-5')
      pipe = cls.from_diffusers(config.diffusers_path, kind='flow')  # what we train is a flow
      unet = UNet2DConditionModel(pipe.unet.config, dtype=compute_dtype,
                                  remat_policy=_remat_policy(config))
      return dataclasses.replace(pipe, unet=unet)
    if config.source != 'embedded':
      raise ValueError(f"model.source {config.source!r} is unknown; use 'embedded' or 'diffusers'")
    if config.autoencoder != 'identity':
      raise ValueError(f"model.autoencoder {config.autoencoder!r}: the embedded model is pixel "
                       "space; use 'identity'")
    text = text_side.load_text_side(workdir, config)
    unet = UNet2DConditionModel(UNetConfig.from_diffusers_config(config.unet.to_dict()),
                                dtype=compute_dtype, remat_policy=_remat_policy(config))
    vae = IdentityAutoencoder(IdentityConfig(channels=unet.config.in_channels))
    return cls(unet=unet, unet_params=abstract.init_params(unet, seed), vae=vae, vae_params={},
               text_encoder=text.encoder, text_encoder_params=text.params,
               tokenizer=text.tokenizer)

  @classmethod
  def for_training(cls, config, seed: int, workdir: str) -> 'Pipeline':
    """from_config's model with the frozen networks in the compute dtype (frozen_in)."""
    return cls.from_config(config, seed, workdir).frozen_in(jnp.dtype(config.compute_dtype))

  @classmethod
  def from_checkpoint(cls, trained: workdir_lib.TrainedParams) -> 'Pipeline':
    """The model that a stage's config.json describes, with the text side of its run and
    the stage's trained U-Net params (`trained` comes from workdir.find_trained_params;
    a LoRA stage's LoRA comes merged, see trained_unet.py)."""
    pipe = cls.from_config(trained.model_config(), seed=trained.stage_config().get('seed', 0),
                           workdir=trained.workdir)
    return dataclasses.replace(pipe, unet_params=trained_unet.load(
        trained, checkpoint.abstract_like(pipe.unet_params), pipe.unet_params))

  def with_lora(self, lora_path: str, scale: float = 1.0) -> 'Pipeline':
    """This pipeline with a LoRA file's deltas merged at `scale` into the U-Net, and into
    the text encoder where the file adapts it (diffusers' load_lora_weights and
    fuse_lora(lora_scale=scale)). The file's keys: diffusers' (peft) or kohya's
    (convert/lora_files.py); a layer that fits none of ours is a ConversionError."""
    trees = lora_files.read_lora(lora_path, {'unet': self.unet_params,
                                             'text_encoder': self.text_encoder_params})
    merged = lambda params, name: (lora_lib.merge(params, trees[name], scale)
                                   if name in trees else params)
    return dataclasses.replace(self, unet_params=merged(self.unet_params, 'unet'),
                               text_encoder_params=merged(self.text_encoder_params,
                                                          'text_encoder'))

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

  def solver(self, sampler: Optional[str], num_steps: int,
             start: float = 0.0, end: float = 1.0) -> sampling.AnySolver:
    """The solver of `sampler` (None: the kind's default) for this kind of model; a flow's
    integrates from s=start to end (0 to 1 unless inverting or starting from an image)."""
    sampler = sampler_of(self.kind, sampler)
    if self.kind == 'flow':
      return samplers.Solver(sampler, num_steps, start=start, end=end)
    if (start, end) != (0.0, 1.0):
      raise ValueError("inversion and image to image run a flow's ODE; this pipeline is a "
                       'diffusion model')
    return diffusion.DiffusionSolver(self.noise_schedule, sampler, num_steps)

  def _token_ids(self, prompts: list, guidance_scale: float,
                 negative_prompts: Optional[Prompts]):
    """(prompt ids, the unconditional branch's ids or None without guidance)."""
    if not rectified_flow.uses_guidance(guidance_scale):
      return self.tokenize(prompts), None
    negative = [''] * len(prompts) if negative_prompts is None else _as_list(negative_prompts)
    if len(negative) == 1 and len(prompts) > 1:
      negative = negative * len(prompts)
    if len(negative) != len(prompts):
      raise ValueError(f'{len(negative)} negative prompts for {len(prompts)} prompts')
    return self.tokenize(prompts), self.tokenize(negative)

  def _solve(self, prompts: list, latents, guidance_scale: float, negative_prompts,
             solver, decode: bool) -> np.ndarray:
    """The ODE solve from `latents` (batch checked against the prompts): the final latents,
    or their images."""
    latents = jnp.asarray(latents, jnp.float32)
    if latents.shape[0] != len(prompts):
      raise ValueError(f'latents have batch {latents.shape[0]} but there are {len(prompts)} '
                       'prompts')
    inputs = (self.modules, self.params, *self._token_ids(prompts, guidance_scale,
                                                          negative_prompts),
              latents, jnp.float32(guidance_scale), solver)
    if not decode:
      return np.asarray(sampling.sample_latents(*inputs).x1, np.float32)
    return np.asarray(sampling.sample_images(*inputs)[0], np.float32)

  def generate(self, prompts: Prompts, num_inference_steps: int = 1,
               guidance_scale: float = 0.0, negative_prompts: Optional[Prompts] = None,
               seed: int = 0, latents: Optional[np.ndarray] = None,
               height: Optional[int] = None, width: Optional[int] = None,
               sampler: Optional[str] = None, output_type: str = 'np',
               init_images: Optional[np.ndarray] = None, strength: float = 1.0) -> np.ndarray:
    """Images float32 [B, H, W, 3] in [0, 1] (diffusers' output_type='np'), or with
    output_type='latent' the final latents, NHWC float32, before decoding.

    `latents`, when given, is the NHWC float32 initial noise; otherwise it is drawn from
    `seed`. Guidance is used only when guidance_scale > 1, with the negative prompts (or
    the empty prompt) as the unconditional branch. `sampler`: 'euler' for a flow;
    'dpm_solver++' (the default) or 'ddim' for a diffusion model.

    Image to image (a flow): with `init_images` [B, H, W, 3] in [0, 1], the solve starts
    at s = 1 - strength from the point s * X1 + (1 - s) * noise of the flow's path, X1
    being the images' latents, and takes num_inference_steps steps to s = 1. strength 1
    ignores the images; near 0 it keeps them.
    """
    if output_type not in ('np', 'latent'):
      raise ValueError(f"output_type {output_type!r} is unknown; use 'np' or 'latent' instead")
    prompts = _as_list(prompts)
    if init_images is not None:
      height, width = np.shape(init_images)[1:3]
    if latents is None:
      latents = self.initial_latents(len(prompts), height or self.default_size,
                                     width or self.default_size, seed)
    start = 0.0
    if init_images is not None:
      if not 0.0 < strength <= 1.0:
        raise ValueError(f'strength {strength!r}: must be in (0, 1]')
      start = 1.0 - strength
      latents = rectified_flow.interpolate(jnp.asarray(latents, jnp.float32),
                                           self.encode(init_images), jnp.float32(start))
    return self._solve(prompts, latents, guidance_scale, negative_prompts,
                       self.solver(sampler, num_inference_steps, start=start),
                       decode=output_type == 'np')

  def encode(self, images: np.ndarray) -> jax.Array:
    """Images [B, H, W, 3] in [0, 1] -> their latents (the autoencoder's posterior mean,
    scaled), NHWC float32."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'images of shape {images.shape}: expected [batch, height, width, 3]')
    return sampling.encode_to_latents(self.modules, self.params, jnp.asarray(images))

  def invert(self, images: np.ndarray, prompts: Prompts, num_inference_steps: int = 1,
             guidance_scale: float = 0.0, negative_prompts: Optional[Prompts] = None
             ) -> np.ndarray:
    """The noise that the flow maps to `images` ([B, H, W, 3] in [0, 1]) under `prompts`:
    their latents carried back along the ODE from s=1 to 0 with num_inference_steps Euler
    steps (with guidance as generate's). NHWC float32; generate(prompts, latents=noise)
    with the same steps reconstructs the images, exactly so for a straight flow."""
    return self._solve(_as_list(prompts), self.encode(images), guidance_scale,
                       negative_prompts, self.solver(None, num_inference_steps, 1.0, 0.0),
                       decode=False)

  def edit(self, images: np.ndarray, source_prompts: Prompts, target_prompts: Prompts,
           num_inference_steps: int = 1, guidance_scale: float = 0.0) -> np.ndarray:
    """Images edited from what `source_prompts` describe to what `target_prompts` do: the
    images' noise under the source prompts (invert), generated from under the targets."""
    noise = self.invert(images, source_prompts, num_inference_steps, guidance_scale)
    return self.generate(target_prompts, num_inference_steps, guidance_scale, latents=noise)

  @property
  def modules(self) -> sampling.PipelineModules:
    return sampling.PipelineModules(self.unet, self.vae, self.text_encoder)

  def frozen_in(self, dtype) -> 'Pipeline':
    """This pipeline with its frozen networks (VAE, text encoder) computing in `dtype` and
    their params stored in it, as a training stage runs them: on an accelerator half the
    memory and the time of float32. The U-Net is unchanged."""
    return dataclasses.replace(
        self, vae=self.vae.clone(dtype=dtype, param_dtype=dtype),
        vae_params=abstract.cast_floats(self.vae_params, dtype),
        text_encoder=self.text_encoder.clone(dtype=dtype, param_dtype=dtype),
        text_encoder_params=abstract.cast_floats(self.text_encoder_params, dtype))

  @property
  def params(self) -> dict:
    """All params, keyed as encode_text, encode_images and decode_to_images expect."""
    return {'unet': self.unet_params, 'vae': self.vae_params, 'text': self.text_encoder_params}

  def save_diffusers(self, path: str) -> None:
    """Writes a diffusers folder that diffusers/transformers `from_pretrained` load. A
    flow is written as a RectifiedFlowPipeline; a diffusion model keeps its folder's
    class name and scheduler."""
    diffusers_io.save_pipeline(path, {'unet': (self.unet.config, self.unet_params),
                                      'vae': (self.vae.config, self.vae_params),
                                      'text_encoder': (self.text_encoder.config,
                                                       self.text_encoder_params)},
                               self.tokenizer, base=self.source,
                               class_name=FLOW_PIPELINE_CLASS if self.kind == 'flow' else None)


def load_tokenizer(path: str):
  """The CLIP tokenizer saved in a pipeline folder."""
  from transformers import CLIPTokenizer
  if not os.path.isdir(path):
    raise diffusers_io.ConversionError(f'{path}: no tokenizer folder')
  return CLIPTokenizer.from_pretrained(path)


def find_model(path: str, stage: str = '', params: str = 'ema') -> ModelSource:
  """What `path` holds, a diffusers folder or the params of one of our runs, checked
  without loading weights."""
  if diffusers_io.is_pipeline_folder(path):
    if stage or params != 'ema':
      raise ValueError(f'{path} is a diffusers folder: --stage and --params apply to our '
                       'checkpoints only')
    return path
  trained = workdir_lib.find_trained_params(path, stage, params)
  trained.model_config()  # a missing or broken config.json stops here, before any compute
  return trained


def source_kind(source: ModelSource) -> str:
  """The kind of model that find_model found, read without loading weights: a folder's
  from its class name, ours a flow."""
  if isinstance(source, str):
    return folder_kind(source, diffusers_io.read_model_index(source))
  return 'flow'


def load_pipeline(source: ModelSource) -> Pipeline:
  """The Pipeline of what find_model found."""
  if isinstance(source, str):
    return Pipeline.from_diffusers(source)
  return Pipeline.from_checkpoint(source)
