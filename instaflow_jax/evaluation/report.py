"""The eval stage's outputs: metrics.json, report.md and the PNGs it shows.

Prompts without real images (eval from a prompts file) have no FD: the report says so, and
the FD plots and the grid's real row are left out."""
import json
import os
from typing import Optional

import numpy as np

from instaflow_jax import images as image_io
from instaflow_jax.evaluation import shapes_evaluator

METRICS_FILE = 'metrics.json'
REPORT_FILE = 'report.md'
GRID_FILE = 'grid.png'
FD_VS_STEPS_FILE = 'fd_vs_steps.png'
FD_VS_SECONDS_FILE = 'fd_vs_seconds.png'


def grid_rows_of(eval_config, model: str, solver, images: np.ndarray) -> list:
  """The rows this run adds to the comparison grid: every model at one Euler step, and
  the teacher (the first model) at its most steps."""
  label = f'{eval_config.labels[model]}, {solver_label(solver)}'
  one_step = solver.kind == 'euler' and solver.num_steps == 1
  teacher_steps = max(int(n) for n in eval_config.steps[eval_config.models[0]])
  teacher = (model == eval_config.models[0] and solver.kind == 'euler'
             and solver.num_steps == teacher_steps and teacher_steps > 1)
  return [(label, images[:eval_config.grid_prompts])] if one_step or teacher else []


def solver_label(solver) -> str:
  if solver.kind == 'euler':
    return f'{solver.num_steps} step' + ('s' if solver.num_steps > 1 else '')
  return 'Dopri5'


def measures_fd(metrics: dict) -> bool:
  """Whether FD was measured: not when the prompts came without real images."""
  return 'fd_floor' in metrics


def write(stage_dir: str, eval_config, metrics: dict, grid_rows: list,
          real: Optional[np.ndarray]) -> None:
  """Writes the metrics, the plots, the grid and the report that ties them together.
  `real`: the real held-out images of the prompts, None when there are none."""
  _write_atomic(os.path.join(stage_dir, METRICS_FILE), json.dumps(metrics, indent=2) + '\n')
  rows = sorted(grid_rows, key=lambda row: not row[0].endswith(', 1 step'))  # one-step first
  if real is not None:
    rows.append(('real (held out)', real[:eval_config.grid_prompts]))
  image_io.save_png(os.path.join(stage_dir, GRID_FILE), image_io.labelled_rows(rows, upscale=4))
  if measures_fd(metrics):
    _plot(os.path.join(stage_dir, FD_VS_STEPS_FILE), eval_config, metrics, 'nfe',
          'function evaluations per image (NFE)')
    _plot(os.path.join(stage_dir, FD_VS_SECONDS_FILE), eval_config, metrics, 'seconds_per_image',
          'seconds per image (this machine)')
  _write_atomic(os.path.join(stage_dir, REPORT_FILE), markdown(eval_config, metrics))


def _write_atomic(path: str, text: str) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def _plot(path: str, eval_config, metrics: dict, x_key: str, x_label: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  figure, axes = plt.subplots(figsize=(5.5, 4))
  for model, results in metrics['models'].items():
    euler = [(r[x_key], r['fd']) for name, r in results.items() if name != 'dopri5']
    line, = axes.plot(*zip(*sorted(euler)), marker='o', label=eval_config.labels[model])
    if 'dopri5' in results:
      axes.plot(results['dopri5'][x_key], results['dopri5']['fd'], marker='*', markersize=12,
                linestyle='none', color=line.get_color())
  axes.axhline(metrics['fd_floor'], color='grey', linestyle='--', label='real vs real')
  axes.set_xscale('log')
  axes.set_xlabel(plot_x_label(x_label, metrics))
  axes.set_ylabel('FD to real held-out images')
  axes.legend()
  figure.tight_layout()
  tmp = path + '.tmp.png'
  figure.savefig(tmp, dpi=100)
  plt.close(figure)
  os.replace(tmp, path)


def plot_x_label(x_label: str, metrics: dict) -> str:
  """The axis label, with the key to the Dopri5 stars where some model has them."""
  with_dopri5 = any('dopri5' in results for results in metrics['models'].values())
  return x_label + ('; star: Dopri5' if with_dopri5 else '')


def markdown(eval_config, metrics: dict) -> str:
  """The report: the table of every model and solver, and the pictures."""
  first = next(iter(next(iter(metrics['models'].values())).values()))
  prompt_key = next((k for k in ('fidelity', 'clip_score') if k in first), None)
  real_prompt = {'fidelity': metrics.get('real_fidelity'),
                 'clip_score': metrics.get('real_clip_score')}.get(prompt_key)
  fd = measures_fd(metrics)
  prompt_keys = _prompt_columns(prompt_key, first)
  # The machine: seconds per image are its, and a model trained on another CPU differs.
  lines = ['# Evaluation', '',
           f"{_about_prompts_and_fd(metrics)} Measured on {metrics['machine']}."]
  if prompt_key == 'fidelity':
    lines[-1] += ' ' + _about_fidelity(real_prompt, prompt_keys)
  elif prompt_key == 'clip_score' and real_prompt is not None:
    lines[-1] += f' CLIP score of real images: {real_prompt:.2f}.'
  header = ['model', 'solver', 'NFE'] + (['FD'] if fd else []) + [
      _prompt_column_label(key) for key in prompt_keys] + [
          'straightness', 's / image', 'compile s']
  lines += ['', '| ' + ' | '.join(header) + ' |', '|---|---|' + '---:|' * (len(header) - 2)]
  for model, results in metrics['models'].items():
    for name, r in results.items():
      cells = [eval_config.labels[model], 'Dopri5' if name == 'dopri5' else f'Euler {name}',
               f"{r['nfe']:.1f}"] + ([f"{r['fd']:.3f}"] if fd else [])
      cells += [f'{r[key]:.3f}' for key in prompt_keys]
      cells += [f"{r['straightness']:.4f}" if 'straightness' in r else '-',
                f"{r['seconds_per_image']:.4f}", f"{r['compile_seconds']:.1f}"]
      lines.append('| ' + ' | '.join(cells) + ' |')
  straightness = ', '.join(f'{eval_config.labels[m]} {v:.4f}'
                           for m, v in metrics['straightness'].items())
  lines += ['', f'Straightness at the most Euler steps: {straightness}.', '']
  if 'evaluator_accuracy' in metrics:
    accuracy = ', '.join(f'{k} {v:.4f}' for k, v in metrics['evaluator_accuracy'].items())
    lines += [f'Evaluator accuracy on real held-out images: {accuracy}.', '']
  lines += [f'![grid]({GRID_FILE})', '']
  if fd:
    lines += [f'![FD vs steps]({FD_VS_STEPS_FILE}) ![FD vs seconds]({FD_VS_SECONDS_FILE})', '']
  return '\n'.join(lines)


def _prompt_columns(prompt_key, measured: dict) -> list:
  """The table's prompt measures: fidelity and its attributes, or the CLIP score, or none."""
  if prompt_key is None:
    return []
  return [prompt_key] + [k for k in measured if k.startswith(prompt_key + '_')]


def _about_fidelity(real_fidelity: float, prompt_keys: list) -> str:
  """What the fidelity columns measure, naming the columns the table has: the prompts of
  one count (one shape, two shapes) have a column only where the held-out set has some."""
  by_count = [_prompt_column_label(f'fidelity_{name}')
              for name in shapes_evaluator.FIDELITY_BY_COUNT.values()
              if f'fidelity_{name}' in prompt_keys]
  attributes = [label for label in map(_prompt_column_label, prompt_keys[1:])
                if label not in by_count]
  text = ('Fidelity: the fraction of images that show their prompt (real images: '
          f"{real_fidelity:.3f}); {', '.join(attributes)}: the fraction that show that "
          'attribute as the prompt says')
  if by_count:
    text += f"; {', '.join(by_count)}: fidelity among the prompts that name {', '.join(by_count)}"
  return text + '.'


def _prompt_column_label(key: str) -> str:
  """fidelity_two_shapes -> 'two shapes'; fidelity and clip_score as they are."""
  if key.startswith('fidelity_'):
    return key[len('fidelity_'):].replace('_', ' ')
  return key


def _about_prompts_and_fd(metrics: dict) -> str:
  if measures_fd(metrics):
    return (f"{metrics['num_prompts']} held-out prompts, the same noise for every model. "
            "FD: Frechet distance to the real held-out images in the evaluator's feature space "
            f"(real training images: {metrics['fd_floor']:.3f}).")
  return (f"{metrics['num_prompts']} prompts of {metrics['prompts_file']}, the same noise for "
          'every model. FD was not measured: prompts only, no real images to compare with.')
