"""Prepares benchmarks/gpu.sh's run on a lent GPU machine that has no internet: run it here,
with internet, before the device call.

  .venv/bin/python benchmarks/prepare_gpu.py

1. Downloads the wheels of the Python packages that the benchmark needs and that machine
   lacks (WHEELS; pure Python, for its Python 3.12 on x86-64 Linux) into .whl/
   (git-ignored; the device call carries it), replacing what was there, and prints their
   total size, which has to stay well under the 64 MiB that a call may carry.
2. Checks that the benchmark's imports of this repository need nothing else that machine
   lacks: in a fresh process where the packages of ABSENT_THERE cannot be imported, it
   imports every instaflow_jax and configs module that benchmarks/bench*.py imports, and
   names the module that imports one of them. Exits 1 if any does.
"""
import ast
import glob
import os
import shutil
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEEL_DIR = os.path.join(REPO_ROOT, '.whl')
WHEELS = {'diffusers': '0.42.1', 'ml_collections': '1.1.0'}
MAX_BYTES = 32 * 2 ** 20
# Installed here (with the package's other dependencies) but not on that machine, and far
# too large to carry (TensorFlow alone is hundreds of MiB): the benchmark must not need them.
ABSENT_THERE = ('tensorflow', 'tensorflow_datasets', 'clu', 'array_record', 'keras')
PLATFORM_FLAGS = ['--only-binary=:all:', '--python-version', '3.12', '--implementation', 'cp',
                  '--platform', 'manylinux_2_28_x86_64', '--platform', 'manylinux2014_x86_64',
                  '--platform', 'any']

# Run in a fresh process: make ABSENT_THERE unimportable, import each module, report.
_IMPORT_CHECK = r'''
import importlib, importlib.abc, os, sys, traceback
absent, modules, root = sys.argv[1].split(','), sys.argv[2].split(','), sys.argv[3]

class Absent(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name.split('.')[0] in absent:
      ours = [f.filename for f in traceback.extract_stack()
              if f.filename.startswith(root) and not f.filename.startswith(sys.prefix)]
      importer = os.path.relpath(ours[-1], root) if ours else 'a third-party package'
      raise ImportError(f'{name}, imported by {importer}')

sys.meta_path.insert(0, Absent())
failed = []
for module in modules:
  try:
    importlib.import_module(module)
  except ModuleNotFoundError as e:
    if e.name != module:  # else `module` is a name imported from a module, not a module
      failed.append(f'{module}: {e}')
  except ImportError as e:
    failed.append(f'{module}: needs {e}')
print('\n'.join(failed))
sys.exit(1 if failed else 0)
'''


def download_wheels() -> int:
  """WHEELS into WHEEL_DIR, emptied first (two versions of a package stop the install
  there). Returns their total size in bytes."""
  shutil.rmtree(WHEEL_DIR, ignore_errors=True)
  pins = [f'{name}=={version}' for name, version in WHEELS.items()]
  download = subprocess.run([sys.executable, '-m', 'pip', 'download', '--no-deps',
                             *PLATFORM_FLAGS, '-d', WHEEL_DIR, *pins])
  if download.returncode:
    sys.exit(f'prepare_gpu.py: pip download of {" ".join(pins)} failed (above): this needs '
             'the package index, so run it where there is internet access')
  wheels = sorted(glob.glob(os.path.join(WHEEL_DIR, '*.whl')))
  for path in wheels:
    print(f'{os.path.getsize(path) / 2 ** 20:8.2f} MiB  {os.path.basename(path)}')
  return sum(os.path.getsize(path) for path in wheels)


def benchmark_imports() -> list:
  """Every module (or name in a module) of instaflow_jax and configs that
  benchmarks/bench*.py imports, at any depth of their code."""
  found = set()
  for path in glob.glob(os.path.join(REPO_ROOT, 'benchmarks', 'bench*.py')):
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        found.update(alias.name for alias in node.names)
      elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        found.add(node.module)
        found.update(f'{node.module}.{alias.name}' for alias in node.names)
  return sorted(m for m in found if m.split('.')[0] in ('instaflow_jax', 'configs'))


def check_imports() -> bool:
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get('PYTHONPATH')])))
  result = subprocess.run([sys.executable, '-c', _IMPORT_CHECK, ','.join(ABSENT_THERE),
                           ','.join(benchmark_imports()), REPO_ROOT],
                          env=env, cwd=REPO_ROOT, capture_output=True, text=True)
  if result.returncode:
    print('the benchmark imports what the GPU machine lacks:\n' + result.stdout
          + result.stderr[-2000:])
  return result.returncode == 0


def main() -> None:
  total = download_wheels()
  print(f'{total / 2 ** 20:8.2f} MiB in {os.path.relpath(WHEEL_DIR)}/ '
        f'(at most {MAX_BYTES / 2 ** 20:.0f} MiB)')
  if total > MAX_BYTES:
    sys.exit(f'prepare_gpu.py: the wheels take {total / 2 ** 20:.1f} MiB, over '
             f'{MAX_BYTES / 2 ** 20:.0f} MiB: the device call carries the working tree too')
  if not check_imports():
    sys.exit(1)
  print(f'ready: carry {os.path.relpath(WHEEL_DIR, REPO_ROOT)} and run '
        'bash benchmarks/gpu.sh [--rows ...]')


if __name__ == '__main__':
  main()
