"""Transparent huge pages for XLA:CPU's per-call temporary buffer.

XLA:CPU allocates each call's temporaries as one block, afresh on every call, from a worker
thread. glibc serves a block that size from a worker's arena (over 64 MiB: the training step
of the small benchmark needs 92 MiB) with a mapping of its own and unmaps it when freed, so
every call faults the whole block in, 4 KiB at a time: 27,000 page faults and 60-80 ms of
kernel time a training step. With glibc's `glibc.malloc.hugetlb=1` tunable such blocks are
advised to use 2 MiB pages (under the kernel's usual THP mode, `madvise`): 700 faults, half
the kernel time, and the step 15% faster (benchmarks/README.md). PyTorch's step is
unchanged by it.

Tunables are read only when a process starts, so the command-line entry points restart
themselves once with it set (same process id, same arguments), where JAX will run on the
CPU: JAX_PLATFORMS starts with cpu, or no accelerator's plugin is installed. GPUs and TPUs
allocate their own memory; there the command does not restart. Setting GLIBC_TUNABLES to
include `glibc.malloc.hugetlb=0` opts out. A program that imports the package is never
restarted or changed.
"""
import importlib.metadata
import importlib.util
import os
import platform
import sys
from typing import Dict, Mapping

TUNABLE = 'glibc.malloc.hugetlb'
_THP_MODE_FILE = '/sys/kernel/mm/transparent_hugepage/enabled'


def with_huge_pages(env: Mapping[str, str]) -> Dict[str, str]:
  """`env` with the tunable added to GLIBC_TUNABLES, unless that already sets it."""
  tunables = env.get('GLIBC_TUNABLES', '')
  if f'{TUNABLE}=' in tunables:
    return dict(env)
  return dict(env, GLIBC_TUNABLES=':'.join(filter(None, [tunables, f'{TUNABLE}=1'])))


def _huge_pages_only_when_advised(thp_mode_file: str = _THP_MODE_FILE) -> bool:
  """The kernel's THP mode is `madvise`: under `always` every block gets them already,
  under `never` none can."""
  try:
    with open(thp_mode_file) as f:
      return '[madvise]' in f.read()
  except OSError:
    return False


def jax_will_run_on_cpu(env: Mapping[str, str]) -> bool:
  """Whether JAX's default backend will be the CPU, told without starting one (that takes
  seconds on a GPU): JAX_PLATFORMS's first entry, else whether a GPU or TPU plugin (a
  `jax_plugins` entry point, or libtpu) is installed."""
  platforms = env.get('JAX_PLATFORMS', '')
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  return not (importlib.metadata.entry_points(group='jax_plugins')
              or importlib.util.find_spec('libtpu'))


def restart_with_huge_pages(thp_mode_file: str = _THP_MODE_FILE) -> None:
  """Re-executes this command with the tunable set, where JAX runs on the CPU and glibc and
  the kernel (its THP mode in `thp_mode_file`) make that useful; returns where nothing
  needs doing. Call it first thing in a command's `__main__`."""
  env = with_huge_pages(os.environ)
  if (env == dict(os.environ) or not jax_will_run_on_cpu(os.environ)
      or platform.libc_ver()[0] != 'glibc' or not _huge_pages_only_when_advised(thp_mode_file)):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)
