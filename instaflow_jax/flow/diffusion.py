"""Diffusion models beside flows: the DDPM noise schedule and samplers of its
probability-flow ODE (DPM-Solver++ 2M and DDIM), as diffusers runs them.

A diffusion network predicts, at its own discrete timestep t, the noise (epsilon), the
velocity v = alpha_t * eps - sigma_t * x0 (v_prediction) or the data (sample), where
x_t = alpha_t * x0 + sigma_t * eps and alpha_t^2 = prod_{k <= t} (1 - beta_k).

Both samplers here are the same first- or second-order update of the data prediction
(DDIM with eta 0 is first-order DPM-Solver++), so one loop runs both: the timesteps and
the update's coefficients are host-computed numpy tables, constants of the compiled loop.
The sampler settings follow diffusers' defaults (DPMSolverMultistepScheduler: dpmsolver++,
order 2, midpoint, lower_order_final, final sigma zero; DDIMScheduler: eta 0); a
scheduler file's own sampler fields (solver_order, use_karras_sigmas, ...) are not read.
"""
import dataclasses
import json
import math
import os
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from instaflow_jax.flow import samplers

SCHEDULER_CONFIG = os.path.join('scheduler', 'scheduler_config.json')
BETA_SCHEDULES = ('linear', 'scaled_linear', 'squaredcos_cap_v2')
PREDICTION_TYPES = ('epsilon', 'v_prediction', 'sample')
TIMESTEP_SPACINGS = ('leading', 'trailing', 'linspace')
SAMPLERS = ('dpm_solver++', 'ddim')
# The spacing each diffusers scheduler uses when the config names none.
DEFAULT_SPACING = {'dpm_solver++': 'linspace', 'ddim': 'leading'}

# model(x, timesteps [batch]) -> the network's (guided) output.
ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def _check_choice(field: str, value, choices: tuple) -> None:
  if value not in choices:
    raise ValueError(f'{field} {value!r} is not supported; use one of '
                     + ', '.join(repr(c) for c in choices) + ' instead')


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
  """A diffusers scheduler_config.json's noise schedule. Hashable (trained_betas is a
  tuple): a static argument under jit. Defaults are diffusers' where the file is silent."""
  num_train_timesteps: int = 1000
  beta_start: float = 0.0001
  beta_end: float = 0.02
  beta_schedule: str = 'linear'
  trained_betas: Optional[Tuple[float, ...]] = None
  prediction_type: str = 'epsilon'
  steps_offset: int = 0
  timestep_spacing: Optional[str] = None  # None: the sampler's own default (DEFAULT_SPACING)
  set_alpha_to_one: bool = True           # DDIM's last step ends at alpha = 1, else at t = 0
  clip_sample: bool = True                # DDIM clips x0 when set: not supported here

  def __post_init__(self):
    if self.trained_betas is None:
      _check_choice('beta_schedule', self.beta_schedule, BETA_SCHEDULES)
    elif len(self.trained_betas) != self.num_train_timesteps:
      raise ValueError(f'trained_betas has {len(self.trained_betas)} values but '
                       f'num_train_timesteps is {self.num_train_timesteps}; make them agree')
    _check_choice('prediction_type', self.prediction_type, PREDICTION_TYPES)
    if self.timestep_spacing is not None:
      _check_choice('timestep_spacing', self.timestep_spacing, TIMESTEP_SPACINGS)
    if self.num_train_timesteps < 2:
      raise ValueError(f'num_train_timesteps {self.num_train_timesteps} must be at least 2')

  @classmethod
  def from_config(cls, config: dict) -> 'NoiseSchedule':
    """From a scheduler_config.json's dict; fields other than the schedule's are ignored."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in config.items() if k in fields and v is not None}
    if 'trained_betas' in values:
      values['trained_betas'] = tuple(float(b) for b in values['trained_betas'])
    return cls(**values)

  def alphas_cumprod(self) -> np.ndarray:
    """alpha_t^2 = prod_{k <= t} (1 - beta_k), float64, for t = 0 .. T-1."""
    return np.cumprod(1.0 - self.betas())

  def betas(self) -> np.ndarray:
    count = self.num_train_timesteps
    if self.trained_betas is not None:
      return np.asarray(self.trained_betas, np.float64)
    if self.beta_schedule == 'linear':
      return np.linspace(self.beta_start, self.beta_end, count)
    if self.beta_schedule == 'scaled_linear':  # Stable Diffusion's: linear in sqrt(beta)
      return np.linspace(math.sqrt(self.beta_start), math.sqrt(self.beta_end), count) ** 2
    return _cosine_betas(count)


def _cosine_betas(count: int, max_beta: float = 0.999) -> np.ndarray:
  """Improved DDPM's cosine schedule (squaredcos_cap_v2): betas that discretise
  alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2)^2, capped below 1."""
  alpha_bar = np.cos((np.arange(count + 1) / count + 0.008) / 1.008 * np.pi / 2) ** 2
  return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta)


def read_noise_schedule(folder: str) -> NoiseSchedule:
  """The NoiseSchedule of a diffusers folder's scheduler/scheduler_config.json."""
  path = os.path.join(folder, SCHEDULER_CONFIG)
  if not os.path.isfile(path):
    raise OSError(f'{path}: file not found; a diffusion model folder needs its scheduler config')
  try:
    with open(path) as f:
      config = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{path}: not valid JSON ({e})') from None
  try:
    return NoiseSchedule.from_config(config)
  except (TypeError, ValueError) as e:
    raise ValueError(f'{path}: {e}') from None


def _spaced_timesteps(schedule: NoiseSchedule, spacing: str, num_steps: int,
                      leading_divisor: int, linspace_points: int) -> np.ndarray:
  """Descending integer timesteps as diffusers spaces them. The two schedulers differ only
  in how many points the leading and linspace spacings divide the range into (DPM-Solver
  divides into num_steps + 1 and drops the last point)."""
  count = schedule.num_train_timesteps
  if spacing == 'leading':
    ratio = count // leading_divisor
    timesteps = (np.arange(leading_divisor) * ratio)[::-1][:num_steps] + schedule.steps_offset
  elif spacing == 'trailing':
    timesteps = np.round(np.arange(count, 0, -count / num_steps)) - 1
  else:
    timesteps = np.round(np.linspace(0, count - 1, linspace_points))[::-1][:num_steps]
  return timesteps.astype(np.int64)


def sampler_timesteps(schedule: NoiseSchedule, sampler: str, num_steps: int) -> np.ndarray:
  """The timesteps at which `sampler` evaluates the network, as diffusers' set_timesteps."""
  _check_choice('sampler', sampler, SAMPLERS)
  if not 1 <= num_steps <= schedule.num_train_timesteps:
    raise ValueError(f'num_steps {num_steps} must be in [1, {schedule.num_train_timesteps}]')
  spacing = schedule.timestep_spacing or DEFAULT_SPACING[sampler]
  extra = 1 if sampler == 'dpm_solver++' else 0
  return _spaced_timesteps(schedule, spacing, num_steps, num_steps + extra, num_steps + extra)


@dataclasses.dataclass(frozen=True)
class UpdateTables:
  """Per step i: the network's timestep, the (alpha, sigma) of x_t at it, and the update
  x_next = keep * x + data_weight * (d_i + correction * (d_i - d_{i-1})), where d is the
  network's data prediction. Float64 numpy, length num_steps."""
  timesteps: np.ndarray
  alpha: np.ndarray
  sigma: np.ndarray
  keep: np.ndarray
  data_weight: np.ndarray
  correction: np.ndarray


def _first_order(alpha, sigma, alpha_next, sigma_next):
  """(keep, data_weight) of the exact step of the ODE with the data prediction held fixed
  (DDIM; DPM-Solver++ order 1): x_next = sigma_next/sigma * x + (alpha_next - sigma_next *
  alpha / sigma) * d."""
  return sigma_next / sigma, alpha_next - sigma_next * alpha / sigma


def dpm_solver_tables(schedule: NoiseSchedule, num_steps: int) -> UpdateTables:
  """DPM-Solver++ 2M: second order from the previous step's data prediction (midpoint
  form), first order at the first step and at the last, which ends at sigma = 0."""
  timesteps = sampler_timesteps(schedule, 'dpm_solver++', num_steps)
  alphas_cumprod = schedule.alphas_cumprod()
  # diffusers interpolates sigma/alpha over the integer timesteps: at integers, a lookup.
  ratio = np.sqrt((1 - alphas_cumprod) / alphas_cumprod)[timesteps]
  ratio = np.append(ratio, 0.0)  # the final step lands on clean data
  alpha = 1 / np.sqrt(ratio ** 2 + 1)
  sigma = ratio * alpha
  keep, data_weight = _first_order(alpha[:-1], sigma[:-1], alpha[1:], sigma[1:])
  with np.errstate(divide='ignore'):
    log_snr = np.log(alpha) - np.log(sigma)  # +inf at the final sigma 0, never used below
  correction = np.zeros(num_steps)
  for i in range(1, num_steps - 1):
    step, previous_step = log_snr[i + 1] - log_snr[i], log_snr[i] - log_snr[i - 1]
    correction[i] = 0.5 * step / previous_step
  return UpdateTables(timesteps, alpha[:-1], sigma[:-1], keep, data_weight, correction)


def ddim_tables(schedule: NoiseSchedule, num_steps: int) -> UpdateTables:
  """DDIM with eta 0: each step goes from t to t - T // num_steps (as diffusers, whatever
  the spacing), the last to alpha = 1 or to t = 0 (set_alpha_to_one)."""
  if schedule.clip_sample:
    raise ValueError('clip_sample true is not supported by the ddim sampler (it clips the '
                     "data prediction); set clip_sample false or use the 'dpm_solver++' sampler")
  timesteps = sampler_timesteps(schedule, 'ddim', num_steps)
  alphas_cumprod = schedule.alphas_cumprod()
  final = 1.0 if schedule.set_alpha_to_one else alphas_cumprod[0]
  previous = timesteps - schedule.num_train_timesteps // num_steps
  cumprod_next = np.where(previous >= 0, alphas_cumprod[np.maximum(previous, 0)], final)
  alpha, sigma = np.sqrt(alphas_cumprod[timesteps]), np.sqrt(1 - alphas_cumprod[timesteps])
  keep, data_weight = _first_order(alpha, sigma, np.sqrt(cumprod_next), np.sqrt(1 - cumprod_next))
  return UpdateTables(timesteps, alpha, sigma, keep, data_weight, np.zeros(num_steps))


@dataclasses.dataclass(frozen=True)
class DiffusionSolver:
  """How to solve a diffusion model's probability-flow ODE: `kind` 'dpm_solver++' or
  'ddim' with `num_steps` network evaluations. Hashable: a static argument under jit."""
  schedule: NoiseSchedule
  kind: str = 'dpm_solver++'
  num_steps: int = 25

  def __post_init__(self):
    _check_choice('sampler', self.kind, SAMPLERS)
    self.tables()  # bad step counts and unsupported settings stop here, on the host

  def tables(self) -> UpdateTables:
    if self.kind == 'dpm_solver++':
      return dpm_solver_tables(self.schedule, self.num_steps)
    return ddim_tables(self.schedule, self.num_steps)


def predicted_data(output: jax.Array, x: jax.Array, alpha, sigma, prediction_type: str):
  """The network's prediction of the clean data x0 at x_t = alpha * x0 + sigma * eps."""
  if prediction_type == 'epsilon':
    return (x - sigma * output) / alpha
  if prediction_type == 'v_prediction':
    return alpha * x - sigma * output
  return output


def solve(model_fn: ModelFn, x: jax.Array, solver: DiffusionSolver) -> jax.Array:
  """The final latents of the probability-flow ODE from the noise x (scaled by the
  schedule's initial sigma, 1 for these variance-preserving samplers)."""
  tables = solver.tables()
  as_constant = lambda a: jnp.asarray(a, jnp.float32)
  timesteps = jnp.asarray(tables.timesteps, jnp.int32)
  alpha, sigma = as_constant(tables.alpha), as_constant(tables.sigma)
  keep, data_weight = as_constant(tables.keep), as_constant(tables.data_weight)
  correction = as_constant(tables.correction)
  prediction_type = solver.schedule.prediction_type

  def step(i, carry):
    x, previous_data = carry
    t = jnp.full((x.shape[0],), timesteps[i])
    output = model_fn(x, t).astype(jnp.float32)
    data = predicted_data(output, x, alpha[i], sigma[i], prediction_type)
    extrapolated = data + correction[i] * (data - previous_data)
    return keep[i] * x + data_weight[i] * extrapolated, data

  x = x.astype(jnp.float32)
  return jax.lax.fori_loop(0, solver.num_steps, step, (x, jnp.zeros_like(x)))[0]


def integrate(model_fn: ModelFn, x0: jax.Array, solver: DiffusionSolver) -> samplers.Solution:
  """solve() as a samplers.Solution, beside the flow solvers' (straightness is a flow's
  measure: NaN here)."""
  return samplers.Solution(solve(model_fn, x0, solver), jnp.int32(solver.num_steps),
                           jnp.full((x0.shape[0],), jnp.nan, jnp.float32))
