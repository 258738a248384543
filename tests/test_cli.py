"""The command lines' process set-up: XLA:CPU's flags, added by the commands, not the import."""
import subprocess
import sys

from instaflow_jax import cli
from tests import runs


def test_the_cpu_flags_join_the_users_and_never_replace_them():
  environ = {'XLA_FLAGS': '--xla_dump_to=/tmp/d'}
  cli.add_cpu_xla_flags(environ)
  assert environ['XLA_FLAGS'] == ('--xla_dump_to=/tmp/d '
                                  '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution')
  chosen = {'XLA_FLAGS': '--xla_cpu_experimental_ynn_fusion_type=default'}
  cli.add_cpu_xla_flags(chosen)
  assert chosen == {'XLA_FLAGS': '--xla_cpu_experimental_ynn_fusion_type=default'}
  empty = {}
  cli.add_cpu_xla_flags(empty)
  assert empty == {'XLA_FLAGS': '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution'}


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
