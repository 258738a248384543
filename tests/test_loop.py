"""The training loop on a toy regression: resume, NaN stop, SIGTERM, gradient accumulation.

`python -m tests.test_loop WORKDIR` is one process of the two-process SIGTERM run
(launch/local.py starts them)."""
import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import shapes
from instaflow_jax import checkpoint
from instaflow_jax import parallel
from instaflow_jax import workdir
from instaflow_jax import workdir as workdir_lib
from instaflow_jax.training import loop
from instaflow_jax.training import state as state_lib
from instaflow_jax.training import step as step_lib
from tests import runs


def toy_config(steps=12, **overrides):
  config = shapes.training_config(quick=True, steps=steps)
  config.update(dict(dict(checkpoint_every=4, log_every=1, sample_every=1000), **overrides))
  config.optimizer.lr = 0.1
  return config


class Killed(Exception):
  """Stands for the process dying between two steps."""


def toy_loss(params, frozen, batch, rng, step):
  prediction = batch['x'] @ params['w'] + frozen['bias']
  noise = 0.01 * jax.random.normal(rng, prediction.shape)  # uses the step's RNG
  return jnp.mean((prediction + noise - batch['y']) ** 2), {'w_norm': jnp.linalg.norm(params['w'])}


def toy_batches(start_step, fail_at=None, on_step=None, kill_at=None, scale_at=None):
  step = start_step
  while True:
    step += 1
    if on_step:
      on_step(step)
    if step == kill_at:
      raise Killed
    rng = np.random.default_rng(step)
    x = rng.normal(size=(8, 4)).astype(np.float32)
    y = x @ np.arange(4, dtype=np.float32)
    if fail_at is not None and step >= fail_at:
      y = y * np.float32(np.nan)
    y = y * np.float32((scale_at or {}).get(step, 1.0))
    yield {'x': x, 'y': y}


def run(stage_dir, config, **batch_kwargs):
  return loop.train(config, str(stage_dir), stage='toy', init_params={'w': jnp.zeros(4)},
                    frozen={'bias': jnp.float32(0.5)}, loss_fn=toy_loss,
                    batches=lambda start: toy_batches(start, **batch_kwargs))


def test_training_reduces_the_loss_and_writes_final_params(tmp_path):
  params = run(tmp_path / 'a', toy_config(steps=40))
  rows = loop.read_metrics(str(tmp_path / 'a'))
  losses = [r['loss'] for r in rows if 'loss' in r]
  assert len(losses) == 40 and losses[-1] < 0.5 * losses[0]
  restored = checkpoint.load_params(str(tmp_path / 'a' / workdir_lib.FINAL_PARAMS),
                                    checkpoint.abstract_like(params))
  np.testing.assert_array_equal(restored['w'], params['w'])
  assert sorted(os.listdir(tmp_path / 'a' / 'checkpoints')) == ['36', '40']  # keep 2


def test_resume_continues_exactly(tmp_path):
  reference = run(tmp_path / 'ref', toy_config())
  with pytest.raises(Killed):  # dies at step 10, after the checkpoint of step 8
    run(tmp_path / 'cut', toy_config(), kill_at=10)
  assert loop.read_metrics(str(tmp_path / 'cut'))[-1]['step'] == 9
  resumed = run(tmp_path / 'cut', toy_config())
  np.testing.assert_array_equal(resumed['w'], reference['w'])
  ref_rows = {r['step']: r for r in loop.read_metrics(str(tmp_path / 'ref'))}
  for row in loop.read_metrics(str(tmp_path / 'cut')):
    if 'loss' in row:
      assert row['loss'] == ref_rows[row['step']]['loss'], row['step']


def heavy_toy_loss(params, frozen, batch, rng, step):
  """toy_loss, with work for the device that takes far longer than dispatching the step."""
  m = frozen['m']
  for _ in range(3):
    m = jnp.tanh(m @ m)
  loss, aux = toy_loss(params, frozen, batch, rng, step)
  return loss + 0 * jnp.mean(m), aux


def test_steps_per_sec_counts_the_steps_done_not_those_dispatched(tmp_path):
  # The host dispatches steps ahead of the device: timed at dispatch, the first report
  # counted steps not yet done, hundreds of times the true rate (and an ETA as far off).
  loop.train(toy_config(steps=30, log_every=10, checkpoint_every=1000), str(tmp_path),
             stage='toy', init_params={'w': jnp.zeros(4)},
             frozen={'bias': jnp.float32(0.5), 'm': jnp.full((512, 512), 1 / 512)},
             loss_fn=heavy_toy_loss, batches=toy_batches)
  first, *later = [r['steps_per_sec'] for r in loop.read_metrics(str(tmp_path))
                   if 'steps_per_sec' in r]
  assert len(later) == 2
  assert first < 3 * max(later), (first, later)  # a margin for a busy machine's swings


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  with pytest.raises(loop.NonFiniteLossError,
                     match=r'toy: loss nan .* at step 6 is not finite; stopped. step 4 is the '
                           r'last checkpoint from before the divergence; the same command with '
                           r'a lower toy.optimizer.lr \(now 0.1\) resumes from step 4'):
    run(tmp_path, toy_config(), fail_at=6)
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['4']
  assert not workdir_lib.is_complete(str(tmp_path))


def test_a_spike_before_the_nan_keeps_the_checkpoint_from_before_it(tmp_path):
  # Step 6's loss is 10^6 times the others: checkpoint 8 is not written, step 10 is NaN,
  # and checkpoint 4 (whose successor, step 5, was healthy) is the one to resume from.
  with pytest.raises(loop.NonFiniteLossError, match='resumes from step 4'):
    run(tmp_path, toy_config(), fail_at=10, scale_at={6: 1e3})
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['4']
  reference = run(tmp_path / 'ref', toy_config())
  resumed = run(tmp_path, toy_config())
  np.testing.assert_array_equal(resumed['w'], reference['w'])


def test_divergence_sets_aside_later_checkpoints_and_a_lower_lr_restarts(tmp_path):
  config = toy_config(checkpoint_every=1)
  config.optimizer.update(lr=1e30, warmup_steps=0)  # params of step 1 are ~1e30
  with pytest.raises(loop.NonFiniteLossError,
                     match=r'no checkpoint is from before the divergence \(moved \[1\] to .*'
                           r'rejected_checkpoints\); the same command with a lower '
                           r'toy.optimizer.lr \(now 1e\+30\) restarts the stage'):
    run(tmp_path, config)
  assert os.listdir(tmp_path / 'checkpoints') == []
  assert os.listdir(tmp_path / workdir.REJECTED_DIR) == ['1-diverged']
  params = run(tmp_path, toy_config(checkpoint_every=1))
  np.testing.assert_array_equal(params['w'], run(tmp_path / 'ref', toy_config())['w'])


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path, monkeypatch):
  def preempt(step):
    if step == 7:
      os.kill(os.getpid(), signal.SIGTERM)
  # One process stops at the next step, between preemption checks, asking no other.
  monkeypatch.setattr(parallel, 'any_process', None)
  config = toy_config(log_every=100, preemption_check_every=5)
  with pytest.raises(loop.Preempted, match='SIGTERM at step 7'):
    run(tmp_path, config, on_step=preempt)
  assert '7' in os.listdir(tmp_path / 'checkpoints')
  reference = run(tmp_path / 'ref', config)
  resumed = run(tmp_path, config)
  np.testing.assert_array_equal(resumed['w'], reference['w'])


def two_process_sigterm(workdir: str) -> None:
  """One of two processes: process 1 gets SIGTERM at step 7, between the preemption checks
  of steps 4 and 8. Writes the steps at which this process asked the others, and how the
  run ended, to WORKDIR/process_I.json."""
  parallel.initialize_distributed()
  step_now, asked = [0], []
  any_process = parallel.any_process
  parallel.any_process = lambda flag: asked.append(step_now[0]) or any_process(flag)

  def on_step(step):
    step_now[0] = step
    if step == 7 and jax.process_index() == 1:
      os.kill(os.getpid(), signal.SIGTERM)
  config = toy_config(steps=20, log_every=100, checkpoint_every=100, preemption_check_every=4)
  try:
    run(os.path.join(workdir, 'toy'), config, on_step=on_step)
    ending = 'finished'
  except loop.Preempted as e:
    ending = str(e)
  with open(os.path.join(workdir, f'process_{jax.process_index()}.json'), 'w') as f:
    json.dump({'asked_at': asked, 'ending': ending}, f)


@pytest.mark.slow  # two processes
def test_processes_agree_on_sigterm_only_every_n_steps(tmp_path):
  command = [sys.executable, os.path.join('launch', 'local.py'), '--num_processes=2',
             '--devices_per_process=1', '--', '-m', 'tests.test_loop', str(tmp_path)]
  result = subprocess.run(command, cwd=runs.REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, result.stderr[-3000:]
  for process in (0, 1):
    with open(tmp_path / f'process_{process}.json') as f:
      outcome = json.load(f)
    assert outcome['asked_at'] == [4, 8], process  # not at every step
    assert outcome['ending'].startswith('toy: SIGTERM at step 8; checkpoint saved'), process
  assert os.listdir(tmp_path / 'toy' / 'checkpoints') == ['8']


def test_gradient_accumulation_matches_the_full_batch():
  config = toy_config()
  batch, frozen = next(toy_batches(0)), {'bias': jnp.float32(0.5)}
  mse = lambda p, f, b, rng, step: (jnp.mean((b['x'] @ p['w'] + f['bias'] - b['y']) ** 2), {})
  results = []
  for micro_batches in (1, 2, 4):
    state = loop.TrainState.create({'w': jnp.ones(4)}, loop.make_optimizer(config.optimizer, 10))
    step = step_lib.make_train_step(mse, 0.9, micro_batches)
    results.append(step(state, frozen, batch, jax.random.key(0)))
  for state, metrics in results[1:]:
    np.testing.assert_allclose(metrics['loss'], results[0][1]['loss'], rtol=1e-6)
    np.testing.assert_allclose(metrics['grad_norm'], results[0][1]['grad_norm'], rtol=1e-6)
    np.testing.assert_allclose(state.params['w'], results[0][0].params['w'], rtol=1e-6)


def damage(step_dir):
  """Cuts the largest file of a checkpoint to half, as a full disk or a dead copy does."""
  files = [os.path.join(d, f) for d, _, names in os.walk(step_dir) for f in names]
  largest = max(files, key=os.path.getsize)
  with open(largest, 'r+b') as f:
    f.truncate(os.path.getsize(largest) // 2)


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path):
  with pytest.raises(Killed):
    run(tmp_path, toy_config(), kill_at=10)  # checkpoints 4 and 8
  damage(tmp_path / 'checkpoints' / '8')
  resumed = run(tmp_path, toy_config())
  np.testing.assert_array_equal(resumed['w'], run(tmp_path / 'ref', toy_config())['w'])
  assert os.listdir(tmp_path / workdir.REJECTED_DIR) == ['8-damaged']


def test_every_checkpoint_damaged_stops_in_one_line_and_moves_nothing(tmp_path):
  with pytest.raises(Killed):
    run(tmp_path, toy_config(), kill_at=10)
  for step in ('4', '8'):
    damage(tmp_path / 'checkpoints' / step)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r'checkpoints/8 is damaged \(.*\) and no older checkpoint restores; '
                           r'delete .*checkpoints to restart the stage'):
    run(tmp_path, toy_config())
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['4', '8']


def test_resuming_with_another_model_names_the_parameter(tmp_path):
  with pytest.raises(Killed):
    run(tmp_path, toy_config(), kill_at=6)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r'checkpoints/4 does not fit the model config: parameter w has shape '
                           r'\(4,\) in the checkpoint but \(5,\) in the model config'):
    loop.train(toy_config(), str(tmp_path), stage='toy', init_params={'w': jnp.zeros(5)},
               frozen={'bias': jnp.float32(0.5)}, loss_fn=toy_loss, batches=toy_batches)


def test_ema_warms_up_so_a_short_run_averages_trained_weights():
  decays = [float(state_lib.ema_warmup(0.995, jnp.int32(step))) for step in (0, 10, 1000, 10**4)]
  np.testing.assert_allclose(decays, [0.1, 11 / 20, 1001 / 1010, 0.995], rtol=1e-6)
  state = loop.TrainState.create({'w': jnp.zeros(4)}, optax.sgd(1.0))
  state = state.apply_gradients({'w': -jnp.ones(4)}, ema_decay=0.995)  # params become 1
  np.testing.assert_allclose(state.ema_params['w'], 0.9)  # 0.1 * 0 + 0.9 * 1


if __name__ == '__main__':
  two_process_sigterm(sys.argv[1])
