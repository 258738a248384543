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
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers
from clu import periodic_actions

from instaflow_jax import checkpoint
from instaflow_jax import images as image_io
from instaflow_jax import parallel
from instaflow_jax import workdir as workdir_lib
from instaflow_jax.training import state as state_lib
from instaflow_jax.training.state import TrainState
from instaflow_jax.training.state import make_optimizer
from instaflow_jax.training.step import LossFn
from instaflow_jax.training.step import make_train_step



class NonFiniteLossError(FloatingPointError):
  """The loss or the gradient became NaN/inf: `stage` and the learning rate `lr` it had."""

  def __init__(self, message: str, stage: str, lr: float):
    super().__init__(message)
    self.stage, self.lr = stage, lr


class Preempted(SystemExit):
  """SIGTERM arrived; a checkpoint was saved."""





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


def _stop_for_sigterm(sigterm: _SigtermFlag, step: int, check_every: int,
                      waits_anyway: bool) -> bool:
  """Whether every process stops after `step` for a SIGTERM: they must stop at the same
  step, since all of them write the checkpoint. A single process stops at once. Several
  agree through a host round trip, which stalls the dispatch of the steps ahead, so only
  every `check_every` steps and at the steps that wait for the devices anyway
  (`waits_anyway`: those that log or save)."""
  if jax.process_count() == 1:
    return sigterm.raised
  if step % check_every and not waits_anyway:
    return False
  return parallel.any_process(sigterm.raised)


# A step whose loss or gradient norm is this many times its running mean (over the
# healthy steps before it) is taken as diverging: the periodic checkpoint that would
# follow it is not written, so that a NaN stop leaves one from before the divergence.
SPIKE_FACTORS = {'loss': 10.0, 'grad_norm': 100.0}
_MEAN_DECAY = 0.9


class DivergenceGuard:
  """Watches every step's loss and gradient norm.

  Checkpoint k holds the params that step k + 1 evaluates: it is good when step k + 1 was
  healthy (finite, within SPIKE_FACTORS of the running means). A periodic checkpoint is
  written only when every step since the last one was healthy, so every checkpoint but
  the latest is good, and the latest is judged by the step after it.
  """

  def __init__(self, means: Optional[dict], last_saved: Optional[int]):
    self.means = dict(means) if means else None
    self.last_saved = last_saved          # the latest checkpoint (None: none yet)
    self._successor_healthy = None        # of step last_saved + 1, once seen
    self.healthy_since_save = True

  def observe(self, step: int, values: Mapping[str, float]) -> bool:
    """Records step `step`'s loss and grad_norm; returns whether they are finite."""
    finite = all(np.isfinite(values[k]) for k in SPIKE_FACTORS)
    healthy = finite and (self.means is None or all(
        values[k] <= factor * self.means[k] for k, factor in SPIKE_FACTORS.items()))
    if healthy:
      self.means = {k: values[k] if self.means is None else
                    _MEAN_DECAY * self.means[k] + (1 - _MEAN_DECAY) * values[k]
                    for k in SPIKE_FACTORS}
    self.healthy_since_save &= healthy
    if self.last_saved is not None and step == self.last_saved + 1:
      self._successor_healthy = healthy
    return finite

  def saved(self, step: int) -> None:
    self.last_saved, self._successor_healthy, self.healthy_since_save = step, None, True

  def last_good(self, checkpoints) -> Optional[int]:
    """The newest of `checkpoints` (steps on disk) from before the divergence."""
    good = [s for s in checkpoints if s != self.last_saved or self._successor_healthy]
    return max(good, default=None)


def _stop_diverged(guard: DivergenceGuard, checkpointer: checkpoint.Checkpointer, stage: str,
                   step: int, values: Mapping[str, float], lr: float):
  """Sets aside the checkpoints written after the divergence began, so that rerunning
  resumes from the last good one (or restarts the stage), and raises NonFiniteLossError."""
  checkpointer.wait()
  steps = checkpointer.all_steps()
  good = guard.last_good(steps)
  diverged = [s for s in steps if good is None or s > good]
  if diverged:
    checkpointer.reject(diverged, 'diverged')
  where = (f'step {good} is the last checkpoint from before the divergence' if good is not None
           else 'no checkpoint is from before the divergence')
  moved = f' (moved {diverged} to {checkpointer.rejected_dir})' if diverged else ''
  then = f'resumes from step {good}' if good is not None else 'restarts the stage'
  raise NonFiniteLossError(
      f'{stage}: loss {values["loss"]} / grad norm {values["grad_norm"]} at step {step} is '
      f'not finite; stopped. {where}{moved}; the same command with a lower '
      f'{stage}.optimizer.lr (now {lr:g}) {then}', stage=stage, lr=lr)


def _compile_and_meet(train_step, args, stage: str):
  """The step compiled for `args`. Processes then meet: compiling can take minutes longer
  on one (a compilation cache miss), and their first collectives must start together."""
  compiled = train_step.lower(*args).compile()
  parallel.sync(f'{stage}: compiled')
  return compiled


def _initial_state(checkpointer: checkpoint.Checkpointer, init_params, tx, shardings,
                   stage: str):
  """(state, meta): the latest checkpoint's, restored straight into `shardings` (whatever
  mesh wrote it), or a fresh state from `init_params` with the meta of step 0."""
  abstract = checkpoint.with_shardings(state_lib.abstract_state(init_params, tx), shardings)
  restored = checkpointer.restore_latest(abstract)
  if restored is None:
    return TrainState.create_sharded(parallel.put(init_params, shardings.params), tx,
                                     shardings), {'step': 0}
  state, meta = restored
  logging.info('%s: resumed from step %d', stage, int(meta['step']))
  return state, meta


def train(config: ml_collections.ConfigDict, stage_dir: str, *, stage: str, init_params,
          frozen, loss_fn: LossFn, batches: Callable[[int], Iterator[Mapping[str, np.ndarray]]],
          sample_fn: Optional[Callable[[Any], np.ndarray]] = None, seed: int = 0,
          param_axes=None, run_config: Optional[ml_collections.ConfigDict] = None,
          stage_params: Callable[[Any], Any] = lambda params: params):
  """Runs (or resumes) training; returns the final EMA params, of which
  stage_params(params) are saved as the stage's final params (all of them by default).

  config: the stage's training section (steps, batch_size, optimizer, ema_decay,
    grad_accum_steps, log_every, checkpoint_every, keep_checkpoints, sample_every,
    preemption_check_every).
  batches(start_step): an iterator of this process's slices of the batches from that step on.
  sample_fn(params): images [N, H, W, 3] in [0, 1] for the periodic grid.
  param_axes: the logical axes of init_params (parallel.logical_axes(module)), which place
    them on the mesh; without them (and for `frozen`) params are replicated.
  run_config: the whole config, written to stage_dir/config.json once the checkpoints
    on disk have been checked against the model (a refused resume changes nothing).
  """
  layout = parallel.current_layout()
  layout.check_batch_size(config.batch_size, f'{stage}.batch_size', config.grad_accum_steps)
  os.makedirs(stage_dir, exist_ok=True)
  tx = make_optimizer(config.optimizer, config.steps)
  shardings = state_lib.state_shardings(
      state_lib.abstract_state(init_params, tx),
      layout.param_shardings(init_params, param_axes), layout.replicated)
  checkpointer = checkpoint.Checkpointer(os.path.join(stage_dir, workdir_lib.CHECKPOINTS),
                                         config.checkpoint_every, config.keep_checkpoints)
  # Processes that spent different times getting here (compiling, loading) meet before
  # the collectives of restoring and training.
  parallel.sync(f'{stage}: train')
  state, meta = _initial_state(checkpointer, init_params, tx, shardings, stage)
  start_step = int(meta['step'])
  if run_config is not None:
    workdir_lib.write_stage_config(stage_dir, run_config)
  frozen = parallel.put(frozen, layout.replicated)
  train_step = make_train_step(loss_fn, config.ema_decay, config.grad_accum_steps, layout,
                               shardings)
  writer = create_writer(stage_dir)
  report = periodic_actions.ReportProgress(num_train_steps=config.steps, writer=writer,
                                           every_steps=config.log_every)
  sigterm = _SigtermFlag()
  previous_handler = signal.signal(signal.SIGTERM, sigterm)
  base_rng = jax.random.key(seed)
  guard = DivergenceGuard(meta.get('means'), checkpointer.latest_step())
  unchecked = []  # (step, its loss and grad_norm on the device), fetched at log steps
  try:
    step = start_step
    for step, batch in zip(range(start_step + 1, config.steps + 1), batches(start_step)):
      args = (state, frozen, layout.shard_batch(batch), jax.random.fold_in(base_rng, step))
      if step == start_step + 1:
        train_step = _compile_and_meet(train_step, args, stage)
      state, metrics = train_step(*args)
      if step == start_step + 1:
        jax.block_until_ready(metrics)  # steps/s is timed from the end of the first step
      unchecked.append((step, {k: metrics[k] for k in SPIKE_FACTORS}))
      last = step == config.steps
      logged = step % config.log_every == 0 or last
      scheduled_save = checkpointer.should_save(step) or last
      preempted = _stop_for_sigterm(sigterm, step, config.preemption_check_every,
                                    logged or scheduled_save)
      saving = scheduled_save or preempted
      if logged or saving:
        for seen, values in jax.device_get(unchecked):
          values = {k: float(v) for k, v in values.items()}
          if not guard.observe(seen, values):
            _stop_diverged(guard, checkpointer, stage, seen, values, config.optimizer.lr)
        unchecked = []
      # After the fetch above, which waits for this step: steps are dispatched ahead of the
      # device, and timed at their dispatch the first report would count steps not yet done.
      report(step)
      if logged:
        writer.write_scalars(step, jax.device_get(metrics))
      if sample_fn is not None and (step % config.sample_every == 0 or last):
        write_sample_grid(writer, stage_dir, step, sample_fn(state.ema_params))
      if saving and not (guard.healthy_since_save or last or preempted):
        logging.warning('%s: no checkpoint at step %d: the loss or gradient norm spiked since '
                        'the last one (step %s)', stage, step, guard.last_saved)
      elif saving:
        checkpointer.save(step, state, {'step': step, 'data_position': step,
                                        'means': guard.means})
        guard.saved(step)
      if preempted:
        raise Preempted(f'{stage}: SIGTERM at step {step}; checkpoint saved, rerun the same '
                        'command to resume')
    if step < config.steps:
      raise RuntimeError(f'{stage}: the input pipeline ended at step {step} of {config.steps}')
  finally:
    signal.signal(signal.SIGTERM, previous_handler)
    writer.flush()
    checkpointer.close()  # waits for a save in flight, so the last good checkpoint is whole
  checkpoint.save_params(os.path.join(stage_dir, workdir_lib.FINAL_PARAMS),
                         stage_params(state.ema_params))
  return state.ema_params


def write_sample_grid(writer, stage_dir: str, step: int, samples: np.ndarray) -> None:
  grid = image_io.make_grid(samples)
  if jax.process_index() == 0:
    image_io.save_png(os.path.join(stage_dir, 'samples', f'step_{step:06d}.png'), grid, upscale=4)
  writer.write_images(step, {'samples': grid[None]})
