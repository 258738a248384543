"""Orbax checkpoints: the train state every N steps (resumable), and final params per stage.

Every process calls save and restore; each writes and reads the slices of the arrays its
devices hold, so a checkpoint written on one mesh (or number of processes) restores on
another.

Orbax writes each checkpoint to a temporary directory and renames it when complete, so a
run killed mid-save leaves the previous checkpoint intact. The data position and the
random stream are functions of the step, so the step restores them exactly.
"""
import os
from typing import Any, Optional, Tuple

import jax
import orbax.checkpoint as ocp

from instaflow_jax import parallel


# Orbax shares the writing of a replicated array among its replicas, slicing it with an
# eager op per device and shape. Below a few MiB per replica that costs more than it saves
# (half the run time of a small model on 8 CPU devices): only larger arrays are split.
ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=4 << 20),
    override=True)


class CheckpointError(RuntimeError):
  """A checkpoint that is missing or does not fit the model."""


class Checkpointer:
  """Saves the train state every `save_every` steps, keeps the last `max_to_keep`."""

  def __init__(self, directory: str, save_every: int, max_to_keep: int = 2):
    self.save_every = save_every
    self._manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_names=('state', 'meta'))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def restore_latest(self, abstract_state) -> Optional[Tuple[Any, dict]]:
    """(state, meta) of the latest checkpoint, or None when there is none."""
    step = self._manager.latest_step()
    if step is None:
      return None
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored.state, restored.meta

  def should_save(self, step: int) -> bool:
    return step % self.save_every == 0

  def save(self, step: int, state, meta: dict) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def save_params(path: str, params) -> None:
  """Writes final params (what the next stage or export reads), atomically."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(path), params, force=True)
  checkpointer.wait_until_finished()


def load_params(path: str, abstract_params, what: str = 'params'):
  """Reads params written by save_params into the structure of `abstract_params`; leaves
  without a sharding come whole onto this process's first device, as freshly made params
  are (the checkpoint's own sharding may name another mesh, or other processes' devices)."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f'{what}: checkpoint {path} not found')
  here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract_params = jax.tree.map(
      lambda a: a if getattr(a, 'sharding', None) else jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                                             sharding=here),
      abstract_params)
  parallel.sync(f'load {path}')  # Orbax's own barriers are collectives
  try:
    return ocp.StandardCheckpointer().restore(path, abstract_params)
  except (ValueError, KeyError) as e:
    raise CheckpointError(f'{what}: checkpoint {path} does not fit the model config: '
                          f'{str(e).splitlines()[0]}') from None


def top_level_names(path: str) -> set:
  """The top-level keys of the params tree saved at `path` (read from its metadata)."""
  return set(ocp.StandardCheckpointer().metadata(os.path.abspath(path)).item_metadata.keys())


def abstract_like(tree):
  """ShapeDtypeStructs of a pytree of arrays, to restore into."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def with_shardings(abstract, shardings):
  """ShapeDtypeStructs that restore each array straight into its sharding, whatever mesh
  the checkpoint was written from (Orbax reads the slices each device needs)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)
