"""What the command lines share: flag parsing, one-line errors, and output that appears
only when a command has succeeded.

Bad input (a missing file, a model path of no known kind, an unwritable output) stops a
command before any compute with one line `error: ...` and exit status 1.
"""
import contextlib
import os
import shutil
import sys
import tempfile
from typing import Sequence

from absl import app
from absl import flags
from absl import logging

# Bad input (a path, a file, a config) rather than a bug; checkpoint.CheckpointError and
# convert's ConversionError are among them.
USER_INPUT_ERRORS = (ValueError, OSError)


def one_line(error: Exception) -> str:
  """An error's message on one line: absl joins several flag errors with newlines, and
  config_flags embeds a traceback whose last line says what went wrong."""
  text = str(error).replace('\\n', '\n').replace("\\'", "'")
  lines = [' '.join(line.split()) for line in text.splitlines() if line.strip()]
  if any(line.startswith('Traceback') for line in lines):
    lines = lines[-1:]
  return '; '.join(lines).strip("'")


@contextlib.contextmanager
def staged_output(out: str, into_existing: bool = False):
  """A staging directory whose contents become `out` only when the block succeeds: nothing
  is written on failure, and a failed write leaves nothing half-made.

  The staging directory is made now, which checks that `out` is writable. With
  into_existing, an existing `out` receives the files (each replaced by name); otherwise
  `out` must not exist, and the whole directory appears at once.
  """
  out = os.path.abspath(out)
  exists = os.path.exists(out)
  if exists and not (into_existing and os.path.isdir(out)):
    raise OSError(f'--out={out} exists; give a new path (nothing is overwritten)')
  try:
    os.makedirs(os.path.dirname(out), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(out)}.tmp-',
                               dir=out if exists else os.path.dirname(out))
  except OSError as e:
    raise OSError(f'--out={out} is not writable ({e.strerror or e})') from None
  try:
    yield staging
    if exists:
      for name in sorted(os.listdir(staging)):
        os.replace(os.path.join(staging, name), os.path.join(out, name))
    else:
      os.rename(staging, out)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def run_command(flag_values: flags.FlagValues, argv: Sequence[str], command) -> None:
  """Parses `argv` (argv[0] is the program) into `flag_values` and runs command(); bad
  input ends the process with one line `error: ...` and exit status 1."""
  try:
    if flag_values.is_parsed():  # run again in one process (tests): start from the defaults
      flag_values.unparse_flags()
    extra = flag_values(argv)[1:]
    if extra:
      raise ValueError(f'unexpected arguments: {extra}')
    command()
  except (flags.Error, *USER_INPUT_ERRORS) as e:
    sys.exit(f'error: {one_line(e)}')


def _parse_absl_flags(argv: Sequence[str]) -> Sequence[str]:
  """absl's own flags (--help, --verbosity); the rest is left to main."""
  rest = flags.FLAGS(argv, known_only=True)
  if flags.FLAGS['verbosity'].using_default_value:
    # Libraries' INFO lines (dozens per Orbax save) would drown ours; --verbosity=0 shows them.
    flags.FLAGS.verbosity = logging.WARNING
  return rest


def run_main(main) -> None:
  """app.run for a command line whose flags are its own FlagValues, parsed by `main`."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TensorFlow comes with tfds and clu
  app.run(main, flags_parser=_parse_absl_flags)
