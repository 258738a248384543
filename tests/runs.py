"""Running `python -m instaflow_jax.main` from tests, as a user does."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAIN = ('rf', 'pairs', 'reflow', 'distill', 'eval')


def main_command(workdir, tfds_dir, *extra, stages=('rf',), config='configs/shapes.py:quick'):
  """`config` (the quick embedded default) into `workdir`, running `stages`."""
  stage_list = ','.join(f'"{s}"' for s in stages)
  return [sys.executable, '-m', 'instaflow_jax.main', f'--config={config}',
          f'--workdir={workdir}', f'--config.data.data_dir={tfds_dir}',
          f'--config.stages=({stage_list},)', *extra]


def run_main(workdir, tfds_dir, *extra, timeout=900, **command):
  return subprocess.run(main_command(workdir, tfds_dir, *extra, **command), cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)


def last_line(result) -> str:
  return result.stderr.strip().splitlines()[-1]
