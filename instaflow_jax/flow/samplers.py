"""ODE samplers for a velocity field v(x, s), s from 0 (noise) to 1 (data)."""
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from instaflow_jax.flow import rectified_flow

# v(x, s): the velocity at state x and flow time s (a scalar).
VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]


def euler_sample(velocity_fn: VelocityFn, x0: jax.Array, num_steps: int) -> jax.Array:
  """Integrates dx/ds = v(x, s) from s=0 to 1 with N Euler steps: x += v(x, i/N) / N."""
  dt = 1.0 / num_steps

  def step(i, x):
    s = i.astype(jnp.float32) / num_steps
    return x + dt * velocity_fn(x, s).astype(x.dtype)

  return jax.lax.fori_loop(0, num_steps, step, x0)


def conditional_velocity(apply_fn: Callable, text_embeds: jax.Array,
                         uncond_embeds: Optional[jax.Array] = None,
                         guidance_scale=1.0) -> VelocityFn:
  """The velocity field of a text-conditioned network, with classifier-free guidance.

  `apply_fn(x, timesteps, embeds)` evaluates the network at its own time input.
  With `uncond_embeds` given, both branches run as one batch [uncond; text], as the
  released pipeline does, and are combined with `rectified_flow.guided_velocity`.
  """
  def velocity(x, s):
    batch = x.shape[0]
    if uncond_embeds is None:
      t = jnp.full((batch,), rectified_flow.network_time(s))
      return apply_fn(x, t, text_embeds)
    t = jnp.full((2 * batch,), rectified_flow.network_time(s))
    v = apply_fn(jnp.concatenate([x, x]), t, jnp.concatenate([uncond_embeds, text_embeds]))
    v_uncond, v_text = jnp.split(v, 2)
    return rectified_flow.guided_velocity(v_uncond, v_text, guidance_scale)

  return velocity
