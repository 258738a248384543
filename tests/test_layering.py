"""The package's imports follow its layering (README, "Where things are"), read with ast.

A unit is a subpackage (models, flow, data, evaluation, convert, training, stages) or a
top-level module. A unit imports only units of its own layer or below, and the units
import each other without a cycle. `__main__.py` files are entry points, never imported:
they may import anything.
"""
import ast
import os

import pytest

from tests import runs

PACKAGE = 'instaflow_jax'
LAYERS = (
    # the run directory, checkpoints, devices, images, config checks
    {'workdir', 'checkpoint', 'parallel', 'images', 'config_checks', 'huge_pages'},
    # networks, flows and samplers, data, metrics
    {'models', 'flow', 'data', 'evaluation'},
    # PyTorch / diffusers weights <-> ours
    {'convert'},
    # inference: a model's networks and params, a stage's trained U-Net (its LoRA merged),
    # its text side, the jitted sampler
    {'pipeline', 'trained_unet', 'text_side', 'sampling'},
    # the train state and loop
    {'training'},
    # the recipe's stages
    {'stages'},
    # command lines
    {'cli', 'main', 'generate', 'convert_cli', 'serve'},
)
LAYER_OF = {unit: index for index, layer in enumerate(LAYERS) for unit in layer}
# Inference (sampling, export) runs without the training code, directly or through others.
INFERENCE = ('pipeline', 'trained_unet', 'text_side', 'sampling', 'generate', 'convert_cli',
             'serve')
TRAINING = ('training', 'stages')


def _unit(module: str) -> str:
  """'instaflow_jax.models.unet' -> 'models'; 'instaflow_jax' -> ''."""
  parts = module.split('.')
  return parts[1] if len(parts) > 1 else ''


def _module_name(path: str) -> str:
  relative = os.path.relpath(path, runs.REPO)[:-len('.py')].split(os.sep)
  if relative[-1] == '__init__':
    relative = relative[:-1]
  return '.'.join(relative)


def _imported_modules(path: str) -> set:
  """Every instaflow_jax module that the file imports, at any depth of its code."""
  module = _module_name(path)
  package = module if path.endswith('__init__.py') else module.rpartition('.')[0]
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        anchor = package.split('.')[:len(package.split('.')) - node.level + 1]
        base = '.'.join(anchor + ([node.module] if node.module else []))
      found.update(f'{base}.{alias.name}' for alias in node.names)
      found.add(base)
  return {name for name in found if name.split('.')[0] == PACKAGE}


def _package_files():
  for root, _, files in os.walk(os.path.join(runs.REPO, PACKAGE)):
    for name in sorted(files):
      if name.endswith('.py') and name != '__main__.py':
        yield os.path.join(root, name)


def unit_imports() -> dict:
  """{unit: {(imported unit, importing module)}} over the package, entry points aside."""
  edges = {}
  for path in _package_files():
    unit = _unit(_module_name(path))
    for imported in _imported_modules(path):
      target = _unit(imported)
      if target and target != unit:
        edges.setdefault(unit, set()).add((target, _module_name(path)))
  return edges


def test_every_unit_has_a_layer():
  units = {_unit(_module_name(path)) for path in _package_files()} - {''}
  assert units - set(LAYER_OF) == set(), 'add the new unit to LAYERS and to the README'


def test_no_unit_imports_a_higher_layer():
  upward = sorted(f'{module} imports {target} (layer {LAYER_OF[target]} > {LAYER_OF[unit]})'
                  for unit, targets in unit_imports().items()
                  for target, module in targets if LAYER_OF[target] > LAYER_OF[unit])
  assert upward == []


def test_no_cycle_between_units():
  graph = {unit: {target for target, _ in targets} for unit, targets in unit_imports().items()}
  visiting, done, cycles = [], set(), []

  def visit(unit):
    if unit in visiting:
      cycles.append(visiting[visiting.index(unit):] + [unit])
      return
    if unit in done:
      return
    visiting.append(unit)
    for target in sorted(graph.get(unit, ())):
      visit(target)
    visiting.pop()
    done.add(unit)

  for unit in sorted(graph):
    visit(unit)
  assert cycles == []


def test_inference_reaches_no_training_code():
  graph = {unit: {target for target, _ in targets} for unit, targets in unit_imports().items()}
  reached = {}
  for start in INFERENCE:
    seen, todo = set(), [start]
    while todo:
      for target in graph.get(todo.pop(), ()):
        if target not in seen:
          seen.add(target)
          todo.append(target)
    reached[start] = sorted(seen & set(TRAINING))
  assert reached == {unit: [] for unit in INFERENCE}


@pytest.mark.parametrize('source, expected', [
    ('from instaflow_jax.convert import torch_names\n', {'convert'}),
    ('from ..pipeline import Pipeline\n', {'pipeline'}),
    ('def f():\n  from instaflow_jax.training import loop\n', {'training'}),
])
def test_the_walk_sees_each_kind_of_import(tmp_path, monkeypatch, source, expected):
  """Absolute, relative and function-level imports all count (a check of the checker)."""
  package = tmp_path / PACKAGE / 'models'
  package.mkdir(parents=True)
  (package / 'probe.py').write_text(source)
  monkeypatch.setattr(runs, 'REPO', str(tmp_path))
  found = _imported_modules(str(package / 'probe.py'))
  assert {_unit(name) for name in found} - {''} == expected
