"""Our checkpoints leave Orbax as it was for the rest of the process."""
import subprocess
import sys

from instaflow_jax import checkpoint
from tests import runs

_SCRIPT = '''
import sys
import jax, jax.numpy as jnp, orbax.checkpoint as ocp
default = ocp.type_handlers.get_type_handler(jax.Array)
from instaflow_jax import checkpoint
checkpoint.save_params(sys.argv[1] + '/params', {'w': jnp.ones(4)})
saver = checkpoint.Checkpointer(sys.argv[1] + '/checkpoints', save_every=1)
saver.save(1, {'w': jnp.ones(4)}, {'step': 1})
saver.close()
ours = checkpoint.type_handlers().get(jax.Array)
print(ocp.type_handlers.get_type_handler(jax.Array) is default,
      default._min_slice_bytes_for_replica_parallel,
      ours._min_slice_bytes_for_replica_parallel)
'''


def test_orbax_global_array_handler_stays_as_it_was(tmp_path):
  """Importing the module and saving with it leave Orbax's global jax.Array handler (what
  other code in the process saves with) as it was; our handlers split only large arrays."""
  result = subprocess.run([sys.executable, '-c', _SCRIPT, str(tmp_path)], cwd=runs.REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  unchanged, default_bytes, our_bytes = result.stdout.split()[-3:]
  assert unchanged == 'True'
  assert default_bytes != our_bytes == str(checkpoint.MIN_REPLICA_SLICE_BYTES)
