"""The notebooks of colabs/ run headless (nbclient, this interpreter as the kernel) on small
inputs, with nothing downloaded; parameters are injected after each notebook's
`parameters` cell, as papermill does."""
import json
import os
import re
import shutil
import sys

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from tests import runs
from tests import tiny_models

pytestmark = pytest.mark.slow  # executes the notebooks

COLABS = os.path.join(runs.REPO, 'colabs')
KERNEL = 'instaflow_jax_tests'
IMAGE_LINK = re.compile(r'!\[[^\]]*\]\(([^)]+)\)')  # Markdown ![alt](path)


@pytest.fixture(scope='module')
def kernel_dirs(tmp_path_factory):
  """A kernel spec that starts this very interpreter (the venv's): the machine's own
  `python3` spec, if any, may point at another Python. Figures go to the notebook even
  where MPLBACKEND=Agg is set for headless runs (the kernel would inherit it)."""
  root = tmp_path_factory.mktemp('kernels')
  (root / KERNEL).mkdir()
  (root / KERNEL / 'kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
      'env': {'MPLBACKEND': 'module://matplotlib_inline.backend_inline'},
      'display_name': 'instaflow_jax tests', 'language': 'python'}))
  return [str(root)]


def inject_parameters(notebook, parameters: dict) -> None:
  """A cell after the one tagged `parameters` that assigns `parameters` (papermill's way)."""
  index = next(i for i, cell in enumerate(notebook.cells)
               if 'parameters' in cell.metadata.get('tags', []))
  source = '\n'.join(f'{name} = {value!r}' for name, value in parameters.items())
  notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(
      source, metadata={'tags': ['injected-parameters']}))


def execute(name: str, parameters: dict, kernel_dirs, cwd: str = runs.REPO):
  """The notebook colabs/<name> run in `cwd` with `parameters`; a failing cell raises."""
  notebook = nbformat.read(os.path.join(COLABS, name), as_version=4)
  inject_parameters(notebook, parameters)
  kernels = KernelManager(kernel_name=KERNEL,
                          kernel_spec_manager=KernelSpecManager(kernel_dirs=kernel_dirs))
  NotebookClient(notebook, km=kernels, timeout=300,
                 resources={'metadata': {'path': cwd}}).execute()
  return notebook


def outputs(notebook):
  return [output for cell in notebook.cells if cell.cell_type == 'code'
          for output in cell.outputs]


def printed(notebook) -> str:
  """Everything the cells printed (stdout and stderr)."""
  return ''.join(o.text for o in outputs(notebook) if o.output_type == 'stream')


def displayed(notebook, mime: str) -> list:
  return [o.data[mime] for o in outputs(notebook) if mime in o.get('data', {})]


def test_one_step_generation_with_a_local_model(kernel_dirs, tmp_path):
  model = str(tmp_path / 'tiny_pipeline')
  tiny_models.write_tiny_pipeline(model)
  prompts = ['a red circle', 'a blue square', 'a green cross']
  notebook = execute('one_step_generation.ipynb',
                     dict(MODEL=model, PROMPTS=prompts, REPO=runs.REPO), kernel_dirs)
  text = printed(notebook)
  assert 'nothing: it was installed already' in text  # the install guard did not reinstall
  # Tiny U-Net: 8x8 latents, a VAE that doubles them.
  timing = re.search(r'3 images of 16x16, 1 step\(s\): compile ([\d.]+) s, ([\d.]+) ms per image',
                     text)
  assert timing, text
  assert float(timing.group(2)) > 0
  assert len(displayed(notebook, 'image/png')) == 1  # the figure of the three images


def test_recipe_on_cpu_shows_the_finished_run(kernel_dirs, quick_chain, tmp_path):
  """On a workdir where every stage is complete, main only skips them: cheap."""
  workdir = str(tmp_path / 'quick')
  shutil.copytree(quick_chain, workdir)
  notebook = execute('recipe_on_cpu.ipynb', dict(REPO=runs.REPO, WORKDIR=workdir), kernel_dirs)
  for stage in runs.CHAIN:
    assert f'stage {stage}: already complete' in printed(notebook)
  with open(os.path.join(workdir, 'eval', 'report.md')) as f:
    report_file = f.read()
  table = [line for line in report_file.splitlines() if line.startswith('|')]
  links = IMAGE_LINK.findall(report_file)
  assert len(table) > 3 and 'grid.png' in links
  [shown] = displayed(notebook, 'text/markdown')
  assert all(line in shown.splitlines() for line in table)
  # The linked images are displayed, not linked (their paths are relative to eval/), after
  # one figure of the training stages' sample grids.
  assert not IMAGE_LINK.findall(shown)
  assert len(displayed(notebook, 'image/png')) == 1 + len(links)


def test_reflow_2d_toy_straightens_the_paths(kernel_dirs):
  notebook = execute('reflow_2d_toy.ipynb', dict(STEPS=300, BATCH=256, N_PAIRS=2000,
                                                 ODE_STEPS=50, N_EVAL=500, N_PATHS=50),
                     kernel_dirs)
  text = printed(notebook)
  straightness = dict(re.findall(r'straightness (\S+): ([\d.]+)', text))
  one_step_error = dict(re.findall(r'one-step error (\S+): ([\d.]+)', text))
  assert set(straightness) == set(one_step_error) == {'1-RF', '2-RF'}, text
  # Measured here: straightness 1.30 -> 0.026, one-step error 3.59 -> 0.48.
  assert float(straightness['2-RF']) < 0.25 * float(straightness['1-RF'])
  assert float(one_step_error['2-RF']) < 0.5 * float(one_step_error['1-RF'])
  assert len(displayed(notebook, 'image/png')) == 2  # the paths, the one-step samples
