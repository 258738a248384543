"""How each of the layers' ops is computed on the backend that runs it.

models/layers.py writes Stable Diffusion's layers once; the few ops whose best formulation
depends on the backend go through the functions here, which choose per call:

  op                    CPU (cpu.py, cpu_kernels)            GPU (gpu.py)       TPU (tpu_attention.py)
  linear, conv          kernel gradient ordered after the    plain              plain
                        input's; small convs as one matmul;
                        2x up-sampling folded into the conv
  group_norm, recomputed  C++ forward kernel; recomputed in  plain              plain
                        the backward pass
  attention             C++ kernel, or XLA with a            cuDNN flash        Pallas splash
                        recomputing backward                 attention where    attention for long
                                                             it applies, else   self-attention, else
                                                             XLA                XLA
  compiler_options      XLA's own convolutions               none               none

"plain" is portable.py: jnp, lax and jax.nn, what autodiff and the remat policy
(models/unet.py) make of them. The backend is jax.default_backend(), unless a `use`
block says otherwise: `with formulations.use('gpu'): ...` traces the GPU path on any
machine (tests compare it with the CPU path; benchmarks trace it without a GPU).
"""
import contextlib
import contextvars
import functools
import os
from typing import Callable, Dict, Optional

import jax

from instaflow_jax.models.formulations import cpu
from instaflow_jax.models.formulations import cpu_kernels
from instaflow_jax.models.formulations import gpu
from instaflow_jax.models.formulations import portable
from instaflow_jax.models.formulations import tpu_attention

BACKENDS = ('cpu', 'gpu', 'tpu')
_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    'instaflow_jax_formulations', default=None)


@contextlib.contextmanager
def use(backend: str):
  """Traces the layers with `backend`'s formulations inside the block, whatever runs them.
  JAX keeps the traces of the functions it has jitted: trace functions made inside the
  block (a function jitted before it is not traced again)."""
  if backend not in BACKENDS:
    raise ValueError(f'formulations for {backend!r}: use one of {BACKENDS}')
  token = _forced.set(backend)
  try:
    yield
  finally:
    _forced.reset(token)


def backend() -> str:
  """The backend whose formulations the layers use now."""
  return _forced.get() or jax.default_backend()


def description() -> str:
  """What computes the layers here, for comparing runs across machines: the backend and its
  device, and on a CPU its model and whether the C++ kernels run. Rounding that differs in
  the last bit (the kernels, or XLA's code for another CPU) sends a long training run
  elsewhere, as another seed does."""
  on = backend()
  if on != 'cpu':
    return f'{on} ({jax.devices()[0].device_kind})'
  layers = 'C++ kernels' if cpu_kernels.in_use() else 'XLA formulations'
  return f'cpu ({cpu_kernels.cpu_model() or "model unknown"}; {layers})'


def linear(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x @ kernel, the kernel cast to x's dtype."""
  return cpu.linear(x, kernel) if backend() == 'cpu' else portable.linear(x, kernel)


def conv(x: jax.Array, kernel: jax.Array, strides, padding, upsampled_2x: bool = False):
  """The 2-D convolution (NHWC, HWIO, explicit padding) of x, or of x up-sampled 2x
  (nearest) first; the kernel cast to x's dtype."""
  formulation = cpu if backend() == 'cpu' else portable
  return formulation.conv(x, kernel, strides, padding, upsampled_2x)


def group_norm(normalise: Callable, x: jax.Array, scale: jax.Array, bias: jax.Array, *,
               num_groups: int, epsilon: float, activation: Optional[str]) -> jax.Array:
  """normalise(x, scale, bias): GroupNorm then `activation`, as layers.GroupNorm writes it."""
  if backend() == 'cpu':
    return cpu.group_norm(normalise, x, scale, bias, num_groups, epsilon, activation)
  return normalise(x, scale, bias)


def recomputed(fn: Callable) -> Callable:
  """fn, for the cheap elementwise chains (LayerNorm, GEGLU) whose intermediates the CPU path
  recomputes in the backward pass; elsewhere the remat policy decides."""
  return cpu.recomputed_in_backward(fn) if backend() == 'cpu' else fn


def attention(query: jax.Array, key: jax.Array, value: jax.Array, *, is_causal: bool = False,
              mask: Optional[jax.Array] = None) -> jax.Array:
  """softmax(q k^T / sqrt(head_dim)) v on [batch, length, heads, head_dim], softmax in
  float32; `mask` (boolean, broadcastable to [batch, heads, q_length, kv_length]) marks the
  keys that may be seen."""
  on = backend()
  if on == 'cpu':
    return cpu.attention(query, key, value, is_causal, mask)
  if on == 'gpu' and gpu.cudnn_applies(query, key, is_causal=is_causal, mask=mask):
    return gpu.cudnn_attention(query, key, value, is_causal=is_causal)
  if on == 'tpu' and tpu_attention.splash_applies(query, key, mask=mask, is_causal=is_causal):
    return tpu_attention.splash_attention(query, key, value)
  return portable.attention(query, key, value, is_causal=is_causal, mask=mask)


def compiler_options() -> Dict[str, str]:
  """XLA options for compiling the models on this backend: on a CPU, XLA's own
  convolutions rather than YNNPACK's, unless XLA_FLAGS names that option."""
  if backend() != 'cpu':
    return {}
  return {name: value for name, value in cpu.COMPILER_OPTIONS.items()
          if name not in os.environ.get('XLA_FLAGS', '')}


def jit(fn: Callable = None, **jit_kwargs):
  """jax.jit, compiling with this backend's compiler_options: for every jitted program that
  runs the models. The options are looked up at the first call, not at import (which must
  not start a backend); called inside another jit's trace, whose program takes its caller's
  options, it is a plain jax.jit. Usable as a decorator, with or without jax.jit's
  keywords."""
  if fn is None:
    return functools.partial(jit, **jit_kwargs)
  jitted_with = functools.cache(
      lambda options: jax.jit(fn, compiler_options=dict(options) or None, **jit_kwargs))

  def jitted():
    return jitted_with(tuple(sorted(compiler_options().items())))

  @functools.wraps(fn)
  def call(*args, **kwargs):
    traced = any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((args, kwargs)))
    return (jitted_with(()) if traced else jitted())(*args, **kwargs)

  call.lower = lambda *args, **kwargs: jitted().lower(*args, **kwargs)
  return call
