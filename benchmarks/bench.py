"""Ours (Flax) against the PyTorch reference (diffusers / transformers), same weights, same
inputs, same machine, with random weights (nothing is downloaded).

  .venv/bin/python benchmarks/bench.py --config small          # this CPU, float32, ~5 min
  python3 benchmarks/bench.py --config sd15 --out bench.json   # SD 1.5 shapes, bf16, a GPU

The reference models are built from their configs with a fixed seed and their state dicts
are converted into ours with torch_state_to_flax, so both sides compute the same function;
one float32 forward pass checks that. Then, in the config's compute dtype: one-step
generation (text encoder on the padded tokens, one U-Net evaluation at time 1000, VAE
decode), the U-Net alone, the pairs stage's teacher solve (text encoder, 25 Euler steps
with classifier-free guidance), and a U-Net training step (f32 master weights, AdamW).

Each framework runs in a child process of its own: neither holds GPU memory the other needs,
peak-memory counters start clean, and a hard time limit can end one without losing the
other's numbers (a child rewrites its results file after every measurement). Both children
run with glibc's huge-page tunable, as our command lines do (instaflow_jax/huge_pages.py).
Ours goes first; the reference gets what is left of the budget, eager mode first, then
torch.compile while time remains. Times are medians over --repeats calls after warm-up;
compile time is reported on its own. --rounds N runs the pair N times, alternating which
side goes first, and pools each measurement's timed calls over the rounds (the ratio of
each round is printed too): on a shared VM whose speed drifts within minutes, one pair of
children can favour either side.
"""
import argparse
import concurrent.futures
import contextlib
import copy
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 0
TIMESTEP = 1000.0  # what the network sees at flow time 0, the one Euler step from noise
WARMUP_CALLS = 2   # the first call (compile, cuDNN autotuning) and one more
OURS, EAGER, COMPILED = 'ours', 'torch_eager', 'torch_compile'
ADAMW = dict(lr=1e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """Model configs (diffusers / transformers constructor kwargs) and run sizes."""
  unet: Dict[str, Any]
  vae: Dict[str, Any]
  text: Dict[str, Any]
  budget_s: float            # wall-time cap of the whole run
  torch_reserve_s: float     # left to the reference's eager measurements when ours ends
  compile_min_left_s: float  # a torch.compile measurement starts only with this much left
  run_reserve_s: float       # our compiles stop being waited for this long before our deadline
  e2e_batches: tuple = (1, 16)
  unet_batches: tuple = (1, 8)
  train_batch: int = 8
  check_latent_size: int = 8
  pairs_batch: int = 8       # prompts per teacher solve
  pairs_steps: int = 25      # Euler steps of the teacher
  guidance: float = 5.0      # classifier-free guidance of the teacher (the paper's w)
  dtype: str = 'bfloat16'    # compute dtype of every measurement but the float32 check

  @property
  def latent_size(self) -> int:
    return self.unet['sample_size']

  @property
  def image_size(self) -> int:
    return self.latent_size * 2 ** (len(self.vae['block_out_channels']) - 1)


def _sd_unet(channels, layers, heads, cross_dim, groups, sample_size, levels_with_attention):
  levels = len(channels)
  plain = levels - levels_with_attention
  return dict(sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=layers,
              block_out_channels=channels, norm_num_groups=groups,
              down_block_types=('CrossAttnDownBlock2D',) * levels_with_attention
              + ('DownBlock2D',) * plain,
              up_block_types=('UpBlock2D',) * plain
              + ('CrossAttnUpBlock2D',) * levels_with_attention,
              attention_head_dim=heads, cross_attention_dim=cross_dim)


def _sd_vae(channels, layers, groups, sample_size):
  return dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=channels,
              down_block_types=('DownEncoderBlock2D',) * len(channels),
              up_block_types=('UpDecoderBlock2D',) * len(channels), layers_per_block=layers,
              norm_num_groups=groups, sample_size=sample_size, scaling_factor=0.18215)


def _clip_text(vocab, hidden, layers, heads, intermediate):
  # SD 1.5's text_encoder/config.json token ids (eos_token_id=2: legacy argmax pooling).
  return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
              num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
              hidden_act='quick_gelu', projection_dim=hidden, bos_token_id=0, eos_token_id=2,
              pad_token_id=1)


CONFIGS = {
    'sd15': BenchConfig(
        unet=_sd_unet((320, 640, 1280, 1280), 2, 8, 768, 32, 64, levels_with_attention=3),
        vae=_sd_vae((128, 256, 512, 512), 2, 32, 512),
        text=_clip_text(49408, 768, 12, 12, 3072),
        budget_s=280, torch_reserve_s=90, compile_min_left_s=40, run_reserve_s=30),
    # SD 1.5's layout scaled down to run in seconds on a CPU (8.6M-parameter U-Net, 16x16
    # latents, 128px images), in float32: a CPU has no fast bf16.
    'small': BenchConfig(
        unet=_sd_unet((32, 64, 128, 128), 2, 4, 64, 8, 16, levels_with_attention=3),
        vae=_sd_vae((32, 64, 64, 64), 1, 8, 128),
        text=_clip_text(1000, 64, 2, 4, 128),
        budget_s=900, torch_reserve_s=420, compile_min_left_s=120, run_reserve_s=30,
        e2e_batches=(1, 8), unet_batches=(1, 8), train_batch=8, pairs_batch=4,
        dtype='float32'),
}


# ---- Inputs, the same numpy arrays on both sides ---------------------------------------

def token_ids(cfg: BenchConfig, batch: int, seed: int = 1) -> np.ndarray:
  """Random prompts (seed 1), or with another seed the negative prompts of guidance."""
  shape = (batch, cfg.text['max_position_embeddings'])
  return np.random.RandomState(seed).randint(0, cfg.text['vocab_size'], shape).astype(np.int32)


UNCOND_SEED = 6


def normal(seed: int, shape) -> np.ndarray:
  return np.random.RandomState(seed).standard_normal(shape).astype(np.float32)


def latents(cfg: BenchConfig, batch: int, size: Optional[int] = None) -> np.ndarray:
  """N(0, I) noise, NHWC."""
  size = size or cfg.latent_size
  return normal(2, (batch, size, size, cfg.unet['in_channels']))


def text_states(cfg: BenchConfig, batch: int) -> np.ndarray:
  return normal(3, (batch, cfg.text['max_position_embeddings'], cfg.unet['cross_attention_dim']))


def train_batch(cfg: BenchConfig) -> Dict[str, np.ndarray]:
  """A flow-matching batch: x_s, network time, text states, velocity target (NHWC)."""
  b = cfg.train_batch
  s = np.random.RandomState(4).uniform(size=b).astype(np.float32)
  noise, data = latents(cfg, b), normal(5, (b, cfg.latent_size, cfg.latent_size, 4))
  x = s[:, None, None, None] * data + (1 - s[:, None, None, None]) * noise
  return dict(x=x, t=TIMESTEP * (1 - s), context=text_states(cfg, b), target=data - noise)


def nchw(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def nhwc(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def max_rel_diff(ours: np.ndarray, ref: np.ndarray) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


# ---- Timing ---------------------------------------------------------------------------

def time_calls(call: Callable[[], Any], wait: Callable[[Any], Any], repeats: int) -> dict:
  """First-call time, then the median of `repeats` calls after WARMUP_CALLS warm-up calls."""
  start = time.perf_counter()
  wait(call())
  first = time.perf_counter() - start
  for _ in range(WARMUP_CALLS - 1):
    wait(call())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    wait(call())
    times.append(time.perf_counter() - start)
  return dict(first_call_s=first, median_s=statistics.median(times), times_s=times)


def per_item(result: dict, items: int) -> dict:
  return dict(result, items=items, items_per_s=items / result['median_s'])


def _rss_kib(field: str) -> int:
  with open('/proc/self/status') as f:
    return int(next(line for line in f if line.startswith(field)).split()[1])


def cpu_peak_bytes(call: Callable[[], Any], wait: Callable[[Any], Any]) -> Optional[int]:
  """How far one call raises the process's resident memory above where it stood (Linux).

  Neither torch nor XLA keeps CPU allocator statistics, so both sides are measured the same
  way: glibc is first made to hand freed memory back (malloc_trim) and to map every block
  of 64 KiB or more on its own (a fixed mmap threshold), so that what a call allocates shows
  in the resident set and what it frees leaves it; then the kernel's peak (VmHWM) is reset
  and read after the call. Call it after timing: the allocator change can cost speed."""
  import ctypes
  try:
    libc = ctypes.CDLL('libc.so.6')
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 64 * 1024)
    libc.malloc_trim(0)
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')  # resets VmHWM to the current resident set
  except OSError:
    return None
  before = _rss_kib('VmRSS:')
  wait(call())
  return 1024 * (_rss_kib('VmHWM:') - before)


class Recorder:
  """One child's results, rewritten to its file after every change (the parent may kill it)."""

  def __init__(self, path: str, deadline: float, name: str):
    self.path, self.deadline, self.name = path, deadline, name
    self.start = time.time()
    self.data = {'measurements': {}}

  def left(self) -> float:
    return self.deadline - time.time()

  def log(self, message: str) -> None:
    print(f'[{self.name} +{time.time() - self.start:.0f}s] {message}', flush=True)

  def put(self, section: str, key: str, value: Any) -> None:
    self.data.setdefault(section, {})[key] = value
    self._write()

  def measure(self, name: str, impl: str, run: Callable[[], dict], need_s: float = 0.0) -> None:
    """Records run() (or its error, or a skip when less than need_s is left) under name/impl."""
    if self.left() < need_s:
      result = {'skipped': f'out of time ({self.left():.0f} s left, {need_s:.0f} s needed)'}
    else:
      try:
        result = run()
      except Exception as e:  # one failed measurement must not end the run
        traceback.print_exc()
        result = {'error': f'{type(e).__name__}: {e}'[:2000]}
    self.data['measurements'].setdefault(name, {})[impl] = result
    self._write()
    self.log(f'{impl} {name}: {_summary(result)}')

  def update(self, name: str, impl: str, **values) -> None:
    """Adds values to a recorded measurement."""
    self.data['measurements'].setdefault(name, {}).setdefault(impl, {}).update(values)
    self._write()
    self.log(f'{impl} {name}: {values}')

  def _write(self) -> None:
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(self.data, f, indent=1, default=float)
    os.replace(tmp, self.path)


def _summary(result: dict) -> str:
  if 'median_s' not in result:
    return result.get('error') or result.get('skipped') or str(result)
  text = f"median {1e3 * result['median_s']:.2f} ms"
  if 'items_per_s' in result:
    text += f", {result['items_per_s']:.2f} images/s"
  if result.get('compile_s') is not None:
    text += f", compile {result['compile_s']:.1f} s"
  return text + f", first call {result['first_call_s']:.2f} s"


# ---- The reference models --------------------------------------------------------------

def build_reference(cfg: BenchConfig) -> dict:
  """diffusers/transformers models with seeded random weights, float32, on the CPU.

  Built on the CPU in both children so that both get the same weights."""
  import torch
  from diffusers import AutoencoderKL, UNet2DConditionModel
  from transformers import CLIPTextConfig, CLIPTextModel
  torch.manual_seed(SEED)
  return dict(unet=UNet2DConditionModel(**cfg.unet).eval(),
              vae=AutoencoderKL(**cfg.vae).eval(),
              text_encoder=CLIPTextModel(CLIPTextConfig(**cfg.text)).eval())


def torch_teacher_pairs(parts: dict, ids, uncond_ids, noise, cfg: BenchConfig):
  """The pairs stage's teacher: N Euler steps at times (1 - i/N)*1000 with classifier-free
  guidance, both branches in one batch [uncond; text] (as the released pipeline does)."""
  import torch
  states = torch.cat([parts['text_encoder'](uncond_ids)[0], parts['text_encoder'](ids)[0]])
  x, n = noise, cfg.pairs_steps
  for i in range(n):
    t = torch.full((2 * x.shape[0],), TIMESTEP * (1 - i / n), device=x.device)
    v = parts['unet'](torch.cat([x, x]), t, encoder_hidden_states=states, return_dict=False)[0]
    v_uncond, v_text = v.chunk(2)
    x = x + (v_uncond + cfg.guidance * (v_text - v_uncond)) / n
  return x


def torch_generate(parts: dict, ids, noise, scaling_factor: float):
  """One-step generation: text states, v = unet(noise, 1000), decode(noise + v), to [0, 1]."""
  import torch
  states = parts['text_encoder'](ids)[0]
  t = torch.full((noise.shape[0],), TIMESTEP, device=noise.device)
  v = parts['unet'](noise, t, encoder_hidden_states=states, return_dict=False)[0]
  images = parts['decode']((noise + v) / scaling_factor, return_dict=False)[0]
  return (images.float() / 2 + 0.5).clamp(0, 1)


# ---- Ours -------------------------------------------------------------------------------

def run_ours(cfg: BenchConfig, args, rec: Recorder) -> None:
  import instaflow_jax  # noqa: F401  (first: its XLA flags apply to the backend started here)
  import jax
  import jax.numpy as jnp
  devices = jax.devices()  # initialise the accelerator before torch is imported
  import flax
  import optax
  from instaflow_jax import pipeline
  from instaflow_jax.convert import diffusers as diffusers_io
  from instaflow_jax.flow import samplers

  rec.put('environment', OURS, dict(
      jax=jax.__version__, flax=flax.__version__, optax=optax.__version__,
      backend=jax.default_backend(), device=devices[0].device_kind, devices=len(devices)))
  configs = {'unet': cfg.unet, 'vae': cfg.vae, 'text_encoder': cfg.text}

  def modules(dtype, param_dtype):
    return {name: spec.module(spec.read_config(configs[name]), dtype=dtype,
                              param_dtype=param_dtype)
            for name, spec in diffusers_io.COMPONENTS.items()}

  compute = jnp.dtype(cfg.dtype)
  f32 = modules(jnp.float32, jnp.float32)
  low = modules(compute, compute)
  train_unet = modules(compute, jnp.float32)['unet']
  the_modules = pipeline.PipelineModules(low['unet'], low['vae'], low['text_encoder'])
  reference, params = _reference_params(cfg, f32, rec)
  params = jax.device_put(params)
  params_low = jax.tree.map(lambda p: p.astype(compute), params)
  scaling_factor = f32['vae'].config.scaling_factor
  tx = optax.adamw(ADAMW['lr'], b1=ADAMW['b1'], b2=ADAMW['b2'], eps=ADAMW['eps'],
                   weight_decay=ADAMW['weight_decay'])

  def check_fn(p, ids, noise):
    states = f32['text_encoder'].apply({'params': p['text']}, ids)[0]
    v = f32['unet'].apply({'params': p['unet']}, noise, jnp.full(noise.shape[:1], TIMESTEP),
                          states)
    decoded = f32['vae'].apply({'params': p['vae']}, (noise + v) / scaling_factor,
                               method='decode')
    return states, v, decoded

  def generate(p, ids, noise):
    return pipeline.sample_images(the_modules, p, ids, None, noise, jnp.float32(0.0),
                                  samplers.Solver('euler', 1))[0]

  def teacher_pairs(p, ids, uncond_ids, noise):
    return pipeline.sample_latents(the_modules, p, ids, uncond_ids, noise,
                                   jnp.float32(cfg.guidance),
                                   samplers.Solver('euler', cfg.pairs_steps)).x1

  def unet_forward(p, x, t, states):
    return low['unet'].apply({'params': p}, x, t, states)

  def train_step(state, batch):
    unet_params, opt_state = state

    def loss_fn(p):
      v = train_unet.apply({'params': p}, batch['x'], batch['t'], batch['context'])
      return jnp.mean(jnp.square(v.astype(jnp.float32) - batch['target']))

    loss, grads = jax.value_and_grad(loss_fn)(unet_params)
    updates, opt_state = tx.update(grads, opt_state, unet_params)
    return (optax.apply_updates(unet_params, updates), opt_state), loss

  check_inputs = (params, token_ids(cfg, 1), latents(cfg, 1, cfg.check_latent_size))
  shape_of = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
  abstract_state = jax.tree.map(shape_of, (params['unet'], jax.eval_shape(tx.init, params['unet'])))
  low_in = lambda x: jnp.asarray(x, compute)
  tasks = {}  # name -> (function, arguments, matmul precision, donated arguments)
  if reference:
    tasks['check'] = (check_fn, check_inputs, 'highest', ())
  for b in cfg.e2e_batches:
    inputs = jax.device_put((token_ids(cfg, b), low_in(latents(cfg, b))))
    tasks[f'e2e_b{b}'] = (generate, (params_low,) + inputs, None, ())
  for b in cfg.unet_batches:
    inputs = (low_in(latents(cfg, b)), jnp.full((b,), TIMESTEP), low_in(text_states(cfg, b)))
    tasks[f'unet_b{b}'] = (unet_forward, (params_low['unet'],) + inputs, None, ())
  b = cfg.pairs_batch
  inputs = jax.device_put((token_ids(cfg, b), token_ids(cfg, b, UNCOND_SEED),
                           low_in(latents(cfg, b))))
  tasks[f'pairs_b{b}'] = (teacher_pairs, (params_low,) + inputs, None, ())
  batch = jax.device_put(train_batch(cfg))
  tasks[f'train_b{cfg.train_batch}'] = (train_step, (abstract_state, batch), None, (0,))
  rec.log(f'compiling {len(tasks)} executables, {args.compile_workers} at a time')
  compiled = _compile_all(tasks, args.compile_workers, cfg.run_reserve_s, rec)
  rec.log('compiled')

  def executable(name):
    outcome = compiled[name]
    if isinstance(outcome, BaseException):
      raise RuntimeError(f'compile failed: {type(outcome).__name__}: {outcome}')
    if outcome is None:
      raise RuntimeError('compile did not finish in time')
    return outcome

  def timed(name, args_, items, save=None):
    exe, compile_s = executable(name)
    result = time_calls(lambda: exe(*args_), jax.block_until_ready, args.repeats)
    if save:
      np.save(os.path.join(args.scratch, f'{OURS}_{name}.npy'), np.asarray(exe(*args_), np.float32))
    return per_item(dict(result, compile_s=compile_s, **_jax_memory(exe, devices[0])), items)

  def pairs():
    name = f'pairs_b{cfg.pairs_batch}'
    return timed(name, tasks[name][1], cfg.pairs_batch, save=True)

  if reference:
    rec.measure('check', OURS, lambda: _check(executable('check')[0], check_inputs, reference,
                                              scaling_factor))
  for b in cfg.e2e_batches:
    name = f'e2e_b{b}'
    rec.measure(name, OURS, lambda: timed(name, tasks[name][1], b, save=b == 1), need_s=5)
  for b in cfg.unet_batches:
    name = f'unet_b{b}'
    rec.measure(name, OURS, lambda: timed(name, tasks[name][1], b, save=b == 1), need_s=5)
  rec.measure(f'pairs_b{cfg.pairs_batch}', OURS, pairs, need_s=10)

  def train():
    exe, compile_s = executable(f'train_b{cfg.train_batch}')
    state = [(params['unet'], tx.init(params['unet']))]  # donated: the state lives in state[0]

    def step():
      state[0], loss = exe(state[0], batch)
      return loss

    result = time_calls(step, jax.block_until_ready, args.repeats)
    result = dict(result, compile_s=compile_s, final_loss=float(step()),
                  **_jax_memory(exe, devices[0]))
    if devices[0].platform == 'cpu':  # last: it changes the allocator (see cpu_peak_bytes)
      result['cpu_peak_bytes'] = cpu_peak_bytes(step, jax.block_until_ready)
    return per_item(result, cfg.train_batch)

  rec.measure(f'train_b{cfg.train_batch}', OURS, train, need_s=5)


def _compile_all(tasks: dict, workers: int, reserve_s: float, rec: Recorder) -> dict:
  """Lowers and compiles every task on a thread pool (XLA compiles release the GIL).

  Returns name -> (executable, seconds), the exception it raised, or None when it had not
  finished reserve_s before the deadline (the time kept for running what did compile)."""
  import jax

  def lower_and_compile(fn, args_, precision, donate):
    start = time.perf_counter()
    context = jax.default_matmul_precision(precision) if precision else contextlib.nullcontext()
    with context:
      exe = jax.jit(fn, donate_argnums=donate).lower(*args_).compile()
    return exe, time.perf_counter() - start

  start = time.perf_counter()
  pool = concurrent.futures.ThreadPoolExecutor(max(1, workers))
  # The check first (correctness matters most), then the slowest first (the training step,
  # then the big batches), to shorten the total.
  by_cost = sorted(tasks, key=lambda n: (n != 'check', not n.startswith('train'),
                                         -int(n.rsplit('_b', 1)[-1]) if '_b' in n else 0))
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
  """The executable's own footprint (compiler's estimate) and the process peak so far."""
  out = {}
  try:
    m = exe.memory_analysis()
    out['exe_bytes'] = int(m.argument_size_in_bytes + m.output_size_in_bytes
                           - m.alias_size_in_bytes + m.temp_size_in_bytes)
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
  import jax
  from flax import linen as nn
  from instaflow_jax.convert import diffusers as diffusers_io
  from instaflow_jax.convert.torch_names import torch_state_to_flax
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
          diffusers_io.COMPONENTS[name].fix_state(state), diffusers_io.abstract_variables(module),
          f'reference {name}')
    else:
      variables = jax.jit(module.init)(jax.random.key(SEED), *module.example_inputs())
      params[name] = nn.meta.unbox(variables)['params']
  rec.log('converted' if reference else 'initialised')
  return reference, {'unet': params['unet'], 'vae': params['vae'], 'text': params['text_encoder']}


def _check(exe, inputs, reference, scaling_factor) -> dict:
  """Float32 agreement with the reference on the CPU, per model, on small inputs."""
  import torch
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


# ---- The reference's timings ------------------------------------------------------------

def run_torch(cfg: BenchConfig, args, rec: Recorder) -> None:
  import diffusers
  import torch
  import transformers

  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  cuda = device.type == 'cuda'
  torch.backends.cudnn.benchmark = True
  rec.put('environment', 'torch', dict(
      torch=torch.__version__, diffusers=diffusers.__version__,
      transformers=transformers.__version__, device=str(device),
      name=torch.cuda.get_device_name() if cuda else 'cpu'))
  rec.log('building the reference models')
  reference = build_reference(cfg)
  torch.set_num_threads(os.cpu_count() or 1)  # XLA uses every core too
  compute = getattr(torch, cfg.dtype)
  scaling_factor = reference['vae'].config.scaling_factor
  on_device = lambda x: torch.from_numpy(x).to(device)

  def wait(_):
    if cuda:
      torch.cuda.synchronize()

  def memory(result):
    if cuda:
      result['peak_bytes'] = int(torch.cuda.max_memory_allocated())
    return result

  def timed(impl, name, call, items, save=None):
    if cuda:
      torch.cuda.reset_peak_memory_stats()
    result = time_calls(call, wait, args.repeats)
    if impl == COMPILED:
      result['compile_s'] = result['first_call_s']
    if save is not None:
      np.save(os.path.join(args.scratch, f'{impl}_{name}.npy'), save(call()))
    return per_item(memory(result), items)

  def low_parts():
    models = {k: copy.deepcopy(m).to(device=device, dtype=compute) for k, m in reference.items()}
    return dict(text_encoder=models['text_encoder'], unet=models['unet'],
                decode=models['vae'].decode)

  def inference(impl, parts, order, need_s):
    for kind, b in order:
      name = f'{kind}_b{b}'
      ids = on_device(token_ids(cfg, b)).long()
      noise = on_device(nchw(latents(cfg, b))).to(compute)
      if kind == 'e2e':
        call = lambda: torch_generate(parts, ids, noise, scaling_factor)
      elif kind == 'pairs':
        uncond_ids = on_device(token_ids(cfg, b, UNCOND_SEED)).long()
        call = lambda: torch_teacher_pairs(parts, ids, uncond_ids, noise, cfg)
      else:
        t = torch.full((b,), TIMESTEP, device=device)
        states = on_device(text_states(cfg, b)).to(compute)
        call = lambda: parts['unet'](noise, t, encoder_hidden_states=states, return_dict=False)[0]
      save = (lambda out: nhwc(out.float().cpu().numpy())) if b == 1 or kind == 'pairs' else None
      rec.measure(name, impl, lambda: timed(impl, name, call, b, save), need_s=need_s)

  order = ([('e2e', b) for b in cfg.e2e_batches] + [('unet', b) for b in cfg.unet_batches]
           + [('pairs', cfg.pairs_batch)])
  with torch.inference_mode():
    inference(EAGER, low_parts(), order, need_s=5)
  if cuda:
    torch.cuda.empty_cache()

  train_name, train_step = f'train_b{cfg.train_batch}', []
  rec.measure(train_name, EAGER,
              lambda: _torch_train(cfg, reference['unet'], device, compute, timed, train_step),
              need_s=5)
  if cuda:
    torch.cuda.empty_cache()
  if args.torch_compile == 'on' or (args.torch_compile == 'auto' and cuda):
    _torch_compiled_inference(cfg, low_parts, order, inference)
  if train_step and not cuda:  # last: it changes the allocator (see cpu_peak_bytes)
    rec.update(train_name, EAGER, cpu_peak_bytes=cpu_peak_bytes(train_step[0], wait))


def _torch_compiled_inference(cfg: BenchConfig, low_parts, order, inference) -> None:
  import torch
  # Static shapes: each batch size gets its own graph, as our jit does.
  torch._dynamo.config.automatic_dynamic_shapes = False
  torch._dynamo.config.cache_size_limit = 32
  with torch.inference_mode():
    parts = {k: torch.compile(m) for k, m in low_parts().items()}
    # The U-Net graph of unet_b1 is the one e2e_b1 needs, so that order compiles least.
    compile_order = sorted(order, key=lambda kb: (kb[1], kb[0] == 'e2e'))
    inference(COMPILED, parts, compile_order, need_s=cfg.compile_min_left_s)


def _torch_train(cfg: BenchConfig, unet_cpu, device, compute, timed, keep_step: list) -> dict:
  """Forward (under autocast when the compute dtype is not float32), f32 master weights,
  backward, AdamW step. The step is appended to keep_step, for a later memory measurement."""
  import torch
  unet = copy.deepcopy(unet_cpu).to(device).train()
  adamw = dict(lr=ADAMW['lr'], betas=(ADAMW['b1'], ADAMW['b2']), eps=ADAMW['eps'],
               weight_decay=ADAMW['weight_decay'])
  try:
    optimizer = torch.optim.AdamW(unet.parameters(), fused=True, **adamw)
  except (RuntimeError, TypeError):  # fused needs a recent torch on this device
    optimizer = torch.optim.AdamW(unet.parameters(), **adamw)
  batch = {k: torch.from_numpy(nchw(v) if v.ndim == 4 else v).to(device)
           for k, v in train_batch(cfg).items()}

  def step():
    with torch.autocast(device.type, dtype=compute, enabled=compute != torch.float32):
      v = unet(batch['x'], batch['t'], encoder_hidden_states=batch['context'],
               return_dict=False)[0]
    loss = torch.nn.functional.mse_loss(v.float(), batch['target'])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

  result = timed(EAGER, 'train', step, cfg.train_batch)
  result['final_loss'] = step().item()
  result['optimizer'] = 'AdamW(fused)' if optimizer.defaults.get('fused') else 'AdamW'
  keep_step.append(step)
  return result


# ---- The parent: children, merge, table -------------------------------------------------

SECTIONS = {OURS: run_ours, 'torch': run_torch}


def run_child(args, section: str, deadline: float, path: str) -> dict:
  """Runs one section in a child process group, killed a little after its deadline."""
  command = [sys.executable, os.path.abspath(__file__), '--config', args.config,
             '--repeats', str(args.repeats), '--section', section, '--deadline', str(deadline),
             '--partial', path, '--scratch', args.scratch, '--torch-compile', args.torch_compile,
             '--compile-workers', str(args.compile_workers)]
  from instaflow_jax import huge_pages
  # Both frameworks get the environment our command lines give themselves.
  env = huge_pages.with_huge_pages(dict(os.environ, PYTHONUNBUFFERED='1'))
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [REPO_ROOT, env.get('PYTHONPATH')]))
  start = time.time()
  child = subprocess.Popen(command, env=env, start_new_session=True)
  try:
    status = 'ok' if child.wait(timeout=max(1.0, deadline - start + 10)) == 0 else 'failed'
  except subprocess.TimeoutExpired:
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    status = 'killed at its time limit'
  info = dict(status=status, returncode=child.returncode, wall_s=time.time() - start)
  print(f'== {section}: {status} after {info["wall_s"]:.0f} s', flush=True)
  return info


def run_section(args) -> None:
  """In a child: run one section, recording as it goes."""
  cfg = CONFIGS[args.config]
  rec = Recorder(args.partial, args.deadline, args.section)
  try:
    SECTIONS[args.section](cfg, args, rec)
  except Exception as e:
    traceback.print_exc()
    rec.put('errors', args.section, f'{type(e).__name__}: {e}'[:2000])
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(0)  # do not wait for compile threads still running, nor tear down big arrays


def merge(parts: Dict[str, dict]) -> dict:
  merged = {'measurements': {}}
  for part in parts.values():
    for key, value in part.items():
      if key == 'measurements':
        for name, impls in value.items():
          merged['measurements'].setdefault(name, {}).update(impls)
      else:
        merged.setdefault(key, {}).update(value)
  return merged


def agreement(cfg: BenchConfig, scratch: str) -> dict:
  """Max relative difference of ours vs eager torch on the saved outputs (batch 1, pairs)."""
  diffs = {}
  for name in ('e2e_b1', 'unet_b1', f'pairs_b{cfg.pairs_batch}'):
    files = [os.path.join(scratch, f'{impl}_{name}.npy') for impl in (OURS, EAGER)]
    if all(os.path.exists(f) for f in files):
      diffs[name] = max_rel_diff(*(np.load(f) for f in files))
  return diffs


def _cell(result: Optional[dict], value: Callable[[dict], float], fmt: str) -> str:
  if not result:
    return '-'
  if 'median_s' not in result:
    return 'error' if 'error' in result else 'skipped'
  return fmt.format(value(result))


def _ratio(ours: Optional[dict], ref: Optional[dict]) -> str:
  if not (ours and ref and 'median_s' in ours and 'median_s' in ref):
    return '-'
  return f"{ref['median_s'] / ours['median_s']:.2f}x"


def table(cfg: BenchConfig, results: dict) -> str:
  """Ours vs the reference; ratio = reference time / our time (above 1: ours is faster)."""
  rows = []
  ms = lambda r: 1e3 * r['median_s']
  for b in cfg.e2e_batches:
    unit, value, fmt = (('ms', ms, '{:.1f}') if b == 1 else
                        ('img/s', lambda r: r['items_per_s'], '{:.2f}'))
    rows.append((f'e2e {cfg.image_size}px b{b} ({unit})', f'e2e_b{b}', value, fmt))
  for b in cfg.unet_batches:
    rows.append((f'unet b{b} (ms)', f'unet_b{b}', ms, '{:.2f}'))
  rows.append((f'pairs b{cfg.pairs_batch}, {cfg.pairs_steps} steps w={cfg.guidance:g} (pairs/s)',
               f'pairs_b{cfg.pairs_batch}', lambda r: r['items_per_s'], '{:.2f}'))
  train = f'train_b{cfg.train_batch}'
  rows.append((f'train b{cfg.train_batch} {cfg.latent_size}x{cfg.latent_size} (img/s)', train,
               lambda r: r['items_per_s'], '{:.2f}'))
  header = (f"{'measurement':<30} {'ours':>10} {'torch eager':>12} {'ratio':>7} "
            f"{'torch.compile':>14} {'ratio':>7}")
  lines = [header, '-' * len(header)]
  measurements = results.get('measurements', {})
  for label, name, value, fmt in rows:
    m = measurements.get(name, {})
    lines.append(f'{label:<30} {_cell(m.get(OURS), value, fmt):>10} '
                 f'{_cell(m.get(EAGER), value, fmt):>12} {_ratio(m.get(OURS), m.get(EAGER)):>7} '
                 f'{_cell(m.get(COMPILED), value, fmt):>14} '
                 f'{_ratio(m.get(OURS), m.get(COMPILED)):>7}')
  m = measurements.get(train, {})
  ours, eager = m.get(OURS) or {}, m.get(EAGER) or {}
  mem = lambda r, key: _size(r[key]) if r.get(key) is not None else 'n/a'
  if 'cpu_peak_bytes' in ours or 'cpu_peak_bytes' in eager:
    lines.append(f"train step peak memory above the resident set: ours "
                 f"{mem(ours, 'cpu_peak_bytes')}, torch {mem(eager, 'cpu_peak_bytes')}; "
                 f"ours {mem(ours, 'exe_bytes')} by the compiler (arguments + outputs + temps)")
  else:
    lines.append(f"train peak memory: ours {mem(ours, 'exe_bytes')} (executable), "
                 f"{mem(ours, 'process_peak_bytes')} (process peak); "
                 f"torch {mem(eager, 'peak_bytes')}")
  compile_line = []
  for name in [r[1] for r in rows]:
    ours_s = (measurements.get(name, {}).get(OURS) or {}).get('compile_s')
    ref_s = (measurements.get(name, {}).get(COMPILED) or {}).get('compile_s')
    compile_line.append(f"{name} {'-' if ours_s is None else f'{ours_s:.0f}'}"
                        f"/{'-' if ref_s is None else f'{ref_s:.0f}'}")
  lines.append('compile s (ours/torch.compile): ' + ', '.join(compile_line))
  wall = (results.get('compile') or {}).get(OURS, {}).get('wall_s')
  if wall is not None:
    lines.append(f'ours compiled all executables concurrently in {wall:.0f} s wall')
  check = measurements.get('check', {}).get(OURS)
  lines.append(f'fp32 max rel diff vs reference ({cfg.check_latent_size}x'
               f'{cfg.check_latent_size} latents): {_format_diffs(check)}')
  lines.append(f"{cfg.dtype} max rel diff vs eager reference: "
               f"{_format_diffs(results.get('agreement'))}")
  return '\n'.join(lines)


def _size(n: int) -> str:
  return f'{n / 2 ** 30:.1f} GiB' if n >= 2 ** 30 else f'{n / 2 ** 20:.0f} MiB'


def _format_diffs(diffs: Optional[dict]) -> str:
  if not diffs:
    return 'n/a'
  if 'error' in diffs or 'skipped' in diffs:
    return diffs.get('error') or diffs['skipped']
  return ', '.join(f'{k} {v:.2e}' for k, v in diffs.items())


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', choices=sorted(CONFIGS), default='sd15')
  parser.add_argument('--out', help='write all numbers to this JSON file')
  parser.add_argument('--repeats', type=int, default=10, help='timed calls per measurement')
  parser.add_argument('--rounds', type=int, default=1,
                      help='run both sides this many times, alternating which goes first, '
                           'and pool the timed calls (this shared VM drifts within minutes)')
  parser.add_argument('--budget-s', type=float,
                      help='wall-time cap per round (default: per config)')
  parser.add_argument('--torch-compile', choices=('auto', 'on', 'off'), default='auto',
                      help='measure torch.compile too (auto: on CUDA only)')
  parser.add_argument('--compile-workers', type=int, default=min(6, os.cpu_count() or 1),
                      help='how many of our executables compile at a time')
  parser.add_argument('--sections', default=','.join(SECTIONS),
                      help='comma-separated subset of: ' + ', '.join(SECTIONS))
  # Set by the parent for its children.
  parser.add_argument('--section', choices=sorted(SECTIONS), help=argparse.SUPPRESS)
  parser.add_argument('--deadline', type=float, help=argparse.SUPPRESS)
  parser.add_argument('--partial', help=argparse.SUPPRESS)
  parser.add_argument('--scratch', help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def run_round(args, cfg: BenchConfig, sections: List[str], budget: float) -> Tuple[dict, dict]:
  """Each section's child once, in this order, within `budget` seconds from now: (merged
  results, each child's status)."""
  start, parts, statuses = time.time(), {}, {}
  # While the other side still has to run, a side gets its share of the budget only.
  share = {OURS: budget - cfg.torch_reserve_s, 'torch': cfg.torch_reserve_s}
  for i, section in enumerate(sections):
    deadline = start + (share[section] if sections[i + 1:] else budget)
    path = os.path.join(args.scratch, f'{section}.json')
    if os.path.exists(path):
      os.remove(path)  # the round before's
    statuses[section] = run_child(args, section, deadline, path)
    if os.path.exists(path):
      with open(path) as f:
        parts[section] = json.load(f)
  return merge(parts), statuses


def pooled(rounds: List[dict]) -> dict:
  """The first round's results with every timed measurement's calls pooled over all rounds
  (its median and images/s recomputed from them) and the highest peak memory."""
  results = copy.deepcopy(rounds[0])
  for name, impls in results['measurements'].items():
    for impl, result in impls.items():
      per_round = [r['measurements'].get(name, {}).get(impl) or {} for r in rounds]
      times = [t for r in per_round for t in r.get('times_s', [])]
      if 'times_s' in result and times:
        result.update(times_s=times, median_s=statistics.median(times))
        if 'items' in result:
          result['items_per_s'] = result['items'] / result['median_s']
      peaks = [r['cpu_peak_bytes'] for r in per_round if r.get('cpu_peak_bytes') is not None]
      if peaks:
        result['cpu_peak_bytes'] = max(peaks)
  for later in rounds[1:]:
    for section, error in (later.get('errors') or {}).items():
      results.setdefault('errors', {}).setdefault(section, error)
  return results


def ratios_by_round(rounds: List[dict]) -> str:
  lines = []
  for name in rounds[0]['measurements']:
    cells = [_ratio(r['measurements'].get(name, {}).get(OURS),
                    r['measurements'].get(name, {}).get(EAGER)) for r in rounds]
    if any(c != '-' for c in cells):
      lines.append(f'  {name:<12} ' + ' '.join(f'{c:>7}' for c in cells))
  return '\n'.join(lines)


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.section:
    return run_section(args)
  cfg = CONFIGS[args.config]
  start = time.time()
  budget = args.budget_s or cfg.budget_s
  sections = [s for s in args.sections.split(',') if s]
  results: Dict[str, Any] = {'config': args.config, 'repeats': args.repeats, 'budget_s': budget,
                             'rounds': args.rounds, 'model_configs': dataclasses.asdict(cfg),
                             'sections': {}}
  rounds = []
  with tempfile.TemporaryDirectory(prefix='gpu_bench_') as scratch:
    args.scratch = scratch
    for r in range(args.rounds):
      # Odd rounds run the children in the other order, so that a machine that speeds up or
      # slows down during the run favours neither side.
      order = sections if r % 2 == 0 else sections[::-1]
      if args.rounds > 1:
        print(f'== round {r + 1} of {args.rounds}: {", ".join(order)}', flush=True)
      merged, statuses = run_round(args, cfg, order, budget)
      rounds.append(merged)
      for section, status in statuses.items():
        results['sections'][section if args.rounds == 1 else f'{section}_{r + 1}'] = status
    results.update(pooled(rounds))
    results['agreement'] = agreement(cfg, scratch)
  if args.rounds > 1:
    results['by_round'] = rounds
  results['wall_s'] = time.time() - start
  pooled_note = f' pooled over {args.rounds} rounds' if args.rounds > 1 else ''
  print(f'\n== {args.config}: ours (Flax) vs reference (diffusers/transformers), {cfg.dtype}, '
        f'median of {args.repeats}{pooled_note}; wall {results["wall_s"]:.0f} s')
  for section, env in (results.get('environment') or {}).items():
    print(f'   {section}: {env}')
  for section, error in (results.get('errors') or {}).items():
    print(f'   {section} failed: {error}')
  print(table(cfg, results))
  if args.rounds > 1:
    print('ratio (torch eager / ours) in each round:\n' + ratios_by_round(rounds))
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
      json.dump(results, f, indent=1, default=float)
    print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
