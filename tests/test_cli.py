"""The command lines' process set-up, done by the commands, not by importing the package."""
import subprocess
import sys

from tests import runs


def test_importing_the_package_leaves_the_process_as_it_was():
  """What the command lines set (TensorFlow, which tfds brings, sets variables of its own)."""
  script = ('import os; ours = ("XLA_FLAGS", "GLIBC_TUNABLES", "JAX_PLATFORMS"); '
            'before = [os.environ.get(k) for k in ours]; '
            'import instaflow_jax, instaflow_jax.pipeline, instaflow_jax.stages, instaflow_jax.main; '
            'print([os.environ.get(k) for k in ours] == before)')
  result = subprocess.run([sys.executable, '-c', script], cwd=runs.REPO, capture_output=True,
                          text=True, timeout=300, env={'PATH': '/usr/bin:/bin', 'HOME': '/tmp'})
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split()[-1] == 'True'
