"""ODE samplers for a velocity field v(x, s), s from 0 (noise) to 1 (data)."""
import dataclasses
from typing import Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from instaflow_jax.flow import rectified_flow

# v(x, s): the velocity at state x and flow time s (a scalar).
VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]


def euler_sample(velocity_fn: VelocityFn, x0: jax.Array, num_steps: int,
                 unroll: bool = False) -> jax.Array:
  """Integrates dx/ds = v(x, s) from s=0 to 1 with N Euler steps: x += v(x, i/N) / N.

  unroll=True writes the steps out instead of looping: for a solve that is
  differentiated (a distilled student's k steps), since XLA on a CPU runs the gradient of
  a U-Net inside a loop many times slower than unrolled.
  """
  return euler_with_straightness(velocity_fn, x0, num_steps, unroll)[0]


def euler_with_straightness(velocity_fn: VelocityFn, x0: jax.Array, num_steps: int,
                            unroll: bool = False, start: float = 0.0,
                            end: float = 1.0) -> Tuple[jax.Array, jax.Array]:
  """(x1, straightness per example) of the N-step Euler solution from s=start to s=end:
  x += v(x, s_i) (end - start) / N at s_i = start + (end - start) i / N. From 1 to 0 it
  runs the flow backwards, from an image to its noise (inversion).

  Straightness (Rectified Flow, Liu et al. 2022) is the mean over the steps of
  ||(X1 - X0) - v_i||^2, here averaged over the elements of x so that it does not grow
  with the image size; 0 for a straight path. For Euler X1 - X0 = mean_i v_i, so it is
  mean_i ||v_i||^2 - ||mean_i v_i||^2, accumulated along the way (XLA drops the sum
  where only x1 is used).
  """
  dt = (end - start) / num_steps
  per_example = lambda a: jnp.mean(jnp.square(a.astype(jnp.float32)),
                                   axis=tuple(range(1, a.ndim)))

  def step(i, carry):
    x, squares = carry
    s = start + (end - start) * i.astype(jnp.float32) / num_steps
    v = velocity_fn(x, s).astype(x.dtype)
    return x + dt * v, squares + per_example(v)

  carry = (x0, jnp.zeros((x0.shape[0],), jnp.float32))
  if unroll:
    for i in range(num_steps):
      carry = step(jnp.int32(i), carry)
    x1, squares = carry
  else:
    x1, squares = jax.lax.fori_loop(0, num_steps, step, carry)
  # A variance: clipped at 0 against rounding (one step gives exactly 0).
  return x1, jnp.maximum(squares / num_steps - per_example((x1 - x0) / (end - start)), 0.0)


def guided_network(apply_fn: Callable, text_embeds: jax.Array,
                   uncond_embeds: Optional[jax.Array] = None,
                   guidance_scale=1.0) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """A text-conditioned network at its own timesteps [batch], with classifier-free guidance.

  `apply_fn(x, timesteps, embeds)` evaluates the network. With `uncond_embeds` given, both
  branches run as one batch [uncond; text], as the released pipeline and diffusers'
  StableDiffusionPipeline do, and are combined with `rectified_flow.guided_velocity`
  (out = out_uncond + w * (out_text - out_uncond), whatever the network predicts).
  """
  def guided(x, t):
    if uncond_embeds is None:
      return apply_fn(x, t, text_embeds)
    out = apply_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                   jnp.concatenate([uncond_embeds, text_embeds]))
    out_uncond, out_text = jnp.split(out, 2)
    return rectified_flow.guided_velocity(out_uncond, out_text, guidance_scale)

  return guided


def conditional_velocity(apply_fn: Callable, text_embeds: jax.Array,
                         uncond_embeds: Optional[jax.Array] = None,
                         guidance_scale=1.0) -> VelocityFn:
  """The velocity field of a text-conditioned flow network, with classifier-free guidance
  (guided_network), at flow time s: the network sees rectified_flow.network_time(s)."""
  network = guided_network(apply_fn, text_embeds, uncond_embeds, guidance_scale)
  return lambda x, s: network(x, jnp.full((x.shape[0],), rectified_flow.network_time(s)))


@dataclasses.dataclass(frozen=True)
class Solver:
  """How to integrate the flow from s=start to end (0 to 1: noise to image; 1 to 0: image
  to noise; from 1 - strength: image to image): Euler with `num_steps` steps, or adaptive
  Dopri5 (diffrax) with tolerances rtol/atol. Hashable: a static argument under jit."""
  kind: str = 'euler'
  num_steps: int = 1
  rtol: float = 1e-5
  atol: float = 1e-5
  start: float = 0.0
  end: float = 1.0

  def __post_init__(self):
    if self.kind not in ('euler', 'dopri5'):
      raise ValueError(f"solver {self.kind!r} is unknown; use 'euler' or 'dopri5'")
    if self.kind == 'euler' and self.num_steps < 1:
      raise ValueError(f'euler solver needs num_steps >= 1, got {self.num_steps}')


def dopri5_sample(velocity_fn: VelocityFn, x0: jax.Array, rtol: float, atol: float,
                  max_steps: int = 4096, start: float = 0.0,
                  end: float = 1.0) -> Tuple[jax.Array, jax.Array]:
  """Adaptive Dormand-Prince 5(4) from s=start to end; returns (x at end, number of
  evaluations of v).

  The whole batch is one ODE state, so it shares the step sizes. Dopri5 reuses its last
  stage (FSAL): 6 evaluations per step (accepted or rejected) plus the first one.
  """
  import diffrax  # only this solver needs it
  term = diffrax.ODETerm(lambda s, x, args: velocity_fn(x, s).astype(x.dtype))
  solution = diffrax.diffeqsolve(
      term, diffrax.Dopri5(), t0=start, t1=end, dt0=None, y0=x0,
      stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
      saveat=diffrax.SaveAt(t1=True), max_steps=max_steps)
  return solution.ys[-1], 6 * solution.stats['num_steps'] + 1


class Solution(NamedTuple):
  """An ODE solve: the end state, the number of velocity evaluations, and the
  straightness per example (Euler only; NaN for Dopri5, whose steps are not uniform)."""
  x1: jax.Array
  nfe: jax.Array
  straightness: jax.Array


def integrate(velocity_fn: VelocityFn, x0: jax.Array, solver: Solver) -> Solution:
  """Solves the flow from s=solver.start to solver.end with the given solver."""
  if solver.kind == 'euler':
    x1, straightness = euler_with_straightness(velocity_fn, x0, solver.num_steps,
                                               start=solver.start, end=solver.end)
    return Solution(x1, jnp.int32(solver.num_steps), straightness)
  x1, nfe = dopri5_sample(velocity_fn, x0, solver.rtol, solver.atol, start=solver.start,
                          end=solver.end)
  return Solution(x1, nfe, jnp.full((x0.shape[0],), jnp.nan, jnp.float32))
