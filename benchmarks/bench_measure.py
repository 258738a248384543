"""How both of bench.py's runners measure: timed calls, peak memory on a CPU, and the
results file each child keeps up to date."""
import json
import os
import statistics
import time
import traceback
from typing import Any, Callable, Optional

import numpy as np

OURS, EAGER, COMPILED = 'ours', 'torch_eager', 'torch_compile'
WARMUP_CALLS = 2   # the first call (compile, cuDNN autotuning) and one more


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


def max_rel_diff(ours: np.ndarray, ref: np.ndarray) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


def peak_bytes(result: dict) -> Optional[int]:
  """A row's peak memory as its side measured it: on a CPU the training step's rise of the
  resident set (cpu_peak_bytes); on an accelerator, torch's max_memory_allocated or our
  executable's memory analysis (peak_bytes). None where not measured."""
  return result.get('cpu_peak_bytes', result.get('peak_bytes'))


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
