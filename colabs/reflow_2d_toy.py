# ---
# jupyter:
#   colab:
#     provenance: []
#   jupytext:
#     notebook_metadata_filter: accelerator,colab,language_info
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
#   language_info:
#     name: python
# ---

# %% [markdown]
# # Rectified flow and reflow on a 2-D toy
#
# A rectified flow learns a velocity field v(x, s) whose ODE carries noise X0 ~ N(0, I)
# (s = 0) to data X1 (s = 1), by regressing v(x_s, s) on X1 − X0 along the straight lines
# x_s = s·X1 + (1 − s)·X0. With X0 and X1 drawn **independently** (1-RF), lines from the
# same region of noise head to different modes; the ODE cannot cross itself, so it
# follows their average and its paths bend. Reflow draws new pairs (X0, ODE(X0)) from the
# 1-RF: a deterministic coupling whose lines hardly cross, so the 2-RF trained on it is
# nearly straight and **one Euler step** lands close to where the full ODE goes. This is
# the core of InstaFlow, shown here on a mixture of Gaussians in seconds.
#
# Straightness (Liu et al., 2022) is the mean over the path of ‖(X1 − X0) − v(x_s, s)‖²:
# 0 for straight paths. Training, pairs and straightness use the package's own
# `instaflow_jax.flow` functions, the same ones the text-to-image stages use.

# %% tags=["parameters"]
STEPS = 3000     # training steps of each flow
BATCH = 512
LR = 3e-3
N_PAIRS = 10000  # (noise, 1-RF sample) pairs that the 2-RF is trained on
ODE_STEPS = 100  # Euler steps of the ODE solves: the pairs, the paths, the straightness
MODES = 4        # Gaussians of the data distribution, on a circle
RADIUS = 4.0
MODE_STD = 0.4
N_EVAL = 2000    # noise samples for straightness and one-step samples
N_PATHS = 200    # paths drawn
SEED = 0
REPO = '.'       # pip requirement for instaflow_jax: a checkout of this repository, or its git URL

# %%
# Colab starts without instaflow_jax; a machine set up with the repository's
# launch/install.sh has it already, and then nothing is installed.
import importlib
import importlib.util
import subprocess
import sys

INSTALL = importlib.util.find_spec('instaflow_jax') is None
if INSTALL:
  subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', REPO], check=True)
  importlib.invalidate_caches()  # so that this running kernel finds the new package
print('installed instaflow_jax from', REPO if INSTALL else 'nothing: it was installed already')

# %%
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

from instaflow_jax.flow import rectified_flow
from instaflow_jax.flow import samplers


class VelocityMLP(nn.Module):
  """v(x, s) for 2-D points x [batch, 2] at flow time s."""
  width: int = 128
  depth: int = 3

  @nn.compact
  def __call__(self, x, s):
    # The samplers pass one s for the batch, training one s per example: a column either way.
    s = jnp.broadcast_to(jnp.reshape(s, (-1, 1)), (x.shape[0], 1)).astype(x.dtype)
    h = jnp.concatenate([x, s], axis=-1)
    for _ in range(self.depth):
      h = nn.silu(nn.Dense(self.width)(h))
    return nn.Dense(x.shape[-1])(h)


model = VelocityMLP()
angles = 2 * np.pi * (np.arange(MODES) + 0.5) / MODES
CENTERS = jnp.asarray(RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=1), jnp.float32)


def sample_data(rng, n):
  """n points of the mixture: a random centre each, plus Gaussian noise."""
  mode_rng, noise_rng = jax.random.split(rng)
  modes = jax.random.randint(mode_rng, (n,), 0, MODES)
  return CENTERS[modes] + MODE_STD * jax.random.normal(noise_rng, (n, 2))


def velocity(params):
  """The field as samplers' VelocityFn, v(x, s)."""
  return lambda x, s: model.apply(params, x, s)


# %% [markdown]
# ## Training: one loss for both flows, only the coupling changes
#
# `coupling(rng)` returns a batch of (X0, X1): independent draws for the 1-RF, rows of the
# stored pairs for the 2-RF. The whole training run is one `lax.scan`, compiled once.

# %%
def flow_loss(params, x0, x1, rng):
  """The rectified-flow regression at random times s on the line from x0 to x1."""
  s = rectified_flow.sample_time(rng, x0.shape[0])
  prediction = model.apply(params, rectified_flow.interpolate(x0, x1, s), s)
  target = rectified_flow.velocity_target(x0, x1)
  return rectified_flow.per_example_loss(prediction, target).mean()


optimizer = optax.adam(optax.cosine_decay_schedule(LR, STEPS))


@functools.partial(jax.jit, static_argnums=1)
def train(params, coupling, rng):
  """STEPS Adam steps on batches from `coupling`; (params, the loss of each step)."""
  def step(carry, step_rng):
    params, opt_state = carry
    batch_rng, time_rng = jax.random.split(step_rng)
    loss, grads = jax.value_and_grad(flow_loss)(params, *coupling(batch_rng), time_rng)
    updates, opt_state = optimizer.update(grads, opt_state)
    return (optax.apply_updates(params, updates), opt_state), loss

  (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)),
                                     jax.random.split(rng, STEPS))
  return params, losses


def independent_coupling(rng):
  noise_rng, data_rng = jax.random.split(rng)
  return jax.random.normal(noise_rng, (BATCH, 2)), sample_data(data_rng, BATCH)


init_rng, rf_rng, pairs_rng, reflow_rng, eval_rng, data_rng = jax.random.split(
    jax.random.key(SEED), 6)
params_1rf, losses_1rf = train(model.init(init_rng, jnp.zeros((1, 2)), jnp.zeros((1,))),
                               independent_coupling, rf_rng)
print(f'1-RF: final loss {losses_1rf[-100:].mean():.3f} (it cannot reach 0: the target '
      'X1 - X0 is random given x_s)')

# %% [markdown]
# ## Reflow: pairs from the 1-RF's ODE, then the 2-RF
#
# The 2-RF starts from the 1-RF's weights, as stage `reflow` of the recipe starts from
# stage `rf`'s.

# %%
pairs_x0 = jax.random.normal(pairs_rng, (N_PAIRS, 2))
pairs_x1 = samplers.euler_sample(velocity(params_1rf), pairs_x0, ODE_STEPS)


def reflow_coupling(rng):
  rows = jax.random.randint(rng, (BATCH,), 0, N_PAIRS)
  return pairs_x0[rows], pairs_x1[rows]


params_2rf, losses_2rf = train(params_1rf, reflow_coupling, reflow_rng)
print(f'2-RF: final loss {losses_2rf[-100:].mean():.4f} (X1 is a function of X0 now: '
      'a straight field can fit it)')


# %% [markdown]
# ## Paths before and after reflow

# %%
def euler_path(velocity_fn, x0, num_steps):
  """Every state of the Euler solve, [num_steps + 1, batch, 2], for drawing: the
  samplers return only the end, which the check below compares with."""
  def step(x, s):
    x = x + velocity_fn(x, s) / num_steps
    return x, x

  _, states = jax.lax.scan(step, x0, rectified_flow.euler_times(num_steps))
  return jnp.concatenate([x0[None], states])


@jax.jit
def solve(params, x0):
  """One model from the noise x0: the end of its ODE, its straightness, its one-step
  sample and the paths to draw (params are an argument: one program for both models)."""
  velocity_fn = velocity(params)
  end, straightness = samplers.euler_with_straightness(velocity_fn, x0, ODE_STEPS)
  return dict(end=end, straightness=straightness.mean(),
              one_step=samplers.euler_sample(velocity_fn, x0, 1),
              path=euler_path(velocity_fn, x0[:N_PATHS], ODE_STEPS))


models = {'1-RF': params_1rf, '2-RF': params_2rf}
solved = {name: solve(params, jax.random.normal(eval_rng, (N_EVAL, 2)))
          for name, params in models.items()}
for result in solved.values():
  np.testing.assert_allclose(result['path'][-1], result['end'][:N_PATHS], atol=1e-4)

fig, axes = plt.subplots(1, 2, figsize=(12, 6), sharex=True, sharey=True)
for ax, name in zip(axes, models):
  path = np.asarray(solved[name]['path'])
  ax.plot(path[:, :, 0], path[:, :, 1], color='tab:blue', alpha=0.25, lw=0.8)
  ax.scatter(*path[0].T, s=4, color='black', label='noise X0')
  ax.scatter(*path[-1].T, s=4, color='tab:red', label=f'X1 ({ODE_STEPS} Euler steps)')
  ax.set_title(f"{name}: straightness {solved[name]['straightness']:.4f}")
  ax.set_aspect('equal')
axes[0].legend(loc='upper left')
plt.show()
for name in models:
  print(f"straightness {name}: {solved[name]['straightness']:.4f}")

# %% [markdown]
# ## One Euler step
#
# With X0 and X1 independent, the 1-RF's velocity at s = 0 is E[X1] − X0: its single
# step lands near the mean of the data, between the modes. The 2-RF's lands near where its
# full ODE goes.

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 5), sharex=True, sharey=True)
panels = [('data', sample_data(data_rng, N_EVAL))] + [
    (f'{name}, one step', solved[name]['one_step']) for name in models]
for ax, (title, points) in zip(axes, panels):
  ax.scatter(*np.asarray(points).T, s=3, alpha=0.5)
  ax.set_title(title)
  ax.set_aspect('equal')
plt.show()
for name in models:
  error = jnp.linalg.norm(solved[name]['one_step'] - solved[name]['end'], axis=1).mean()
  print(f'one-step error {name}: {error:.3f} (mean distance to its {ODE_STEPS}-step ODE end)')
