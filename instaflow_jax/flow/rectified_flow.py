"""The rectified-flow conventions every part of the package shares.

Time s runs from 0 (pure noise X0) to 1 (data X1). The path is x_s = s*X1 + (1-s)*X0 and
the velocity along it is X1 - X0. The network is fed 1000*(1-s), so that our weights are
interchangeable with the released 2-RF / InstaFlow checkpoints, whose pipeline evaluates
v at timesteps (1 - i/N)*1000 and integrates latents += v/N.
"""
import jax
import jax.numpy as jnp

NETWORK_TIME_SCALE = 1000.0


def _broadcast_time(s: jax.Array, x: jax.Array) -> jax.Array:
  s = jnp.asarray(s, x.dtype)
  return s.reshape(s.shape + (1,) * (x.ndim - s.ndim))


def interpolate(x0: jax.Array, x1: jax.Array, s: jax.Array) -> jax.Array:
  """x_s = s*X1 + (1-s)*X0, with s of shape [] or [batch]."""
  s = _broadcast_time(s, x0)
  return s * x1 + (1.0 - s) * x0


def velocity_target(x0: jax.Array, x1: jax.Array) -> jax.Array:
  """The velocity of the straight path from X0 to X1."""
  return x1 - x0


def network_time(s: jax.Array) -> jax.Array:
  """The timestep the network sees at flow time s (1000 at noise, 0 at data)."""
  return NETWORK_TIME_SCALE * (1.0 - jnp.asarray(s, jnp.float32))


def euler_times(num_steps: int) -> jax.Array:
  """The flow times s_i = i/N at which an N-step Euler solver evaluates the velocity."""
  return jnp.arange(num_steps, dtype=jnp.float32) / num_steps


def uses_guidance(guidance_scale: float) -> bool:
  """Classifier-free guidance is applied only when w > 1, as in the released pipeline."""
  return guidance_scale > 1.0


def guided_velocity(v_uncond: jax.Array, v_text: jax.Array, guidance_scale) -> jax.Array:
  """v = v_uncond + w * (v_text - v_uncond)."""
  return v_uncond + guidance_scale * (v_text - v_uncond)


# ---- Training: time distributions and losses -------------------------------------------

def sample_time(rng: jax.Array, batch: int, kind: str = 'uniform', *, logit_mean: float = 0.0,
                logit_std: float = 1.0, u_shape_a: float = 4.0) -> jax.Array:
  """Flow times s in [0, 1] for a training batch.

  uniform:       s ~ U(0, 1) (the Rectified Flow paper).
  logit_normal:  s = sigmoid(N(logit_mean, logit_std)) (SD3), weighting the middle.
  u_shaped:      density proportional to exp(a*s) + exp(a*(1-s)) (2-RF++: the truncated
                 exponential and its mirror image), weighting both ends, where a
                 reflowed model's errors concentrate.
  """
  if kind == 'uniform':
    return jax.random.uniform(rng, (batch,))
  if kind == 'logit_normal':
    return jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(rng, (batch,)))
  if kind == 'u_shaped':
    side_rng, u_rng = jax.random.split(rng)
    u = jax.random.uniform(u_rng, (batch,))
    # Inverse CDF of the truncated exponential exp(a*s) on [0, 1], mirrored for half the batch.
    s = jnp.log1p(u * jnp.expm1(u_shape_a)) / u_shape_a
    return jnp.where(jax.random.bernoulli(side_rng, 0.5, (batch,)), s, 1.0 - s)
  raise ValueError(f"time distribution {kind!r} is unknown; use 'uniform', 'logit_normal' "
                   "or 'u_shaped'")


def per_example_loss(prediction: jax.Array, target: jax.Array, kind: str = 'l2',
                     huber_c: float = None) -> jax.Array:
  """The regression loss of each example of a batch, in float32.

  l2:            mean squared error over all dimensions of an example.
  l1:            mean absolute error: each dimension's median, not its mean, is the
                 minimiser, so where the target is one of several modes the prediction
                 takes the likeliest instead of a faint blend of them.
  pseudo_huber:  sqrt(||d||^2 + c^2) - c over the whole example (2-RF++), with
                 c = 0.00054 * sqrt(dim) unless given.
  """
  diff = (prediction.astype(jnp.float32) - target.astype(jnp.float32)).reshape(target.shape[0], -1)
  if kind == 'l2':
    return jnp.mean(jnp.square(diff), axis=1)
  if kind == 'l1':
    return jnp.mean(jnp.abs(diff), axis=1)
  if kind == 'pseudo_huber':
    c = 0.00054 * jnp.sqrt(float(diff.shape[1])) if huber_c is None else huber_c
    return jnp.sqrt(jnp.sum(jnp.square(diff), axis=1) + c * c) - c
  raise ValueError(f"loss {kind!r} is unknown; use 'l2', 'l1' or 'pseudo_huber'")
