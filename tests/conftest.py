"""Test set-up: JAX on the CPU in float32 with a shared compilation cache, compiled at LLVM's
lowest optimisation level, one prepared copy of the captioned-shapes dataset and one run of
the quick chain for the session."""
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Subprocesses (main runs) inherit it: repeated runs of a config compile once.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(_REPO, '.cache', 'jax'))
# Compiling, not running, is most of the suite's time: at LLVM's lowest level XLA:CPU
# compiles a U-Net 35-40% faster. The HLO programs under test are the same; the main runs
# in subprocesses inherit the flag, so every comparison has both sides compiled alike.
_FAST_COMPILE = '--xla_backend_optimization_level=0'
if _FAST_COMPILE not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = ' '.join(filter(None, [os.environ.get('XLA_FLAGS'), _FAST_COMPILE]))
# triton, torch's GPU compiler, segfaults when it is loaded after TensorFlow in one process
# (tensorflow-cpu 2.21, torch 2.14.1). diffusers, torchvision and transformers' models try
# to import it, and a session loads TensorFlow (clu, tfds) whenever its first module that
# uses it comes, before or after them. The tests run on the CPU and use no triton: it is
# marked absent, and torch takes it for not installed.
sys.modules['triton'] = None

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')


@pytest.fixture
def cpu_kernels_on(monkeypatch):
  """The layers' C++ kernels on whatever CPU runs the tests (by default only where it has
  AVX-512): for the tests of the kernels and of the paths that use them."""
  monkeypatch.setenv('INSTAFLOW_JAX_CPU_KERNELS', 'kernel')


def _made_once(tmp_path_factory, name: str, make) -> str:
  """A directory that `make(path)` fills once for the whole run: under pytest-xdist, the
  first worker to ask makes it (the others wait on a lock), in the directory the workers'
  own temporary directories share."""
  if os.environ.get('PYTEST_XDIST_WORKER') is None:
    path = tmp_path_factory.mktemp(name)
    make(str(path))
    return str(path)
  import filelock
  path = tmp_path_factory.getbasetemp().parent / name
  with filelock.FileLock(f'{path}.lock'):
    if not (path / '.made').exists():
      path.mkdir(exist_ok=True)
      make(str(path))
      (path / '.made').touch()
  return str(path)


def _prepare_quick_dataset(data_dir: str):
  """configs/shapes.py:quick's dataset, prepared before any test reads it: tfds must not
  build one dataset in two processes at once."""
  from configs import shapes as shapes_configs
  from instaflow_jax.data import shapes
  config = shapes_configs.get_config('quick').data
  shapes.prepared_builder(config.image_size, data_dir)


@pytest.fixture(scope='session')
def tfds_dir(tmp_path_factory):
  """A tfds data_dir shared by the tests that run main on configs/shapes.py:quick."""
  return _made_once(tmp_path_factory, 'tensorflow_datasets', _prepare_quick_dataset)


@pytest.fixture(scope='session')
def quick_chain(tmp_path_factory, tfds_dir):
  """One uninterrupted run of configs/shapes.py:quick through every stage: the reference
  that the resume, stage and bad-input tests compare against and start from."""
  from tests import runs

  def run_chain(workdir):
    result = runs.run_main(workdir, tfds_dir, stages=runs.CHAIN)
    assert result.returncode == 0, result.stderr[-3000:]
  return _made_once(tmp_path_factory, 'quick_chain', run_chain)


def pytest_configure(config):
  config.addinivalue_line(
      'markers', 'slow: runs the chain, main in a subprocess, several processes or the large '
      'parity checks; `pytest -m "not slow"` is the quick tier for the edit-test loop')


# The modules that take longest, longest first. Under pytest-xdist each module runs whole on
# one worker (pytest.ini: --dist loadscope), in this order, then the rest in file order:
# the long ones start while there is other work for the second worker, and the module that
# makes the quick chain comes first, so that the chain is there before most of its users.
_LONGEST_MODULES = ('test_bad_inputs', 'test_own_data', 'test_stages', 'test_parallel',
                    'test_main', 'test_colabs', 'test_sd_chain', 'test_lora_training')


def _module_rank(item) -> int:
  name = os.path.basename(item.nodeid.split('::')[0])[:-len('.py')]
  return _LONGEST_MODULES.index(name) if name in _LONGEST_MODULES else len(_LONGEST_MODULES)


def pytest_collection_modifyitems(items):
  """Every test that uses the quick chain is slow: the chain alone outlasts the quick tier's
  budget. The longest modules first (a stable sort: each module's tests stay together)."""
  for item in items:
    if 'quick_chain' in getattr(item, 'fixturenames', ()):
      item.add_marker(pytest.mark.slow)
  items.sort(key=_module_rank)
