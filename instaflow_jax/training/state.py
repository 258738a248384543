"""The train state (params, EMA params, optimizer state, step) and the optimizer.

Only what training changes lives here; frozen networks (text encoder, autoencoder,
teacher, LPIPS) are passed to the step separately and never checkpointed.
"""
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct


class TrainState(struct.PyTreeNode):
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  tx: optax.GradientTransformation = struct.field(pytree_node=False)

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation) -> 'TrainState':
    return cls(step=jnp.zeros((), jnp.int32), params=params,
               ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params), tx=tx)

  @classmethod
  def create_sharded(cls, params, tx: optax.GradientTransformation,
                     shardings: 'TrainState') -> 'TrainState':
    """The state made directly in place on the devices: the optimizer moments (and EMA)
    are created sharded, never whole on one device."""
    return jax.jit(lambda p: cls.create(p, tx), in_shardings=(shardings.params,),
                   out_shardings=shardings)(params)

  def apply_gradients(self, grads, ema_decay: float) -> 'TrainState':
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    decay = ema_warmup(ema_decay, self.step)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, self.ema_params, params)
    return self.replace(step=self.step + 1, params=params, ema_params=ema, opt_state=opt_state)


def ema_warmup(decay: float, step: jax.Array) -> jax.Array:
  """The EMA decay of update `step` (0 first): min(decay, (1 + step) / (10 + step)), so
  that the average forgets the initial weights early in a run, whatever its length."""
  step = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def abstract_state(params, tx: optax.GradientTransformation) -> TrainState:
  """The state's shapes and dtypes, computed without allocating it."""
  return jax.eval_shape(lambda p: TrainState.create(p, tx), params)


def state_shardings(abstract: TrainState, param_shardings, replicated) -> TrainState:
  """Shardings of every leaf of the state: params and EMA as `param_shardings`, each
  optimizer moment as its parameter, the rest (step, counts) `replicated`."""
  opt_state = optax.tree_map_params(abstract.tx, lambda _, sharding: sharding,
                                    abstract.opt_state, param_shardings,
                                    transform_non_params=lambda _: replicated)
  return abstract.replace(step=replicated, params=param_shardings, ema_params=param_shardings,
                          opt_state=opt_state)


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup to config.lr, then constant or cosine decay to the end of training."""
  warmup = min(config.warmup_steps, total_steps)
  if config.schedule == 'constant':
    after = optax.constant_schedule(config.lr)
  elif config.schedule == 'cosine':
    after = optax.cosine_decay_schedule(config.lr, max(total_steps - warmup, 1))
  else:
    raise ValueError(f"optimizer.schedule {config.schedule!r} is unknown; use 'constant' or 'cosine'")
  return optax.join_schedules([optax.linear_schedule(0.0, config.lr, warmup), after], [warmup])


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """AdamW with warmup + schedule and global-norm clipping; its first moment in
  `mu_dtype` where the config names one. (Gradient accumulation is done by the train step
  over micro-batches, so that one step is always one update.)"""
  return optax.chain(
      optax.clip_by_global_norm(config.grad_clip),
      optax.adamw(learning_rate_schedule(config, total_steps), b1=config.b1, b2=config.b2,
                  eps=config.eps, weight_decay=config.weight_decay,
                  mu_dtype=config.get('mu_dtype') or None))
