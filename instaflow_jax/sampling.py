"""The jitted text-to-image sampler, and the frozen networks' parts of it.

Everything after tokenization (text encoder, the ODE solve of the flow or of the diffusion
model's probability-flow ODE, with optional classifier-free guidance, the VAE decoder, the
conversion to [0, 1]) is one jitted function, compiled once per (modules, batch, size,
solver, guidance on/off).
"""
import dataclasses
import time
from typing import Any, Callable, Sequence, Tuple, Union

import jax
import jax.numpy as jnp

from instaflow_jax import images as image_io
from instaflow_jax.flow import diffusion
from instaflow_jax.flow import samplers
from instaflow_jax.models import formulations

# A flow's solver (Euler, Dopri5) or a diffusion model's (DPM-Solver++, DDIM).
AnySolver = Union[samplers.Solver, diffusion.DiffusionSolver]


@dataclasses.dataclass(frozen=True)
class PipelineModules:
  """The (hashable) modules, a static argument of the jitted sampler."""
  unet: Any
  vae: Any
  text_encoder: Any


def encode_posterior(modules: PipelineModules, params, images: jax.Array):
  """Images in [-1, 1] -> (mean, std) of the autoencoder's latent Gaussian, unscaled."""
  mean, logvar = modules.vae.apply({'params': params['vae']}, images, method='encode')
  return mean, jnp.exp(0.5 * logvar)


def sample_posterior(modules: PipelineModules, mean: jax.Array, std: jax.Array,
                     rng: jax.Array) -> jax.Array:
  """Scaled latents: a sample of the latent Gaussian (mean, std)."""
  noise = jax.random.normal(rng, mean.shape, mean.dtype)
  return (mean + std * noise) * modules.vae.config.scaling_factor


def encode_images(modules: PipelineModules, params, images: jax.Array, rng: jax.Array) -> jax.Array:
  """Images in [-1, 1] -> scaled latents, a sample of the autoencoder's posterior."""
  return sample_posterior(modules, *encode_posterior(modules, params, images), rng)


@formulations.jit(static_argnums=0)
def encode_to_latents(modules: PipelineModules, params, images: jax.Array) -> jax.Array:
  """Images in [0, 1] -> scaled latents, the autoencoder's posterior mean (deterministic,
  for inversion and image to image)."""
  mean, _ = modules.vae.apply({'params': params['vae']}, images * 2.0 - 1.0, method='encode')
  return mean.astype(jnp.float32) * modules.vae.config.scaling_factor


def encode_text(modules: PipelineModules, params, token_ids: jax.Array) -> jax.Array:
  """The text encoder's last hidden state, which conditions the U-Net."""
  return modules.text_encoder.apply({'params': params['text']}, token_ids)[0]


def decode_to_images(modules: PipelineModules, params, latents: jax.Array) -> jax.Array:
  """decode(latents / scaling_factor) mapped from [-1, 1] to [0, 1]."""
  latents = latents / modules.vae.config.scaling_factor
  images = modules.vae.apply({'params': params['vae']}, latents, method='decode')
  return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


def text_embeddings(modules: PipelineModules, frozen, batch):
  """The text embeddings of a batch, computed unless cached in it."""
  if 'text_embeds' in batch:
    return batch['text_embeds']
  return encode_text(modules, frozen, batch['input_ids'])


def model_inputs(modules: PipelineModules, frozen, batch, rng):
  """(X1 latents, text embeddings) of a batch, computed unless cached in it: the latents
  themselves, or their distribution (the encode stage's mean and std), sampled here."""
  if 'latents' in batch:
    x1 = batch['latents']
  elif 'latent_mean' in batch:
    x1 = sample_posterior(modules, batch['latent_mean'], batch['latent_std'], rng)
  else:
    x1 = encode_images(modules, frozen, image_io.to_model_range(batch['image']), rng)
  return x1, text_embeddings(modules, frozen, batch)


@formulations.jit(static_argnums=(0, 6))
def sample_latents(modules: PipelineModules, params, token_ids, uncond_ids, latents,
                   guidance_scale, solver: AnySolver):
  """Solves the text-conditioned flow (a samplers.Solver) or diffusion model's ODE (a
  diffusion.DiffusionSolver) from the noise `latents`: a samplers.Solution (final
  latents, NFE, straightness).

  With `uncond_ids` (the negative or empty prompts), classifier-free guidance with
  `guidance_scale` is applied; without, the text branch alone.
  """
  text_embeds = encode_text(modules, params, token_ids)
  uncond_embeds = None if uncond_ids is None else encode_text(modules, params, uncond_ids)

  def apply_unet(x, t, embeds):
    return modules.unet.apply({'params': params['unet']}, x, t, embeds)

  if isinstance(solver, diffusion.DiffusionSolver):
    network = samplers.guided_network(apply_unet, text_embeds, uncond_embeds, guidance_scale)
    return diffusion.integrate(network, latents, solver)
  velocity = samplers.conditional_velocity(apply_unet, text_embeds, uncond_embeds, guidance_scale)
  return samplers.integrate(velocity, latents, solver)


@formulations.jit(static_argnums=(0, 6))
def sample_images(modules: PipelineModules, params, token_ids, uncond_ids, latents,
                  guidance_scale, solver: AnySolver):
  """sample_latents, decoded to images in [0, 1]: (images, its samplers.Solution)."""
  solution = sample_latents(modules, params, token_ids, uncond_ids, latents, guidance_scale,
                            solver)
  return decode_to_images(modules, params, solution.x1), solution


@dataclasses.dataclass(frozen=True)
class Timing:
  compile_s: float    # the first call minus a compiled one
  per_image_s: float  # compiled calls, per image (a batch's padding included in its cost)


def timed_batches(calls: Sequence[Callable[[], Any]], counts: Sequence[int],
                  progress: Callable[[int], None] = lambda done: None) -> Tuple[list, Timing]:
  """(the results of calls, Timing). Each call generates one batch of counts[i] images and
  returns host arrays, so its time includes the device's work. The first call compiles:
  the time per image comes from the others, or, when there is only one, from running it a
  second time. progress(i) is called after call i."""
  results, seconds = [], []
  for index, call in enumerate(calls):
    began = time.perf_counter()
    results.append(call())
    seconds.append(time.perf_counter() - began)
    progress(index)
  if len(calls) == 1:
    began = time.perf_counter()
    calls[0]()
    timed, timed_counts = [time.perf_counter() - began], counts
  else:
    timed, timed_counts = seconds[1:], counts[1:]
  per_image = sum(timed) / sum(timed_counts)
  return results, Timing(compile_s=max(seconds[0] - per_image * counts[0], 0.0),
                         per_image_s=per_image)
