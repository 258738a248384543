"""The training loop every stage runs: jitted step, metrics, sample grids, checkpoints.

A stage supplies a loss `loss_fn(params, frozen, batch, rng, step) -> (loss, aux_metrics)`,
the frozen networks' params, and the batch at each step; the loop owns the rest:
resuming from the latest checkpoint, the RNG of step k (fold_in(seed, k)), NaN checks,
periodic sample grids, SIGTERM, and the final params the next stage reads.

The state is created sharded on the layout that main entered (parallel.current_layout()):
the step is compiled with explicit shardings, each process feeds its slice of the global
batch, and every process takes part in checkpoints; only process 0 writes metrics, sample
grids and the stage's DONE file.
"""
import dataclasses
import json
import os
import signal
from typing import Any, Callable, Iterator, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers
from clu import periodic_actions

from instaflow_jax import images as image_io
from instaflow_jax import parallel
from instaflow_jax.training import checkpoint
from instaflow_jax.training import state as state_lib
from instaflow_jax.training.state import TrainState
from instaflow_jax.training.state import make_optimizer

LossFn = Callable[[Any, Any, Mapping[str, jax.Array], jax.Array, jax.Array], Any]
DONE_FILE = 'DONE'
FINAL_PARAMS = 'params'


class NonFiniteLossError(FloatingPointError):
  """The loss or the gradient became NaN/inf."""


class Preempted(SystemExit):
  """SIGTERM arrived; a checkpoint was saved."""


def is_complete(stage_dir: str) -> bool:
  return os.path.exists(os.path.join(stage_dir, DONE_FILE))


def mark_complete(stage_dir: str, summary: Mapping[str, Any]) -> None:
  """Written by process 0 once every process has finished the stage."""
  parallel.sync(f'{stage_dir} done')
  if jax.process_index() > 0:
    return
  tmp = os.path.join(stage_dir, DONE_FILE + '.tmp')
  with open(tmp, 'w') as f:
    json.dump(dict(summary), f, indent=2)
  os.replace(tmp, os.path.join(stage_dir, DONE_FILE))


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
    return jax.jit(train_step, donate_argnums=0)
  return jax.jit(train_step, donate_argnums=0,
                 in_shardings=(state_shardings, layout.replicated, layout.batch_sharding,
                               layout.replicated),
                 out_shardings=(state_shardings, layout.replicated))


class _JsonlWriter(metric_writers.MetricWriter):
  """Scalars as one JSON object per line: easy to read back in tests and notebooks."""

  def __init__(self, path: str):
    self._file = open(path, 'a')

  def write_scalars(self, step, scalars):
    self._file.write(json.dumps({'step': int(step), **{k: float(v) for k, v in scalars.items()}}) + '\n')
    self._file.flush()

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


def create_writer(stage_dir: str) -> metric_writers.MetricWriter:
  """TensorBoard + log (+ metrics.jsonl) on process 0; nothing on the others."""
  if jax.process_index() > 0:
    return metric_writers.MultiWriter([])
  return metric_writers.MultiWriter([
      metric_writers.create_default_writer(stage_dir, asynchronous=False),
      _JsonlWriter(os.path.join(stage_dir, 'metrics.jsonl'))])


def read_metrics(stage_dir: str):
  """The rows of metrics.jsonl, the last value of each step winning (a resumed run
  rewrites the steps after its checkpoint)."""
  rows = {}
  with open(os.path.join(stage_dir, 'metrics.jsonl')) as f:
    for line in f:
      row = json.loads(line)
      rows.setdefault(row['step'], {}).update(row)
  return [rows[s] for s in sorted(rows)]


@dataclasses.dataclass
class _SigtermFlag:
  raised: bool = False

  def __call__(self, signum, frame):
    self.raised = True


def _check_finite(metrics, step: int, stage: str, last_good: Optional[int]):
  loss, grad_norm = float(metrics['loss']), float(metrics['grad_norm'])
  if not (np.isfinite(loss) and np.isfinite(grad_norm)):
    kept = f'step {last_good}' if last_good is not None else 'none yet'
    raise NonFiniteLossError(
        f'{stage}: loss {loss} / grad norm {grad_norm} at step {step} is not finite; stopped '
        f'(last good checkpoint: {kept}). Lower the learning rate or check the data.')


def _compile_and_meet(train_step, args, stage: str):
  """The step compiled for `args`. Processes then meet: compiling can take minutes longer
  on one (a compilation cache miss), and their first collectives must start together."""
  compiled = train_step.lower(*args).compile()
  parallel.sync(f'{stage}: compiled')
  return compiled


def _initial_state(checkpointer: checkpoint.Checkpointer, init_params, tx, shardings,
                   stage: str):
  """(state, step): the latest checkpoint's, restored straight into `shardings` (whatever
  mesh wrote it), or a fresh state from `init_params` at step 0."""
  abstract = checkpoint.with_shardings(state_lib.abstract_state(init_params, tx), shardings)
  restored = checkpointer.restore_latest(abstract)
  if restored is None:
    return TrainState.create_sharded(parallel.put(init_params, shardings.params), tx,
                                     shardings), 0
  state, meta = restored
  logging.info('%s: resumed from step %d', stage, int(meta['step']))
  return state, int(meta['step'])


def train(config: ml_collections.ConfigDict, stage_dir: str, *, stage: str, init_params,
          frozen, loss_fn: LossFn, batches: Callable[[int], Iterator[Mapping[str, np.ndarray]]],
          sample_fn: Optional[Callable[[Any], np.ndarray]] = None, seed: int = 0,
          param_axes=None):
  """Runs (or resumes) training; returns the final EMA params (also saved to disk).

  config: the stage's training section (steps, batch_size, optimizer, ema_decay,
    grad_accum_steps, log_every, checkpoint_every, keep_checkpoints, sample_every).
  batches(start_step): an iterator of this process's slices of the batches from that step on.
  sample_fn(params): images [N, H, W, 3] in [0, 1] for the periodic grid.
  param_axes: the logical axes of init_params (parallel.logical_axes(module)), which place
    them on the mesh; without them (and for `frozen`) params are replicated.
  """
  layout = parallel.current_layout()
  layout.check_batch_size(config.batch_size, f'{stage}.batch_size', config.grad_accum_steps)
  os.makedirs(stage_dir, exist_ok=True)
  tx = make_optimizer(config.optimizer, config.steps)
  shardings = state_lib.state_shardings(
      state_lib.abstract_state(init_params, tx),
      layout.param_shardings(init_params, param_axes), layout.replicated)
  checkpointer = checkpoint.Checkpointer(os.path.join(stage_dir, 'checkpoints'),
                                         config.checkpoint_every, config.keep_checkpoints)
  # Processes that spent different times getting here (compiling, loading) meet before
  # the collectives of restoring and training.
  parallel.sync(f'{stage}: train')
  state, start_step = _initial_state(checkpointer, init_params, tx, shardings, stage)
  frozen = parallel.put(frozen, layout.replicated)
  train_step = make_train_step(loss_fn, config.ema_decay, config.grad_accum_steps, layout,
                               shardings)
  writer = create_writer(stage_dir)
  report = periodic_actions.ReportProgress(num_train_steps=config.steps, writer=writer,
                                           every_steps=config.log_every)
  sigterm = _SigtermFlag()
  previous_handler = signal.signal(signal.SIGTERM, sigterm)
  base_rng = jax.random.key(seed)
  last_good = checkpointer.latest_step()
  try:
    step = start_step
    for step, batch in zip(range(start_step + 1, config.steps + 1), batches(start_step)):
      args = (state, frozen, layout.shard_batch(batch), jax.random.fold_in(base_rng, step))
      if step == start_step + 1:
        train_step = _compile_and_meet(train_step, args, stage)
      state, metrics = train_step(*args)
      report(step)
      if step % config.log_every == 0 or step == config.steps:
        metrics = jax.device_get(metrics)
        _check_finite(metrics, step, stage, last_good)
        writer.write_scalars(step, metrics)
      if sample_fn is not None and (step % config.sample_every == 0 or step == config.steps):
        write_sample_grid(writer, stage_dir, step, sample_fn(state.ema_params))
      # Every process must stop at the same step: the checkpoint is written by all of them.
      preempted = parallel.any_process(sigterm.raised)
      if checkpointer.should_save(step) or step == config.steps or preempted:
        _check_finite(jax.device_get(metrics), step, stage, last_good)
        checkpointer.save(step, state, {'step': step, 'data_position': step})
        last_good = step
      if preempted:
        raise Preempted(f'{stage}: SIGTERM at step {step}; checkpoint saved, rerun the same '
                        'command to resume')
    if step < config.steps:
      raise RuntimeError(f'{stage}: the input pipeline ended at step {step} of {config.steps}')
  finally:
    signal.signal(signal.SIGTERM, previous_handler)
    writer.flush()
    checkpointer.close()  # waits for a save in flight, so the last good checkpoint is whole
  checkpoint.save_params(os.path.join(stage_dir, FINAL_PARAMS), state.ema_params)
  return state.ema_params


def write_sample_grid(writer, stage_dir: str, step: int, samples: np.ndarray) -> None:
  grid = image_io.make_grid(samples)
  if jax.process_index() == 0:
    image_io.save_png(os.path.join(stage_dir, 'samples', f'step_{step:06d}.png'), grid, upscale=4)
  writer.write_images(step, {'samples': grid[None]})
