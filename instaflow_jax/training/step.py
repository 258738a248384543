"""The jitted update every training stage runs: one optimizer step of the loss's gradient
(averaged over micro-batches), with the EMA. Pure JAX: the host-side loop around it
(checkpoints, metrics, preemption) is training/loop.py."""
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import optax

from instaflow_jax import parallel
from instaflow_jax.models import formulations
from instaflow_jax.training.state import TrainState

LossFn = Callable[[Any, Any, Mapping[str, jax.Array], jax.Array, jax.Array], Any]


def _split_micro_batches(batch, k: int):
  """Micro-batch i takes examples i, i + k, i + 2k, ...: each device's block of the batch
  then holds its share of every micro-batch, so splitting moves no data between devices."""
  return jax.tree.map(lambda x: x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1),
                      batch)


def make_train_step(loss_fn: LossFn, ema_decay: float, grad_accum_steps: int = 1,
                    layout: Optional[parallel.Layout] = None, state_shardings=None):
  """The jitted update; with grad_accum_steps=k the batch is split into k micro-batches
  whose gradients are averaged, so one step is always one optimizer update.

  With a layout, it is compiled for the state's shardings, frozen params and the RNG key
  replicated and the batch split over the batch axes; the metrics come out replicated."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def loss_and_grads(params, frozen, batch, rng, step):
    if grad_accum_steps == 1:
      return grad_fn(params, frozen, batch, rng, step)

    def micro_step(total, inputs):
      micro_batch, micro_rng = inputs
      out = grad_fn(params, frozen, micro_batch, micro_rng, step)
      return jax.tree.map(jnp.add, total, out), None

    micro_batches = _split_micro_batches(batch, grad_accum_steps)
    rngs = jax.random.split(rng, grad_accum_steps)
    first = grad_fn(params, frozen, jax.tree.map(lambda x: x[0], micro_batches), rngs[0], step)
    total, _ = jax.lax.scan(micro_step, first,
                            (jax.tree.map(lambda x: x[1:], micro_batches), rngs[1:]))
    return jax.tree.map(lambda x: x / grad_accum_steps, total)

  def train_step(state: TrainState, frozen, batch, rng):
    (loss, aux), grads = loss_and_grads(state.params, frozen, batch, rng, state.step)
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads), **aux}
    return state.apply_gradients(grads, ema_decay), metrics

  if layout is None:
    return formulations.jit(train_step, donate_argnums=0)
  return formulations.jit(train_step, donate_argnums=0,
                          in_shardings=(state_shardings, layout.replicated,
                                        layout.batch_sharding, layout.replicated),
                          out_shardings=(state_shardings, layout.replicated))
