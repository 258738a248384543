"""bench.py's reference runner: diffusers / transformers models in PyTorch, eager, then
torch.compile while time remains. It imports no JAX: on a GPU, JAX would claim memory."""
import copy
import os
from typing import Callable

import numpy as np

import bench_configs
from bench_configs import TIMESTEP
from bench_configs import BenchConfig
from bench_measure import COMPILED
from bench_measure import EAGER
from bench_measure import Recorder
from bench_measure import cpu_peak_bytes
from bench_measure import per_item
from bench_measure import time_calls

TRAIN_STEP = ('uniform times, torch.randn noise, caption dropout, forward (under autocast '
              'below float32), MSE loss, backward, clip_grad_norm_ (the gradient norm), '
              'AdamW with LambdaLR warm-up, EMA by _foreach_lerp_; eager')


def build_reference(cfg: BenchConfig) -> dict:
  """diffusers/transformers models with seeded random weights, float32, on the CPU.

  Built on the CPU in both children so that both get the same weights."""
  import torch
  from diffusers import AutoencoderKL, UNet2DConditionModel
  from transformers import CLIPTextConfig, CLIPTextModel
  torch.manual_seed(bench_configs.SEED)
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


class _Timer:
  """Times calls on the device, with its peak memory on CUDA, saving outputs to compare."""

  def __init__(self, device, repeats: int, scratch: str):
    import torch
    self.torch, self.device, self.repeats, self.scratch = torch, device, repeats, scratch
    self.cuda = device.type == 'cuda'

  def wait(self, _):
    if self.cuda:
      self.torch.cuda.synchronize()

  def timed(self, impl: str, name: str, call: Callable, items: int, save=None) -> dict:
    if self.cuda:
      self.torch.cuda.reset_peak_memory_stats()
    result = time_calls(call, self.wait, self.repeats)
    if impl == COMPILED:
      result['compile_s'] = result['first_call_s']
    if save is not None:
      np.save(os.path.join(self.scratch, f'{impl}_{name}.npy'), save(call()))
    if self.cuda:
      result['peak_bytes'] = int(self.torch.cuda.max_memory_allocated())
    return per_item(result, items)

  def empty_cache(self):
    if self.cuda:
      self.torch.cuda.empty_cache()


def run_torch(cfg: BenchConfig, args, rec: Recorder) -> None:
  import diffusers
  import torch
  import transformers

  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  timer = _Timer(device, args.repeats, args.scratch)
  torch.backends.cudnn.benchmark = True
  rec.put('environment', 'torch', dict(
      torch=torch.__version__, diffusers=diffusers.__version__,
      transformers=transformers.__version__, device=str(device),
      name=torch.cuda.get_device_name() if timer.cuda else 'cpu'))
  rec.log('building the reference models')
  reference = build_reference(cfg)
  torch.set_num_threads(os.cpu_count() or 1)  # XLA uses every core too
  compute = getattr(torch, cfg.dtype)

  def low_parts():
    models = {k: copy.deepcopy(m).to(device=device, dtype=compute) for k, m in reference.items()}
    return dict(text_encoder=models['text_encoder'], unet=models['unet'],
                decode=models['vae'].decode)

  order = ([('e2e', b) for b in cfg.e2e_batches] + [('unet', b) for b in cfg.unet_batches]
           + [('pairs', cfg.pairs_batch)])
  scaling_factor = reference['vae'].config.scaling_factor
  with torch.inference_mode():
    _inference(cfg, rec, timer, EAGER, low_parts(), order, scaling_factor, need_s=5)
  timer.empty_cache()

  train = bench_configs.trainer_config()
  rec.put('train_settings', 'torch', bench_configs.trainer_settings(train))
  train_name, train_step = f'train_b{cfg.train_batch}', []
  rec.measure(train_name, EAGER,
              lambda: _train(cfg, train, reference['unet'], compute, timer, train_step),
              need_s=5)
  timer.empty_cache()
  if args.torch_compile == 'on' or (args.torch_compile == 'auto' and timer.cuda):
    _compiled_inference(cfg, rec, timer, low_parts, order, scaling_factor)
  if train_step and not timer.cuda:  # last: it changes the allocator (see cpu_peak_bytes)
    rec.update(train_name, EAGER, cpu_peak_bytes=cpu_peak_bytes(train_step[0], timer.wait))


def _inference(cfg: BenchConfig, rec: Recorder, timer: _Timer, impl: str, parts: dict, order,
               scaling_factor: float, need_s: float) -> None:
  """Records each (kind, batch) of `order`: one-step generation, U-Net, teacher pairs."""
  import torch
  compute = getattr(torch, cfg.dtype)
  on_device = lambda x: torch.from_numpy(x).to(timer.device)
  for kind, b in order:
    name = f'{kind}_b{b}'
    ids = on_device(bench_configs.token_ids(cfg, b)).long()
    noise = on_device(bench_configs.nchw(bench_configs.latents(cfg, b))).to(compute)
    if kind == 'e2e':
      call = lambda: torch_generate(parts, ids, noise, scaling_factor)
    elif kind == 'pairs':
      uncond_ids = on_device(bench_configs.token_ids(cfg, b, bench_configs.UNCOND_SEED)).long()
      call = lambda: torch_teacher_pairs(parts, ids, uncond_ids, noise, cfg)
    else:
      t = torch.full((b,), TIMESTEP, device=timer.device)
      states = on_device(bench_configs.text_states(cfg, b)).to(compute)
      call = lambda: parts['unet'](noise, t, encoder_hidden_states=states, return_dict=False)[0]
    save = ((lambda out: bench_configs.nhwc(out.float().cpu().numpy()))
            if b == 1 or kind == 'pairs' else None)
    rec.measure(name, impl, lambda: timer.timed(impl, name, call, b, save), need_s=need_s)


def _compiled_inference(cfg: BenchConfig, rec: Recorder, timer: _Timer, low_parts, order,
                        scaling_factor: float) -> None:
  import torch
  # Static shapes: each batch size gets its own graph, as our jit does.
  torch._dynamo.config.automatic_dynamic_shapes = False
  torch._dynamo.config.cache_size_limit = 32
  with torch.inference_mode():
    parts = {k: torch.compile(m) for k, m in low_parts().items()}
    # The U-Net graph of unet_b1 is the one e2e_b1 needs, so that order compiles least.
    compile_order = sorted(order, key=lambda kb: (kb[1], kb[0] == 'e2e'))
    _inference(cfg, rec, timer, COMPILED, parts, compile_order, scaling_factor,
               need_s=cfg.compile_min_left_s)


def _require_supported(train) -> None:
  """The reference step below implements these settings of the trainer only."""
  unsupported = {'time.kind': (train.time.kind, 'uniform'), 'loss': (train.loss, 'l2'),
                 'optimizer.schedule': (train.optimizer.schedule, 'constant'),
                 'grad_accum_steps': (train.grad_accum_steps, 1)}
  for field, (value, supported) in unsupported.items():
    if value != supported:
      raise ValueError(f'the reference train step supports {field}={supported!r} only, '
                       f'not {value!r}')


def _ema_decay(ema_decay: float, update: int) -> float:
  """training/state.py's ema_warmup: min(decay, (1 + k) / (10 + k)) at update k."""
  return min(ema_decay, (1.0 + update) / (10.0 + update))


def _adamw(parameters, optimizer_config):
  import torch
  kwargs = dict(lr=optimizer_config.lr, betas=(optimizer_config.b1, optimizer_config.b2),
                eps=optimizer_config.eps, weight_decay=optimizer_config.weight_decay)
  try:
    return torch.optim.AdamW(parameters, fused=True, **kwargs)
  except (RuntimeError, TypeError):  # fused needs a recent torch on this device
    return torch.optim.AdamW(parameters, **kwargs)


def _train(cfg: BenchConfig, train, unet_cpu, compute, timer: _Timer, keep_step: list) -> dict:
  """The trainer's step for the training section `train`, written in PyTorch, float32
  master weights. The step is appended to keep_step, for a later memory measurement."""
  import torch
  _require_supported(train)
  device = timer.device
  unet = copy.deepcopy(unet_cpu).to(device).train()
  params = list(unet.parameters())
  ema = [p.detach().clone() for p in params]
  optimizer = _adamw(params, train.optimizer)
  warmup_steps = max(train.optimizer.warmup_steps, 1)
  schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, k / warmup_steps))
  on_device = lambda x: torch.from_numpy(x).to(device)
  batch = bench_configs.train_batch(cfg)
  x1 = on_device(bench_configs.nchw(batch['latents']))
  text = on_device(batch['text_embeds'])
  null_text = on_device(bench_configs.null_text_states(cfg))
  updates = [0]

  def step():
    b = x1.shape[0]
    s = torch.rand(b, device=device)
    x0 = torch.randn_like(x1)
    dropped = torch.rand(b, device=device) < train.caption_dropout
    embeds = torch.where(dropped[:, None, None], null_text, text)
    s_ = s[:, None, None, None]
    with torch.autocast(device.type, dtype=compute, enabled=compute != torch.float32):
      v = unet(s_ * x1 + (1 - s_) * x0, TIMESTEP * (1 - s), encoder_hidden_states=embeds,
               return_dict=False)[0]
    loss = torch.nn.functional.mse_loss(v.float(), x1 - x0)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, train.optimizer.grad_clip, foreach=True)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
      torch._foreach_lerp_(ema, params, 1.0 - _ema_decay(train.ema_decay, updates[0]))
    updates[0] += 1
    return loss, grad_norm

  result = timer.timed(EAGER, 'train', step, cfg.train_batch)
  result['final_loss'] = step()[0].item()
  result['optimizer'] = 'AdamW(fused)' if optimizer.defaults.get('fused') else 'AdamW'
  result['includes'] = TRAIN_STEP
  keep_step.append(step)
  return result
