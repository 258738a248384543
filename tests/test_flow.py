"""The rectified-flow conventions, time distributions and losses."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instaflow_jax.flow import rectified_flow
from instaflow_jax.flow import samplers


def test_path_and_network_time_conventions():
  x0, x1 = jnp.zeros((2, 3)), jnp.ones((2, 3))
  np.testing.assert_allclose(rectified_flow.interpolate(x0, x1, jnp.array([0.0, 0.25])),
                             [[0, 0, 0], [0.25, 0.25, 0.25]])
  np.testing.assert_allclose(rectified_flow.velocity_target(x0, x1), x1 - x0)
  # The released pipeline evaluates v at (1 - i/N) * 1000.
  np.testing.assert_allclose(rectified_flow.network_time(rectified_flow.euler_times(4)),
                             [1000.0, 750.0, 500.0, 250.0])


def test_euler_follows_a_straight_flow_exactly_in_one_step():
  x0 = jax.random.normal(jax.random.key(0), (4, 5))
  x1 = jax.random.normal(jax.random.key(1), (4, 5))
  straight = lambda x, s: x1 - x0  # the velocity of a perfectly straight coupling
  np.testing.assert_allclose(samplers.euler_sample(straight, x0, 1), x1, atol=1e-6)
  np.testing.assert_allclose(samplers.euler_sample(straight, x0, 7), x1, atol=1e-5)


def test_guidance_combines_branches_as_the_released_pipeline():
  seen = {}

  def apply_fn(x, t, embeds):
    seen['t'], seen['batch'] = t, x.shape[0]
    return embeds[:, :1, :1] * jnp.ones_like(x)

  text, uncond = jnp.full((2, 3, 4), 2.0), jnp.full((2, 3, 4), 0.5)
  v = samplers.conditional_velocity(apply_fn, text, uncond, 3.0)(jnp.zeros((2, 1, 1)), 0.25)
  np.testing.assert_allclose(v, 0.5 + 3.0 * (2.0 - 0.5))
  assert seen['batch'] == 4
  np.testing.assert_allclose(seen['t'], 750.0)
  assert not rectified_flow.uses_guidance(1.0) and rectified_flow.uses_guidance(1.5)


def _histogram(samples, bins=10):
  return np.histogram(np.asarray(samples), bins=bins, range=(0, 1), density=True)[0]


def test_time_distributions_have_their_densities():
  n = 200_000
  uniform = rectified_flow.sample_time(jax.random.key(0), n, 'uniform')
  np.testing.assert_allclose(_histogram(uniform), 1.0, atol=0.03)

  logit = rectified_flow.sample_time(jax.random.key(1), n, 'logit_normal', logit_mean=0.5,
                                     logit_std=1.0)
  z = np.log(np.asarray(logit) / (1 - np.asarray(logit)))
  assert abs(z.mean() - 0.5) < 0.01 and abs(z.std() - 1.0) < 0.01

  a = 4.0
  u_shaped = rectified_flow.sample_time(jax.random.key(2), n, 'u_shaped', u_shape_a=a)
  edges = np.linspace(0, 1, 11)
  # Exact bin masses of the density (e^{a s} + e^{a (1 - s)}) / Z on [0, 1].
  antiderivative = lambda s: (np.exp(a * s) - np.exp(a * (1 - s))) / a
  expected = np.diff(antiderivative(edges)) / (antiderivative(1.0) - antiderivative(0.0)) * 10
  np.testing.assert_allclose(_histogram(u_shaped), expected, rtol=0.05)
  assert float(jnp.min(u_shaped)) >= 0.0 and float(jnp.max(u_shaped)) <= 1.0


def test_unknown_time_distribution_and_loss_are_named():
  with pytest.raises(ValueError, match="'beta'"):
    rectified_flow.sample_time(jax.random.key(0), 2, 'beta')
  with pytest.raises(ValueError, match="'huber'"):
    rectified_flow.per_example_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), 'huber')


def test_losses():
  prediction = jnp.array([[1.0, 2.0], [0.0, 0.0]])
  target = jnp.array([[0.0, 0.0], [3.0, 4.0]])
  np.testing.assert_allclose(rectified_flow.per_example_loss(prediction, target, 'l2'),
                             [2.5, 12.5])
  np.testing.assert_allclose(rectified_flow.per_example_loss(prediction, target, 'l1'),
                             [1.5, 3.5])
  huber = rectified_flow.per_example_loss(prediction, target, 'pseudo_huber', huber_c=1.0)
  np.testing.assert_allclose(huber, [np.sqrt(5 + 1) - 1, np.sqrt(25 + 1) - 1], rtol=1e-6)
  default_c = 0.00054 * np.sqrt(2)
  np.testing.assert_allclose(
      rectified_flow.per_example_loss(prediction, target, 'pseudo_huber'),
      [np.sqrt(5 + default_c**2) - default_c, np.sqrt(25 + default_c**2) - default_c], rtol=1e-6)


def test_dopri5_counts_its_evaluations_and_solves_accurately():
  calls = []

  def counted(x):
    calls.append(1)
    return x

  def velocity(x, s):  # dx/ds = -x (1 + s): x(1) = x0 exp(-1.5)
    x = jax.pure_callback(counted, jax.ShapeDtypeStruct(x.shape, x.dtype), x)
    return -x * (1.0 + s)

  x0 = jnp.array([1.0, -2.0, 0.5])
  x1, nfe, straightness = samplers.integrate(velocity, x0,
                                             samplers.Solver('dopri5', rtol=1e-6, atol=1e-6))
  assert np.isnan(straightness).all()  # defined on uniform Euler steps only
  np.testing.assert_allclose(x1, x0 * np.exp(-1.5), rtol=1e-5)
  assert int(nfe) == len(calls) > 7


def test_straightness_is_the_mean_deviation_from_the_chord():
  x0 = jax.random.normal(jax.random.key(0), (3, 4, 2))
  weights = jax.random.normal(jax.random.key(1), (2, 2))
  velocity = lambda x, s: x @ weights * (1.0 + s)  # curved: depends on x and s
  x1, nfe, straightness = samplers.integrate(velocity, x0, samplers.Solver('euler', 5))
  # By hand: the trajectory, then mean_i ||(X1 - X0) - v_i||^2 per element.
  x, velocities = np.asarray(x0, np.float64), []
  for i in range(5):
    velocities.append(np.asarray(velocity(jnp.asarray(x, jnp.float32), i / 5), np.float64))
    x = x + velocities[-1] / 5
  chord = x - np.asarray(x0, np.float64)
  expected = np.mean([np.mean((chord - v) ** 2, axis=(1, 2)) for v in velocities], axis=0)
  np.testing.assert_allclose(x1, x, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(straightness, expected, rtol=1e-4, atol=1e-7)
  assert int(nfe) == 5 and expected.min() > 1e-3
  straight = lambda x, s: jnp.ones_like(x)
  assert np.abs(samplers.integrate(straight, x0, samplers.Solver('euler', 5))[2]).max() < 1e-6


def test_unrolled_euler_is_the_loop_written_out():
  x0 = jax.random.normal(jax.random.key(2), (2, 3))
  velocity = lambda x, s: jnp.sin(x) * (1.0 + s)
  np.testing.assert_allclose(samplers.euler_sample(velocity, x0, 3, unroll=True),
                             samplers.euler_sample(velocity, x0, 3), rtol=1e-6)


def test_solver_rejects_unknown_kinds():
  with pytest.raises(ValueError, match="'rk4'"):
    samplers.Solver('rk4')
