"""bench.py's runner for ours: the Flax models on the reference's weights, every executable
compiled ahead of time, then timed. The training step is the trainer's own
(training/step.py's make_train_step over training/flow_loss.py's flow-matching loss)."""
import concurrent.futures
import contextlib
import functools
import os
import time
import traceback

import numpy as np

import bench_configs
from bench_configs import SEED
from bench_configs import TIMESTEP
from bench_configs import BenchConfig
from bench_measure import OURS
from bench_measure import Recorder
from bench_measure import cpu_peak_bytes
from bench_measure import max_rel_diff
from bench_measure import per_item
from bench_measure import time_calls
from bench_torch import build_reference

TRAIN_STEP = ('training/step.py make_train_step over training/flow_loss.py flow_matching_loss: '
              'uniform times, the batch\'s coupled noise, caption dropout, forward (remat as '
              'configured), l2 loss, backward, the loss and gradient-norm metrics, global-norm '
              'clipping, AdamW with warm-up (training/state.py make_optimizer), EMA; jit, the '
              'train state donated')


def run_ours(cfg: BenchConfig, args, rec: Recorder) -> None:
  import jax
  devices = jax.devices()  # initialise the accelerator before torch is imported
  import flax
  import optax

  rec.put('environment', OURS, dict(
      jax=jax.__version__, flax=flax.__version__, optax=optax.__version__,
      backend=jax.default_backend(), device=devices[0].device_kind, devices=len(devices)))
  import jax.numpy as jnp
  rows = bench_configs.select_rows(cfg, args.rows)
  compute = jnp.dtype(cfg.dtype)
  f32 = _modules(cfg, jnp.float32, jnp.float32)
  reference, params = _reference_params(cfg, f32, rec)
  params = jax.device_put(params)
  tasks = _inference_tasks(cfg, rows, f32, _modules(cfg, compute, compute), params, reference)
  tasks.update(_attention_tasks(cfg, rows))
  train_name = f'train_b{cfg.train_batch}'
  if train_name in rows:
    train = bench_configs.trainer_config()
    rec.put('train_settings', OURS, bench_configs.trainer_settings(train, cfg))
    tasks[train_name], make_train_state = _train_task(
        cfg, train, _modules(cfg, compute, jnp.float32), params['unet'])
  rec.log(f'compiling {len(tasks)} executables, {args.compile_workers} at a time')
  compiled = _compile_all(tasks, args.compile_workers, cfg.run_reserve_s, rec)
  rec.log('compiled')
  runner = _Runner(tasks, compiled, devices[0], args.repeats, args.scratch)

  if 'check' in tasks:
    scaling_factor = f32['vae'].config.scaling_factor
    rec.measure('check', OURS, lambda: _check(runner.executable('check')[0],
                                              tasks['check'][1], reference, scaling_factor))
  # Last: the train state takes over (and donates) the buffers of params['unet'].
  for name in sorted(set(rows) & set(tasks) - {'check'}, key=lambda n: (n == train_name,
                                                                         rows.index(n))):
    items = _items(cfg, name)
    if name == train_name:
      run = lambda: runner.train(name, make_train_state, items)
    else:
      run = lambda: runner.timed(name, items, save=name in bench_configs.compared_rows(cfg))
    rec.measure(name, OURS, run, need_s=10 if name.startswith('pairs') else 5)


def _items(cfg: BenchConfig, name: str) -> int:
  """The images (or attention batch entries) a row's call makes."""
  return cfg.attention_batch if name.startswith('attn') else int(name.rsplit('_b', 1)[1])


def _modules(cfg: BenchConfig, dtype, param_dtype) -> dict:
  """Our U-Net, VAE and text encoder for the config, computing in dtype."""
  from instaflow_jax.convert import diffusers as diffusers_io
  configs = {'unet': cfg.unet, 'vae': cfg.vae, 'text_encoder': cfg.text}
  return {name: spec.module(spec.read_config(configs[name]), dtype=dtype,
                            param_dtype=param_dtype)
          for name, spec in diffusers_io.COMPONENTS.items()}


def _pipeline_modules(modules: dict):
  from instaflow_jax import sampling
  return sampling.PipelineModules(modules['unet'], modules['vae'], modules['text_encoder'])


def _inference_tasks(cfg: BenchConfig, rows, f32: dict, low: dict, params: dict,
                     reference) -> dict:
  """name -> (jitted function, arguments, matmul precision) of each inference row in `rows`:
  the float32 check (with the reference only), one-step generation, U-Net, teacher pairs,
  the stacked student."""
  import jax
  import jax.numpy as jnp
  from instaflow_jax import sampling
  from instaflow_jax.flow import samplers
  from instaflow_jax.models import formulations
  compute = jnp.dtype(cfg.dtype)
  the_modules = _pipeline_modules(low)
  params_low = jax.tree.map(lambda p: p.astype(compute), params)
  scaling_factor = f32['vae'].config.scaling_factor
  low_in = lambda x: jnp.asarray(x, compute)

  def check_fn(p, ids, noise):
    states = f32['text_encoder'].apply({'params': p['text']}, ids)[0]
    v = f32['unet'].apply({'params': p['unet']}, noise, jnp.full(noise.shape[:1], TIMESTEP),
                          states)
    decoded = f32['vae'].apply({'params': p['vae']}, (noise + v) / scaling_factor,
                               method='decode')
    return states, v, decoded

  def generate(p, ids, noise):
    return sampling.sample_images(the_modules, p, ids, None, noise, jnp.float32(0.0),
                                  samplers.Solver('euler', 1))[0]

  def teacher_pairs(p, ids, uncond_ids, noise):
    return sampling.sample_latents(the_modules, p, ids, uncond_ids, noise,
                                   jnp.float32(cfg.guidance),
                                   samplers.Solver('euler', cfg.pairs_steps)).x1

  def forward(model):
    return lambda p, x, t, states: model.apply({'params': p}, x, t, states)

  def unet_inputs(b):
    return (low_in(bench_configs.latents(cfg, b)), jnp.full((b,), TIMESTEP),
            low_in(bench_configs.text_states(cfg, b)))

  tasks = {}
  if reference and 'check' in rows:
    check_inputs = (params, bench_configs.token_ids(cfg, 1),
                    bench_configs.latents(cfg, 1, cfg.check_latent_size))
    tasks['check'] = (formulations.jit(check_fn), check_inputs, 'highest')
  for b in cfg.e2e_batches:
    inputs = jax.device_put((bench_configs.token_ids(cfg, b),
                             low_in(bench_configs.latents(cfg, b))))
    tasks[f'e2e_b{b}'] = (formulations.jit(generate), (params_low,) + inputs, None)
  for b in cfg.unet_batches:
    tasks[f'unet_b{b}'] = (formulations.jit(forward(low['unet'])), (params_low['unet'],) + unet_inputs(b),
                           None)
  b = cfg.pairs_batch
  inputs = jax.device_put((bench_configs.token_ids(cfg, b),
                           bench_configs.token_ids(cfg, b, bench_configs.UNCOND_SEED),
                           low_in(bench_configs.latents(cfg, b))))
  tasks[f'pairs_b{b}'] = (formulations.jit(teacher_pairs), (params_low,) + inputs, None)
  stacked_rows = [f'stacked_b{b}' for b in cfg.stacked_batches if f'stacked_b{b}' in rows]
  if stacked_rows:
    stacked, stacked_params = _stacked_student(low['unet'], params_low['unet'])
    for name in stacked_rows:
      b = _items(cfg, name)
      tasks[name] = (formulations.jit(forward(stacked)), (stacked_params,) + unet_inputs(b), None)
  return {name: task for name, task in tasks.items() if name in rows}


def _stacked_student(unet, unet_params):
  """configs/instaflow_1_7b.py's student, two of `unet` in series, both halves copied from
  unet_params as the distill stage initialises them: (module, params)."""
  from instaflow_jax.models import stacked_unet
  config = stacked_unet.StackedUNetConfig(unet.config, **bench_configs.stacked_settings())
  model = stacked_unet.StackedUNet(config, dtype=unet.dtype, param_dtype=unet.param_dtype)
  return model, stacked_unet.init_from_unet(unet_params, config)


def _attention_tasks(cfg: BenchConfig, rows) -> dict:
  """jax.nn.dot_product_attention alone, each implementation, forward and forward+backward
  (the three input gradients for a given output gradient), on cfg.attention_shape."""
  import jax
  import jax.numpy as jnp
  from instaflow_jax.models import formulations
  if not cfg.attention_batch:
    return {}
  q, k, v, grad = (jnp.asarray(bench_configs.normal(seed, cfg.attention_shape), cfg.dtype)
                   for seed in bench_configs.ATTENTION_SEEDS)
  tasks = {}
  for impl in bench_configs.ATTENTION:
    attend = functools.partial(jax.nn.dot_product_attention, implementation=impl)

    def forward_backward(q, k, v, grad, attend=attend):
      return jax.vjp(attend, q, k, v)[1](grad)

    tasks[f'attn_{impl}_fwd'] = (formulations.jit(attend), (q, k, v), None)
    tasks[f'attn_{impl}_fwdbwd'] = (formulations.jit(forward_backward), (q, k, v, grad), None)
  return {name: task for name, task in tasks.items() if name in rows}


def _train_task(cfg: BenchConfig, train, train_modules: dict, unet_params):
  """The trainer's step as the reflow stage builds it for the training section `train`, on
  the teacher's pairs with cached text states (so the frozen text encoder is not part of
  it), the U-Net rematerialised as the config says: ((jitted step, abstract arguments, None),
  a function making the real train state from unet_params)."""
  import jax
  from instaflow_jax.training import flow_loss
  from instaflow_jax.training import step as step_lib
  from instaflow_jax.training import state as state_lib
  tx = state_lib.make_optimizer(train.optimizer, train.steps)
  policy = bench_configs.remat_policy(cfg)
  if policy != 'none':  # the U-Net's default
    train_modules = dict(train_modules, unet=train_modules['unet'].clone(remat_policy=policy))
  loss_fn = flow_loss.flow_matching_loss(_pipeline_modules(train_modules), train)
  step = step_lib.make_train_step(loss_fn, train.ema_decay, train.grad_accum_steps)
  frozen = {'null_embeds': bench_configs.null_text_states(cfg)}
  inputs = jax.device_put((frozen, bench_configs.train_batch(cfg))) + (jax.random.key(SEED),)
  abstract_args = (state_lib.abstract_state(unet_params, tx),) + inputs
  return (step, abstract_args, None), lambda: state_lib.TrainState.create(unet_params, tx)


class _Runner:
  """Runs the compiled executables: timed, with their memory, saving outputs to compare."""

  def __init__(self, tasks: dict, compiled: dict, device, repeats: int, scratch: str):
    self.tasks, self.compiled, self.device = tasks, compiled, device
    self.repeats, self.scratch = repeats, scratch

  def executable(self, name: str):
    outcome = self.compiled[name]
    if isinstance(outcome, BaseException):
      raise RuntimeError(f'compile failed: {type(outcome).__name__}: {outcome}')
    if outcome is None:
      raise RuntimeError('compile did not finish in time')
    return outcome

  def timed(self, name: str, items: int, save: bool = False) -> dict:
    import jax
    exe, compile_s = self.executable(name)
    args = self.tasks[name][1]
    result = time_calls(lambda: exe(*args), jax.block_until_ready, self.repeats)
    if save:
      np.save(os.path.join(self.scratch, f'{OURS}_{name}.npy'), np.asarray(exe(*args), np.float32))
    return per_item(dict(result, compile_s=compile_s, **_jax_memory(exe, self.device)), items)

  def train(self, name: str, make_state, items: int) -> dict:
    """Steps of the trainer's executable, the state carried from one to the next."""
    import jax
    exe, compile_s = self.executable(name)
    inputs = self.tasks[name][1][1:]
    state = [make_state()]  # donated at each step: the live state is in state[0]

    def step():
      # The outputs of one execution are ready together: waiting on the metrics waits on
      # the whole update.
      state[0], metrics = exe(state[0], *inputs)
      return metrics

    result = time_calls(step, jax.block_until_ready, self.repeats)
    result = dict(result, compile_s=compile_s, final_loss=float(step()['loss']),
                  includes=TRAIN_STEP, **_jax_memory(exe, self.device))
    if self.device.platform == 'cpu':  # last: it changes the allocator (see cpu_peak_bytes)
      result['cpu_peak_bytes'] = cpu_peak_bytes(step, jax.block_until_ready)
    return per_item(result, items)


def _compile_all(tasks: dict, workers: int, reserve_s: float, rec: Recorder) -> dict:
  """Lowers and compiles every task on a thread pool (XLA compiles release the GIL).

  Returns name -> (executable, seconds), the exception it raised, or None when it had not
  finished reserve_s before the deadline (the time kept for running what did compile)."""
  import jax

  def lower_and_compile(jitted, args_, precision):
    start = time.perf_counter()
    context = jax.default_matmul_precision(precision) if precision else contextlib.nullcontext()
    with context:
      exe = jitted.lower(*args_).compile()
    return exe, time.perf_counter() - start

  start = time.perf_counter()
  pool = concurrent.futures.ThreadPoolExecutor(max(1, workers))
  # The check first (correctness matters most), then the slowest first (the training step,
  # the stacked student, the one-step pipeline, the U-Net, the rest), to shorten the total.
  slowest = ('check', 'train', 'stacked', 'e2e', 'unet')
  kind = lambda name: name.split('_')[0]
  by_cost = sorted(tasks, key=lambda n: slowest.index(kind(n)) if kind(n) in slowest
                   else len(slowest))
  futures = {name: pool.submit(lower_and_compile, *tasks[name]) for name in by_cost}
  concurrent.futures.wait(futures.values(), timeout=max(0.0, rec.left() - reserve_s))
  pool.shutdown(wait=False, cancel_futures=True)
  outcomes = {}
  for name, future in futures.items():
    if not future.done():
      outcomes[name] = None
    elif future.exception() is not None:
      outcomes[name] = future.exception()
      traceback.print_exception(future.exception())
    else:
      outcomes[name] = future.result()
  rec.put('compile', OURS, dict(
      wall_s=time.perf_counter() - start, workers=workers,
      seconds={n: (o[1] if isinstance(o, tuple) else None) for n, o in outcomes.items()}))
  return outcomes


def _jax_memory(exe, device) -> dict:
  """The executable's own footprint (the compiler's: arguments + outputs - donated +
  temporaries) and the process peak so far. On an accelerator the former is the row's peak
  (peak_bytes); on a CPU, whose allocator it does not describe, only the training step's
  peak is measured (cpu_peak_bytes)."""
  out = {}
  try:
    m = exe.memory_analysis()
    out['exe_bytes'] = int(m.argument_size_in_bytes + m.output_size_in_bytes
                           - m.alias_size_in_bytes + m.temp_size_in_bytes)
    if device.platform != 'cpu':
      out['peak_bytes'] = out['exe_bytes']
  except Exception:  # not every backend reports it
    pass
  try:
    out['process_peak_bytes'] = int(device.memory_stats()['peak_bytes_in_use'])
  except Exception:
    pass
  return out


def _reference_params(cfg: BenchConfig, modules: dict, rec: Recorder):
  """(reference models, their weights converted into ours, keyed as the pipeline expects).

  Without the reference (diffusers missing, say), ours still runs, on its own random init."""
  from instaflow_jax.convert import diffusers as diffusers_io
  from instaflow_jax.convert.torch_names import torch_state_to_flax
  from instaflow_jax.models.abstract import abstract_variables
  from instaflow_jax.models.abstract import init_params
  rec.log('building the reference models')
  try:
    reference = build_reference(cfg)
  except Exception as e:
    traceback.print_exc()
    rec.put('errors', 'reference', f'{type(e).__name__}: {e}; ours runs on its own random init')
    reference = None
  params = {}
  for name, module in modules.items():
    if reference:
      state = {k: v.detach().numpy() for k, v in reference[name].state_dict().items()}
      params[name] = torch_state_to_flax(
          diffusers_io.COMPONENTS[name].fix_state(state), abstract_variables(module),
          f'reference {name}')
    else:
      params[name] = init_params(module, SEED)
  rec.log('converted' if reference else 'initialised')
  return reference, {'unet': params['unet'], 'vae': params['vae'], 'text': params['text_encoder']}


def _check(exe, inputs, reference, scaling_factor) -> dict:
  """Float32 agreement with the reference on the CPU, per model, on small inputs."""
  import torch
  nchw, nhwc = bench_configs.nchw, bench_configs.nhwc
  params, ids, noise = inputs
  ours = [np.asarray(x) for x in exe(*inputs)]
  with torch.no_grad():
    x = torch.from_numpy(nchw(noise))
    states = reference['text_encoder'](torch.from_numpy(ids).long())[0]
    v = reference['unet'](x, torch.full((1,), TIMESTEP), encoder_hidden_states=states).sample
    decoded = reference['vae'].decode((x + v) / scaling_factor).sample
  return {'text_encoder': max_rel_diff(ours[0], states.numpy()),
          'unet': max_rel_diff(ours[1], nhwc(v.numpy())),
          'vae_decode': max_rel_diff(ours[2], nhwc(decoded.numpy()))}
