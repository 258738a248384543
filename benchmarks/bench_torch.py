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

TRAIN_STEP = ('uniform times, the batch\'s coupled noise, caption dropout, forward (under '
              'autocast below float32; gradient checkpointing where ours rematerialises), MSE '
              'loss, backward, clip_grad_norm_ (the gradient norm), AdamW with LambdaLR '
              'warm-up, EMA by _foreach_lerp_; eager')
# The models each kind of row runs. Only those are on the device while an eager row is
# measured, so that its peak memory counts what ours' executable takes as arguments.
NEEDS = {'e2e': ('text_encoder', 'unet', 'vae'), 'pairs': ('text_encoder', 'unet'),
         'unet': ('unet',), 'stacked': ('unet_1', 'unet_2')}


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


def unet_gflops(cfg: BenchConfig) -> float:
  """GFLOPs of one U-Net forward pass per image: its convolutions and matmuls, attention's
  included, counted by torch's FlopCounterMode on the reference built on the meta device
  (nothing is allocated or computed)."""
  import torch
  from diffusers import UNet2DConditionModel
  from torch.nn.attention import SDPBackend
  from torch.nn.attention import sdpa_kernel
  from torch.utils.flop_counter import FlopCounterMode
  size = cfg.latent_size
  counter = FlopCounterMode(display=False)
  with torch.device('meta'):
    unet = UNet2DConditionModel(**cfg.unet)
    sample = torch.zeros(1, cfg.unet['in_channels'], size, size)
    states = torch.zeros((1,) + cfg.text_shape)
    # Attention's math formulation: its matmuls are counted on any device.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
      unet(sample, torch.full((1,), TIMESTEP), encoder_hidden_states=states)
  return counter.get_total_flops() / 1e9


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


def torch_stacked(parts: dict, x, t, states):
  """The stacked student (models/stacked_unet.py, nothing removed): unet_2(unet_1(x))."""
  x = parts['unet_1'](x, t, encoder_hidden_states=states, return_dict=False)[0]
  return parts['unet_2'](x, t, encoder_hidden_states=states, return_dict=False)[0]


class _OnDevice:
  """The reference models in the compute dtype on the device, wrapped (torch.compile, say):
  those a kind of row needs (NEEDS; the VAE as its `decode`). Unless `keep`, the models the
  kind does not need leave the device first. Both halves of the stack are copies of the
  U-Net, as the distill stage initialises them."""

  def __init__(self, reference: dict, timer: '_Timer', dtype, wrap=lambda m: m,
               keep: bool = False):
    self.reference, self.timer, self.dtype, self.wrap, self.keep = (reference, timer, dtype,
                                                                   wrap, keep)
    self.parts = {}

  def __call__(self, kind: str) -> dict:
    needed = NEEDS[kind]
    if not self.keep and set(self.parts) - set(needed):
      self.parts = {name: part for name, part in self.parts.items() if name in needed}
      self.timer.empty_cache()
    for name in needed:
      if name not in self.parts:
        model = copy.deepcopy(self.reference['unet' if name.startswith('unet') else name])
        model = model.to(device=self.timer.device, dtype=self.dtype)
        self.parts[name] = self.wrap(model.decode if name == 'vae' else model)
    return {('decode' if name == 'vae' else name): self.parts[name] for name in needed}


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
  rows = bench_configs.select_rows(cfg, args.rows)
  rec.log('building the reference models')
  reference = build_reference(cfg)
  torch.set_num_threads(os.cpu_count() or 1)  # XLA uses every core too
  compute = getattr(torch, cfg.dtype)

  # Fewest moves of models to and from the device: the kinds in the order of NEEDS.
  kinds = list(NEEDS)
  order = sorted([name for name in rows if name.split('_')[0] in NEEDS],
                 key=lambda name: kinds.index(name.split('_')[0]))
  scaling_factor = reference['vae'].config.scaling_factor
  with torch.inference_mode():
    _inference(cfg, rec, timer, EAGER, _OnDevice(reference, timer, compute), order,
               scaling_factor, need_s=5)
  timer.empty_cache()
  _attention(cfg, rec, timer, [name for name in rows if name.startswith('attn')])

  train_name, train_step = f'train_b{cfg.train_batch}', []
  if train_name in rows:
    train = bench_configs.trainer_config()
    rec.put('train_settings', 'torch', bench_configs.trainer_settings(train, cfg))
    rec.measure(train_name, EAGER,
                lambda: _train(cfg, train, reference['unet'], compute, timer, train_step),
                need_s=5)
  timer.empty_cache()
  if args.torch_compile == 'on' or (args.torch_compile == 'auto' and timer.cuda):
    _compiled_inference(cfg, rec, timer, _OnDevice(reference, timer, compute, torch.compile,
                                                   keep=True), order, scaling_factor)
  if train_step and not timer.cuda:  # last: it changes the allocator (see cpu_peak_bytes)
    rec.update(train_name, EAGER, cpu_peak_bytes=cpu_peak_bytes(train_step[0], timer.wait))


def _inference(cfg: BenchConfig, rec: Recorder, timer: _Timer, impl: str, on_device: _OnDevice,
               order, scaling_factor: float, need_s: float) -> None:
  """Records each row of `order`: one-step generation, U-Net, teacher pairs, stacked student."""
  import torch
  compute = getattr(torch, cfg.dtype)
  to_device = lambda x: torch.from_numpy(x).to(timer.device)
  for name in order:
    kind, b = name.split('_')[0], int(name.rsplit('_b', 1)[1])
    parts = on_device(kind)
    ids = to_device(bench_configs.token_ids(cfg, b)).long()
    noise = to_device(bench_configs.nchw(bench_configs.latents(cfg, b))).to(compute)
    t = torch.full((b,), TIMESTEP, device=timer.device)
    states = to_device(bench_configs.text_states(cfg, b)).to(compute)
    if kind == 'e2e':
      call = lambda: torch_generate(parts, ids, noise, scaling_factor)
    elif kind == 'pairs':
      uncond_ids = to_device(bench_configs.token_ids(cfg, b, bench_configs.UNCOND_SEED)).long()
      call = lambda: torch_teacher_pairs(parts, ids, uncond_ids, noise, cfg)
    elif kind == 'stacked':
      call = lambda: torch_stacked(parts, noise, t, states)
    else:
      call = lambda: parts['unet'](noise, t, encoder_hidden_states=states, return_dict=False)[0]
    save = ((lambda out: bench_configs.nhwc(out.float().cpu().numpy()))
            if name in bench_configs.compared_rows(cfg) else None)
    rec.measure(name, impl, lambda: timer.timed(impl, name, call, b, save), need_s=need_s)
    parts = call = None  # the next kind's placement may free these


def _attention(cfg: BenchConfig, rec: Recorder, timer: _Timer, names) -> None:
  """PyTorch's scaled_dot_product_attention (its choice of kernel) for each attention row of
  ours: forward, or forward+backward (the three input gradients for a given output
  gradient), on the same inputs in PyTorch's [batch, heads, tokens, head dim] layout."""
  import torch
  compute = getattr(torch, cfg.dtype)
  q, k, v, grad = (torch.from_numpy(bench_configs.normal(seed, cfg.attention_shape))
                   .transpose(1, 2).contiguous().to(timer.device, compute)
                   for seed in bench_configs.ATTENTION_SEEDS)
  attend = torch.nn.functional.scaled_dot_product_attention

  def forward():
    with torch.no_grad():
      return attend(q, k, v)

  def forward_backward():
    inputs = [x.detach().requires_grad_() for x in (q, k, v)]
    return torch.autograd.grad(attend(*inputs), inputs, grad)

  for name in names:
    call = forward_backward if name.endswith('fwdbwd') else forward
    rec.measure(name, EAGER, lambda: timer.timed(EAGER, name, call, cfg.attention_batch),
                need_s=2)


def _compiled_inference(cfg: BenchConfig, rec: Recorder, timer: _Timer, on_device: _OnDevice,
                        order, scaling_factor: float) -> None:
  import torch
  # Static shapes: each batch size gets its own graph, as our jit does.
  torch._dynamo.config.automatic_dynamic_shapes = False
  torch._dynamo.config.cache_size_limit = 32
  with torch.inference_mode():
    # The U-Net graph of unet_b1 is the one e2e_b1 needs, so that order compiles least.
    batch = lambda name: int(name.rsplit('_b', 1)[1])
    compile_order = sorted(order, key=lambda name: (batch(name), name.startswith('e2e')))
    _inference(cfg, rec, timer, COMPILED, on_device, compile_order, scaling_factor,
               need_s=cfg.compile_min_left_s)


def _require_supported(train) -> None:
  """The reference step below implements these settings of the trainer only."""
  unsupported = {'time.kind': (train.time.kind, 'uniform'), 'loss': (train.loss, 'l2'),
                 'optimizer.schedule': (train.optimizer.schedule, 'constant'),
                 'optimizer.mu_dtype': (train.optimizer.get('mu_dtype', ''), ''),
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
  master weights, diffusers' gradient checkpointing (each block recomputed in the backward
  pass) where ours has a remat policy. The step is appended to keep_step, for a later
  memory measurement."""
  import torch
  _require_supported(train)
  device = timer.device
  unet = copy.deepcopy(unet_cpu).to(device).train()
  if bench_configs.remat_policy(cfg) != 'none':
    unet.enable_gradient_checkpointing()
  params = list(unet.parameters())
  ema = [p.detach().clone() for p in params]
  optimizer = _adamw(params, train.optimizer)
  warmup_steps = max(train.optimizer.warmup_steps, 1)
  schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, k / warmup_steps))
  on_device = lambda x: torch.from_numpy(x).to(device)
  batch = bench_configs.train_batch(cfg)
  x0, x1 = (on_device(bench_configs.nchw(batch[key])) for key in ('x0', 'latents'))
  text = on_device(batch['text_embeds'])
  null_text = on_device(bench_configs.null_text_states(cfg))
  updates = [0]

  def step():
    b = x1.shape[0]
    s = torch.rand(b, device=device)
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
