"""Ours (Flax) against the PyTorch reference (diffusers / transformers), same weights, same
inputs, same machine, with random weights (nothing is downloaded).

  .venv/bin/python benchmarks/bench.py --config small          # this CPU, float32
  python3 benchmarks/bench.py --config sd15 --out bench.json   # SD 1.5 shapes, bf16, a GPU
  python3 benchmarks/bench.py --config sd15 --rows train_b8    # one row of the table
  .venv/bin/python benchmarks/bench.py --gflops                # each config's U-Net FLOPs

The reference models are built from their configs with a fixed seed and their state dicts
are converted into ours with torch_state_to_flax, so both sides compute the same function;
one float32 forward pass checks that. Then, in the config's compute dtype: one-step
generation (text encoder on the padded tokens, one U-Net evaluation at time 1000, VAE
decode), the U-Net alone, the pairs stage's teacher solve (text encoder, 25 Euler steps
with classifier-free guidance), the trainer's training step (training/step.py's
make_train_step over the reflow stage's flow-matching loss, configs/sd15_reflow.py's
optimizer, EMA and remat policy; on the reference side the same step written in PyTorch),
and for sd15 the stacked 1.7B student's forward pass and attention alone (cuDNN and XLA
against PyTorch's SDPA). Every row records its peak device memory on both sides.

Each framework runs in a child process of its own: neither holds GPU memory the other needs,
peak-memory counters start clean, and a hard time limit can end one without losing the
other's numbers (a child rewrites its results file after every measurement). The children
run as a user's program would: in this process's environment, only with the repository on
PYTHONPATH and output unbuffered. Ours goes first; the reference gets what is left of the
budget, eager mode first, then torch.compile while time remains. Times are medians over
--repeats calls after warm-up; compile time is reported on its own. --rows picks rows of the
table, so that a GPU run can be split into calls that each fit a time limit. --rounds N runs
the pair N times, alternating which side goes first, and pools each measurement's timed
calls over the rounds (the ratio of each round is printed too): on a shared VM whose speed
drifts within minutes, one pair of children can favour either side.

The parts: bench_configs.py (the presets and their rows, the trainer's settings, the shared
inputs), bench_measure.py (timing, memory, each child's results file), bench_ours.py and
bench_torch.py (the two runners), bench_report.py (merging, pooling, the table).
"""
import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Dict, List, Tuple

import bench_configs
import bench_report
import bench_torch
from bench_configs import CONFIGS
from bench_configs import BenchConfig
from bench_measure import OURS
from bench_measure import Recorder
from bench_ours import run_ours

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = {OURS: run_ours, 'torch': bench_torch.run_torch}


def child_environment(environ) -> dict:
  """A child's environment: the user's, with the repository importable and output unbuffered
  (nothing that a user's program would not have)."""
  return dict(environ, PYTHONUNBUFFERED='1', PYTHONPATH=os.pathsep.join(
      filter(None, [REPO_ROOT, environ.get('PYTHONPATH')])))


def run_child(args, section: str, deadline: float, path: str) -> dict:
  """Runs one section in a child process group, killed a little after its deadline."""
  command = [sys.executable, os.path.abspath(__file__), '--config', args.config,
             '--repeats', str(args.repeats), '--section', section, '--deadline', str(deadline),
             '--partial', path, '--scratch', args.scratch, '--torch-compile', args.torch_compile,
             '--compile-workers', str(args.compile_workers), '--rows', args.rows]
  start = time.time()
  child = subprocess.Popen(command, env=child_environment(os.environ), start_new_session=True)
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
  parser.add_argument('--rows', default='',
                      help='comma-separated rows to measure (default: all of the config\'s; '
                           'an unknown name lists them)')
  parser.add_argument('--gflops', action='store_true',
                      help="print each config's U-Net GFLOPs per image and exit")
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
  return bench_report.merge(parts), statuses


def print_gflops() -> None:
  for name, cfg in CONFIGS.items():
    print(f'{name:<8} U-Net forward {bench_torch.unet_gflops(cfg):8.2f} GFLOPs per image '
          f'({cfg.latent_size}x{cfg.latent_size} latents)')


def unet_gflops(cfg: BenchConfig):
  try:
    return bench_torch.unet_gflops(cfg)
  except ImportError:  # no diffusers: ours runs alone
    return None


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.section:
    return run_section(args)
  if args.gflops:
    return print_gflops()
  cfg = CONFIGS[args.config]
  try:
    rows = bench_configs.select_rows(cfg, args.rows)
  except ValueError as e:
    sys.exit(f'bench.py: {e}')
  start = time.time()
  budget = args.budget_s or cfg.budget_s
  sections = [s for s in args.sections.split(',') if s]
  results: Dict[str, Any] = {'config': args.config, 'rows': rows, 'repeats': args.repeats,
                             'budget_s': budget, 'rounds': args.rounds,
                             'model_configs': dataclasses.asdict(cfg),
                             'unet_gflops_per_image': unet_gflops(cfg),
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
    results.update(bench_report.pooled(rounds))
    results['agreement'] = bench_report.agreement(cfg, scratch)
  if args.rounds > 1:
    results['by_round'] = rounds
  results['wall_s'] = time.time() - start
  bench_report.print_report(cfg, results, rounds)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
      json.dump(results, f, indent=1, default=float)
    print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
