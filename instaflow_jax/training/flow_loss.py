"""The flow-matching loss of rectified-flow and reflow training: the U-Net regresses the
velocity X1 - X0 at x_s = s*X1 + (1-s)*X0, time input 1000*(1-s), with X0 drawn
independently of the data X1 (rf) or given by the batch as the teacher's coupled noise
(reflow). The text encoder and the autoencoder are frozen: they run inside the step unless
the batch carries 'latents' and 'text_embeds' already computed."""
import functools

import jax
import jax.numpy as jnp
import ml_collections

from instaflow_jax import sampling
from instaflow_jax.flow import rectified_flow


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


def flow_matching_loss(modules: sampling.PipelineModules, config: ml_collections.ConfigDict):
  """loss_fn(params, frozen, batch, rng, step) for rectified-flow (and reflow) training.

  At the steps the loop logs (every log_every, and the last), its metrics include
  text_use (two more forward passes, without gradient); zeros at the other steps."""
  time_config = config.time

  def loss_fn(params, frozen, batch, rng, step):
    latent_rng, drop_rng, noise_rng, time_rng = jax.random.split(rng, 4)
    x1, text_embeds = sampling.model_inputs(modules, frozen, batch, latent_rng)
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
