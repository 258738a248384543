"""Attention and GroupNorm on XLA:CPU through the C++ kernels in cpu_kernels.cc, compiled on
first use.

The kernels are built with the machine's C++ compiler ($CXX, else c++) against the XLA FFI
headers that jaxlib ships, once per source, compiler, jaxlib and CPU, into
$INSTAFLOW_JAX_KERNEL_CACHE (default ~/.cache/instaflow_jax/kernels). Where they cannot be
built, the layers keep their XLA formulations and say why once.

They compute on 16 float lanes at a time (kLanes), one AVX-512 register: the layers use
them on CPUs with AVX-512 only. With AVX2 alone, where each vector takes two registers, the
XLA formulations run several times faster (benchmarks/README.md).
INSTAFLOW_JAX_CPU_KERNELS=kernel uses them on any CPU, =xla on none; unset (auto): where
the CPU has AVX-512.

They run on a single CPU device only. XLA's partitioner knows nothing of a custom call's
dimensions and would gather a sharded batch onto every device around it, so meshes of
simulated CPU devices (tests, launch/local.py) keep the XLA formulations.
"""
import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Tuple

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

SOURCE = Path(__file__).with_suffix('.cc')
_TARGETS = {'instaflow_attention_forward': 'InstaflowAttentionForward',
            'instaflow_attention_backward': 'InstaflowAttentionBackward',
            'instaflow_group_norm': 'InstaflowGroupNorm'}
_COMPILE_FLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC')
HEAD_DIM_MULTIPLE = 4  # kDimBlock in the kernel
CHANNEL_MULTIPLE = 16  # kLanes


def attention_applies(head_dim: int) -> bool:
  """Whether attention with this head dim runs in the kernel (building it on first call)."""
  return head_dim % HEAD_DIM_MULTIPLE == 0 and in_use()


def group_norm_applies(channels: int, activation) -> bool:
  """Whether GroupNorm over this many channels, then `activation`, runs in the kernel."""
  return channels % CHANNEL_MULTIPLE == 0 and activation in (None, 'silu', 'swish') and in_use()


def in_use() -> bool:
  """Whether the layers run the kernels here (where a layer's shape allows)."""
  return jax.device_count() == 1 and _chosen(_cpu_flags()) and _registered()


def _chosen(cpu_flags: str) -> bool:
  """Whether the layers should use the kernels on a CPU with these /proc/cpuinfo flags."""
  setting = os.environ.get('INSTAFLOW_JAX_CPU_KERNELS', 'auto')
  if setting not in ('auto', 'kernel', 'xla'):
    raise ValueError(f'INSTAFLOW_JAX_CPU_KERNELS={setting!r}: use auto, kernel or xla')
  return setting == 'kernel' or (setting == 'auto' and 'avx512f' in cpu_flags.split())


@functools.cache
def _registered() -> bool:
  if os.environ.get('INSTAFLOW_JAX_CPU_KERNELS') == 'xla':
    return False
  try:
    library = ctypes.cdll.LoadLibrary(str(built_library()))
  except (OSError, subprocess.SubprocessError) as e:
    warnings.warn(f'instaflow_jax: CPU kernels unavailable ({e}); using the slower XLA '
                  'formulations. Install a C++ compiler (g++) to get them, or set '
                  'INSTAFLOW_JAX_CPU_KERNELS=xla to silence this.', stacklevel=3)
    return False
  for target, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                platform='cpu')
  return True


def built_library() -> Path:
  """The compiled kernels, built now if this machine has no copy of this version."""
  compiler = os.environ.get('CXX', 'c++')
  command = [compiler, *_COMPILE_FLAGS, '-isystem', jax.ffi.include_dir(), str(SOURCE)]
  target = _cache_dir() / f'cpu_kernels-{_build_key(command)}.so'
  if not target.exists():
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: processes starting together each build,
    # and none loads a half-written file.
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix='.so.tmp', delete=False) as tmp:
      partial = Path(tmp.name)
    try:
      done = subprocess.run(command + ['-o', str(partial)], capture_output=True, text=True)
      if done.returncode:
        lines = done.stderr.strip().splitlines() or [f'exit status {done.returncode}']
        raise subprocess.SubprocessError(f'{compiler} failed on {SOURCE.name}: {lines[-1]}')
      os.replace(partial, target)
    finally:
      partial.unlink(missing_ok=True)
  return target


def _cache_dir() -> Path:
  default = Path(os.environ.get('XDG_CACHE_HOME', Path.home() / '.cache')) / 'instaflow_jax'
  return Path(os.environ.get('INSTAFLOW_JAX_KERNEL_CACHE', default / 'kernels'))


def _build_key(command) -> str:
  """Source, command, jaxlib and CPU: -march=native code must not move to another CPU."""
  key = hashlib.sha256(SOURCE.read_bytes())
  for part in (*command, jaxlib.__version__, _cpu_flags()):
    key.update(part.encode() + b'\0')
  return key.hexdigest()[:16]


def cpu_model() -> str:
  """The CPU's model name, as /proc/cpuinfo gives it ('' where it gives none)."""
  line = _cpuinfo_line(('model name',))
  return line.partition(':')[2].strip()


def _cpu_flags() -> str:
  return _cpuinfo_line(('flags', 'Features'))


@functools.cache
def _cpuinfo_line(prefixes: Tuple[str, ...]) -> str:
  try:
    info = Path('/proc/cpuinfo').read_text()
  except OSError:
    return ''
  return next((line for line in info.splitlines() if line.startswith(prefixes)), '')


@jax.custom_vjp
def attention(query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(dim)) v on float32 [..., length, heads, dim] arrays."""
  return _forward(query, key, value)[0]


def _shapes(*arrays) -> Tuple[jax.ShapeDtypeStruct, ...]:
  return tuple(jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in arrays)


def _require_kernel() -> None:
  if not _registered():
    raise RuntimeError('instaflow_jax: the CPU kernels are unavailable (see the warning above); '
                       'the layers fall back to XLA without them')


def _forward(query, key, value):
  _require_kernel()
  log_sum_exp = jax.ShapeDtypeStruct(query.shape[:-3] + (query.shape[-2], query.shape[-3]),
                                     jnp.float32)
  out, log_sum_exp = jax.ffi.ffi_call(
      'instaflow_attention_forward', (*_shapes(query), log_sum_exp),
      vmap_method='broadcast_all')(query, key, value)
  return out, (query, key, value, out, log_sum_exp)


def _backward(residuals, grad_out):  # after _forward, which checked the kernel
  query, key, value = residuals[:3]
  return tuple(jax.ffi.ffi_call('instaflow_attention_backward', _shapes(query, key, value),
                                vmap_method='broadcast_all')(*residuals, grad_out))


attention.defvjp(_forward, _backward)


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int, epsilon: float,
               with_silu: bool) -> jax.Array:
  """torch's GroupNorm (two-pass float32 statistics) of float32 [batch, ..., channels] x over
  `groups` groups of channels, then SiLU if with_silu. Forward only (layers.GroupNorm
  recomputes it in XLA for the backward pass)."""
  _require_kernel()
  # Under vmap, one call per mapped element: the kernel reads axis 0 as the batch.
  return jax.ffi.ffi_call('instaflow_group_norm', _shapes(x)[0], vmap_method='sequential')(
      x, scale, bias, groups=np.int64(groups), epsilon=np.float32(epsilon), with_silu=with_silu)
