r"""Runs the stages a config names, each in WORKDIR/<stage>/.

  python -m instaflow_jax.main --config=configs/shapes.py --workdir=runs/shapes

A stage already complete is skipped; one that was interrupted resumes from its latest
checkpoint. Errors the user can fix end the run with one line and a non-zero exit.

The config's `mesh` and `axis_rules` lay the run out over every device. A multi-process
run starts the same command in every process, with --distributed where JAX finds the
processes itself (TPU pods, SLURM, Open MPI) or the three flags below (see launch/).
"""
import logging as std_logging
import os
import shlex
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from instaflow_jax import cli
from instaflow_jax import huge_pages

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/NAME.py[:arg]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and samples.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Join a multi-process run, detected by JAX (TPU pod slices, SLURM, '
    'Open MPI) where the flags below are not given.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0 in a multi-process run '
    '(default: $JAX_COORDINATOR_ADDRESS).')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Number of processes of the run (default: $JAX_NUM_PROCESSES).')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'This process, 0 to num_processes - 1 (default: $JAX_PROCESS_ID).')
flags.mark_flags_as_required(['config', 'workdir'])


# Libraries whose INFO messages (per-array checkpoint details, dataset reuse) drown the
# progress lines; their warnings and errors still show.
_CHATTY_LIBRARIES = ('/orbax/', '/tensorflow_datasets/', '/jax/_src/xla_bridge')


def _quiet_chatty_libraries(record) -> bool:
  return record.levelno >= std_logging.WARNING or not any(
      lib in record.pathname for lib in _CHATTY_LIBRARIES)


def enable_compilation_cache() -> None:
  """Reuses compiled XLA programs across runs (a resumed or repeated run skips minutes of
  compilation on a CPU). JAX_COMPILATION_CACHE_DIR overrides the location."""
  import jax
  cache_dir = os.environ.get('JAX_COMPILATION_CACHE_DIR') or os.path.join(
      os.path.expanduser('~'), '.cache', 'instaflow_jax', 'xla')
  jax.config.update('jax_compilation_cache_dir', cache_dir)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


def quiet_other_processes() -> None:
  """Progress lines from process 0 only: the others would repeat them."""
  import jax
  if jax.process_index() > 0:
    logging.set_verbosity(logging.WARNING)


def loaded_config():
  """The config of --config; a file that does not load (missing, a syntax error, a
  get_config that raises) ends the run in one line."""
  config = _CONFIG.value
  try:
    config.stages  # config_flags defers a loading error to the first access
  except OSError as e:
    sys.exit(_config_not_loaded(e))
  return config


def _config_not_loaded(error: OSError) -> str:
  """The error line of a config file that does not load: the last line of config_flags'
  message says why (the file's own error), the lines above it where it looked."""
  given = [arg for arg in sys.argv[1:] if arg.startswith('--config=')]
  flag = given[-1] if given else '--config'
  return f'error: {flag} does not load: {str(error).splitlines()[-1].strip()}'


def resume_command(error) -> str:
  """The command line of this run with a tenth of the learning rate that diverged."""
  flag = f'--config.{error.stage}.optimizer.lr='
  args = [a for a in sys.argv[1:] if not a.startswith(flag)] + [f'{flag}{error.lr / 10:g}']
  return shlex.join([sys.executable, '-m', 'instaflow_jax.main', *args])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = loaded_config()
  logging.get_absl_handler().addFilter(_quiet_chatty_libraries)
  enable_compilation_cache()
  from instaflow_jax import parallel  # after flag parsing: imports jax, tensorflow
  from instaflow_jax import stages
  from instaflow_jax.training import loop
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  try:
    parallel.initialize_distributed(_DISTRIBUTED.value, _COORDINATOR.value,
                                    _NUM_PROCESSES.value, _PROCESS_ID.value)
    quiet_other_processes()
    with parallel.use(parallel.layout_from_config(config)):
      stages.run_all(config, _WORKDIR.value)
  except stages.USER_ERRORS as e:
    message = ' '.join(str(e).split())
    if isinstance(e, loop.NonFiniteLossError):
      message += f': {resume_command(e)}'
    logging.error('%s', message)
    sys.exit(f'error: {message}')


def parse_flags(argv):
  """absl flag parsing, with config errors (unknown field, wrong type, missing file)
  reported in one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'error: {cli.one_line(e)}')
  except (AttributeError, KeyError) as e:
    field = cli.one_line(e).replace("'", '')
    sys.exit(f'error: config override names an unknown field: {field}')
  except OSError as e:  # overrides applied to a config file that did not load
    sys.exit(_config_not_loaded(e))
  except (ValueError, TypeError) as e:
    sys.exit(f'error: bad config: {cli.one_line(e)}')


def configure_process() -> None:
  """The process settings of the training command, all here (importing the package sets
  none): glibc's huge pages where JAX will run on the CPU (a restart, huge_pages.py), quiet
  TensorFlow (used only by tfds and clu), and no triton for torch: torch's triton (GPU
  kernels for torch.compile) crashes the process when it is first imported after
  TensorFlow, and this command uses torch only on the CPU (the CLIP score, .bin files)."""
  huge_pages.restart_with_huge_pages()
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  sys.modules.setdefault('triton', None)


def run():
  configure_process()
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
