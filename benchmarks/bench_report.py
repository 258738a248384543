"""bench.py's report: the children's results merged, pooled over rounds, and printed as a
table of ours against the reference. Ratio = reference time / our time (for throughputs:
ours / the reference's), so above 1 ours is faster. Peak memory: each side's measure of the
row's device memory (bench_measure.peak_bytes)."""
import copy
import os
import statistics
from typing import Callable, Dict, List, Optional

import numpy as np

import bench_configs
from bench_configs import BenchConfig
from bench_measure import COMPILED
from bench_measure import EAGER
from bench_measure import OURS
from bench_measure import max_rel_diff
from bench_measure import peak_bytes


def merge(parts: Dict[str, dict]) -> dict:
  """One round's results from each child's."""
  merged = {'measurements': {}}
  for part in parts.values():
    for key, value in part.items():
      if key == 'measurements':
        for name, impls in value.items():
          merged['measurements'].setdefault(name, {}).update(impls)
      else:
        merged.setdefault(key, {}).update(value)
  return merged


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
      for key in ('cpu_peak_bytes', 'peak_bytes'):
        peaks = [r[key] for r in per_round if r.get(key) is not None]
        if peaks:
          result[key] = max(peaks)
  for later in rounds[1:]:
    for section, error in (later.get('errors') or {}).items():
      results.setdefault('errors', {}).setdefault(section, error)
  return results


def agreement(cfg: BenchConfig, scratch: str) -> dict:
  """Max relative difference of ours vs eager torch on the saved outputs (batch 1, pairs)."""
  diffs = {}
  for name in bench_configs.compared_rows(cfg):
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


def _row(cfg: BenchConfig, name: str) -> tuple:
  """(label, value of a result, format) of a row of the table."""
  ms = (lambda r: 1e3 * r['median_s']), '{:.2f}'
  per_s = (lambda r: r['items_per_s']), '{:.2f}'
  kind = name.split('_')[0]
  if kind == 'attn':
    _, impl, passes = name.split('_')
    shape = 'x'.join(map(str, cfg.attention_shape))
    return (f"attention {impl} {'fwd+bwd' if passes == 'fwdbwd' else 'fwd'} {shape} (ms)",) + ms
  b = int(name.rsplit('_b', 1)[1])
  if kind == 'e2e':
    return ((f'e2e {cfg.image_size}px b{b} (ms)',) + ms if b == 1
            else (f'e2e {cfg.image_size}px b{b} (img/s)',) + per_s)
  if kind == 'pairs':
    return (f'pairs b{b}, {cfg.pairs_steps} steps w={cfg.guidance:g} (pairs/s)',) + per_s
  if kind == 'train':
    return (f'train b{b} {cfg.latent_size}x{cfg.latent_size} (img/s)',) + per_s
  return (f'{kind} b{b} (ms)',) + ms


def _peak(result: Optional[dict]) -> str:
  n = peak_bytes(result or {})
  return 'n/a' if n is None else _size(n)


def table(cfg: BenchConfig, results: dict) -> str:
  """Ours vs the reference with each side's peak memory, then compile times, agreement and
  what the step holds."""
  rows = results.get('rows') or bench_configs.row_names(cfg)
  names = [name for name in rows if name != 'check']
  header = (f"{'measurement':<38} {'ours':>9} {'torch eager':>12} {'ratio':>7} "
            f"{'torch.compile':>14} {'ratio':>7} {'peak ours / eager':>20}")
  lines = [header, '-' * len(header)]
  measurements = results.get('measurements', {})
  for name in names:
    label, value, fmt = _row(cfg, name)
    m = measurements.get(name, {})
    peaks = f'{_peak(m.get(OURS))} / {_peak(m.get(EAGER))}'
    lines.append(f'{label:<38} {_cell(m.get(OURS), value, fmt):>9} '
                 f'{_cell(m.get(EAGER), value, fmt):>12} {_ratio(m.get(OURS), m.get(EAGER)):>7} '
                 f'{_cell(m.get(COMPILED), value, fmt):>14} '
                 f'{_ratio(m.get(OURS), m.get(COMPILED)):>7} {peaks:>20}')
  lines.append(_compile_times(measurements, names, results))
  if 'check' in rows:
    check = measurements.get('check', {}).get(OURS)
    lines.append(f'fp32 max rel diff vs reference ({cfg.check_latent_size}x'
                 f'{cfg.check_latent_size} latents): {_format_diffs(check)}')
  lines.append(f"{cfg.dtype} max rel diff vs eager reference: "
               f"{_format_diffs(results.get('agreement'))}")
  train = measurements.get(f'train_b{cfg.train_batch}', {})
  lines.extend(_train_notes(train, results.get('train_settings') or {}))
  return '\n'.join(lines)


def _compile_times(measurements: dict, names: List[str], results: dict) -> str:
  cells = []
  for name in names:
    ours_s = (measurements.get(name, {}).get(OURS) or {}).get('compile_s')
    ref_s = (measurements.get(name, {}).get(COMPILED) or {}).get('compile_s')
    cells.append(f"{name} {'-' if ours_s is None else f'{ours_s:.0f}'}"
                 f"/{'-' if ref_s is None else f'{ref_s:.0f}'}")
  line = 'compile s (ours/torch.compile): ' + ', '.join(cells)
  wall = (results.get('compile') or {}).get(OURS, {}).get('wall_s')
  if wall is not None:
    line += f'\nours compiled all executables concurrently in {wall:.0f} s wall'
  return line


def _train_notes(train: dict, settings_by_side: dict) -> List[str]:
  """What each side's training step does, and the trainer's settings both follow."""
  lines = [f'train step, {impl}: {train[impl]["includes"]}'
           for impl in (OURS, EAGER) if (train.get(impl) or {}).get('includes')]
  settings = next(iter(settings_by_side.values()), None)
  if settings:
    lines.append('train step settings (configs/sd15_reflow.py reflow): '
                 + ', '.join(f'{k}={v}' for k, v in settings.items()))
  return lines


def _size(n: int) -> str:
  return f'{n / 2 ** 30:.1f} GiB' if n >= 2 ** 30 else f'{n / 2 ** 20:.0f} MiB'


def _format_diffs(diffs: Optional[dict]) -> str:
  if not diffs:
    return 'n/a'
  if 'error' in diffs or 'skipped' in diffs:
    return diffs.get('error') or diffs['skipped']
  return ', '.join(f'{k} {v:.2e}' for k, v in diffs.items())


def ratios_by_round(rounds: List[dict]) -> str:
  lines = []
  for name in rounds[0]['measurements']:
    cells = [_ratio(r['measurements'].get(name, {}).get(OURS),
                    r['measurements'].get(name, {}).get(EAGER)) for r in rounds]
    if any(c != '-' for c in cells):
      lines.append(f'  {name:<12} ' + ' '.join(f'{c:>7}' for c in cells))
  return '\n'.join(lines)


def print_report(cfg: BenchConfig, results: dict, rounds: List[dict]) -> None:
  pooled_note = f' pooled over {len(rounds)} rounds' if len(rounds) > 1 else ''
  gflops = results.get('unet_gflops_per_image')
  print(f"\n== {results['config']}: ours (Flax) vs reference (diffusers/transformers), "
        f"{cfg.dtype}, median of {results['repeats']}{pooled_note}; "
        f"wall {results['wall_s']:.0f} s")
  if gflops is not None:
    print(f'   U-Net forward: {gflops:.2f} GFLOPs per image')
  for section, env in (results.get('environment') or {}).items():
    print(f'   {section}: {env}')
  for section, error in (results.get('errors') or {}).items():
    print(f'   {section} failed: {error}')
  print(table(cfg, results))
  if len(rounds) > 1:
    print('ratio (torch eager / ours) in each round:\n' + ratios_by_round(rounds))
