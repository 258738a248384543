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
import tensorstore as ts
from absl import logging
from etils import epath

from instaflow_jax import parallel
from instaflow_jax import workdir as workdir_lib


# Orbax shares the writing of a replicated array among its replicas, slicing it with an
# eager op per device and shape. Below a few MiB per replica that costs more than it saves
# (half the run time of a small model on 8 CPU devices): our checkpoints split only larger
# arrays.
MIN_REPLICA_SLICE_BYTES = 4 << 20


def type_handlers():
  """Orbax's type handlers, with an array handler that splits only arrays of
  MIN_REPLICA_SLICE_BYTES per replica or more: a registry of our own, passed to the
  handlers we make, so that Orbax elsewhere in the process keeps its global one as it is."""
  registered = [(ty, ocp.type_handlers.get_type_handler(ty))
                for ty in ocp.type_handlers.supported_types()]
  arrays = ocp.type_handlers.ArrayHandler(
      min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES)
  return ocp.type_handlers.create_type_handler_registry(*registered, (jax.Array, arrays))


def _pytree_handler() -> ocp.PyTreeCheckpointHandler:
  return ocp.PyTreeCheckpointHandler(type_handler_registry=type_handlers())


def _restore_args(abstract, partial: bool = False):
  """Restores every array of `abstract` (ShapeDtypeStructs) with its shape, dtype and
  sharding; `partial`: the rest of the saved tree stays on disk."""
  return ocp.args.PyTreeRestore(
      item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
      partial_restore=partial)


def _tree_metadata(directory):
  """The tree of array metadata (shapes, dtypes) of a pytree item saved in `directory`."""
  return _pytree_handler().metadata(epath.Path(directory)).tree


class CheckpointError(OSError):
  """A checkpoint that is missing, unreadable, or does not fit the model."""


class DamagedCheckpointError(CheckpointError):
  """A checkpoint whose files are cut short or missing."""


def _name(path) -> str:
  """'down_blocks_0/resnets_1/conv1/kernel' for a pytree key path."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def _shapes(tree) -> dict:
  return {_name(path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def first_mismatch(stored, expected) -> Optional[str]:
  """Where the parameters `stored` (a checkpoint's metadata tree) and `expected` (the
  model's abstract params) first differ, in words; None when every name and shape agree."""
  stored, expected = _shapes(stored), _shapes(expected)
  for name, shape in expected.items():
    if name not in stored:
      return f'parameter {name} {shape} of the model config is not in the checkpoint'
    if stored[name] != shape:
      return (f'parameter {name} has shape {stored[name]} in the checkpoint but {shape} in '
              'the model config')
  for name, shape in stored.items():
    if name not in expected:
      return f'the checkpoint has parameter {name} {shape}, which the model config lacks'
  return None


def _extent(location: str, item_dir: str):
  """(file, end) of an OCDBT location 'kind:base/:d/FILE:OFFSET:LENGTH'."""
  _, base, name, offset, length = location.split(':')
  return os.path.join(item_dir, base, name), int(offset) + int(length)


def _check_extent(location: str, item_dir: str) -> None:
  path, end = _extent(location, item_dir)
  size = os.path.getsize(path) if os.path.exists(path) else None
  if size is None or size < end:
    found = 'missing' if size is None else f'{size} bytes'
    raise DamagedCheckpointError(f'{path} is cut short ({found}, its index needs {end} bytes)')


def check_complete(item_dir: str) -> None:
  """DamagedCheckpointError naming the first file of an array checkpoint (Orbax's OCDBT
  store) that is shorter than its index says, or missing: what a full disk or a copy that
  died leaves.

  Read from the index alone (the B-tree nodes, not the arrays), so that a damaged checkpoint
  is found before a restore starts: a restore that fails midway leaves its other reads
  failing in the background, each with a traceback."""
  if '://' in item_dir:  # object stores write whole objects or nothing
    return
  if not os.path.isfile(os.path.join(item_dir, 'manifest.ocdbt')):
    return  # not an OCDBT store: its restore reports what it finds
  try:
    kvstore = ts.KvStore.open({'driver': 'file', 'path': item_dir + '/'}).result()
    nodes = [ts.ocdbt.dump(kvstore).result()['versions'][-1]['root']['location']]
    while nodes:
      location = nodes.pop()
      _check_extent(location, item_dir)
      for entry in ts.ocdbt.dump(kvstore, location).result()['entries']:
        for value in entry.values():
          if isinstance(value, str) and value.startswith('btreenode:'):
            nodes.append(value)
          elif isinstance(value, str) and value.startswith('value:'):
            _check_extent(value, item_dir)
  except ValueError as e:  # the manifest or a node itself does not read
    raise DamagedCheckpointError(f'{item_dir}: {str(e).splitlines()[0]}') from None


class Checkpointer:
  """Saves the train state every `save_every` steps, keeps the last `max_to_keep`."""

  def __init__(self, directory: str, save_every: int, max_to_keep: int = 2):
    self.save_every = save_every
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_handlers={workdir_lib.STATE_ITEM: _pytree_handler(),
                       'meta': ocp.JsonCheckpointHandler()})

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list:
    return sorted(self._manager.all_steps())

  def check_fits(self, step: int, abstract_params) -> None:
    """CheckpointError naming the first parameter of checkpoint `step` whose name or shape
    the model's params do not have; read from its metadata alone."""
    stored = _tree_metadata(os.path.join(self.directory, str(step),
                                         workdir_lib.STATE_ITEM))['params']
    mismatch = first_mismatch(stored, abstract_params)
    if mismatch:
      raise CheckpointError(
          f'{self.directory}/{step} does not fit the model config: {mismatch}; resume with '
          'the model config the stage started with, or give another --workdir')

  def restore_latest(self, abstract_state) -> Optional[Tuple[Any, dict]]:
    """(state, meta) of the newest checkpoint that restores, or None when there is none.

    A checkpoint that does not fit the model stops the run (CheckpointError). One that
    fails to read (a file cut short by a full disk or a dead copy) is set aside, with a
    warning, for the one before it, but only once an older one has restored: when none
    does, CheckpointError names the newest one's error and nothing is moved."""
    damaged = {}  # step: why, newest first
    for step in reversed(self.all_steps()):
      try:
        check_complete(os.path.join(self.directory, str(step), workdir_lib.STATE_ITEM))
        self.check_fits(step, abstract_state.params)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=_restore_args(abstract_state), meta=ocp.args.JsonRestore()))
      except DamagedCheckpointError as e:
        error = str(e)
      except CheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except  (TensorStore raises Exception)
        error = str(e).splitlines()[0][:300]
      else:
        if damaged:
          logging.warning('%s: resuming from step %d; the damaged checkpoint(s) %s are moved '
                          'to %s', self.directory, step, list(damaged), self.rejected_dir)
          self.reject(list(damaged), 'damaged')
        return restored.state, restored.meta
      logging.warning('checkpoint %s/%d is damaged: %s', self.directory, step, error)
      damaged[step] = error
    if damaged:
      newest = next(iter(damaged))
      raise CheckpointError(
          f'{self.directory}/{newest} is damaged ({damaged[newest]}) and no older checkpoint '
          f'restores; delete {self.directory} to restart the stage')
    return None

  @property
  def rejected_dir(self) -> str:
    return os.path.join(os.path.dirname(self.directory), workdir_lib.REJECTED_DIR)

  def reject(self, steps, reason: str) -> None:
    """Moves checkpoints that a resume must not take (damaged, diverged) out of the way,
    to rejected_checkpoints/STEP-reason beside the checkpoints: kept, never restored."""
    parallel.sync(f'reject {self.directory}')
    if jax.process_index() == 0:
      os.makedirs(self.rejected_dir, exist_ok=True)
      for step in steps:
        target = os.path.join(self.rejected_dir, f'{step}-{reason}')
        while os.path.exists(target):  # rejected before, by an earlier run
          target += '+'
        os.replace(os.path.join(self.directory, str(step)), target)
    parallel.sync(f'rejected {self.directory}')
    self._manager.reload()

  def should_save(self, step: int) -> bool:
    return step % self.save_every == 0

  def save(self, step: int, state, meta: dict) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def wait(self) -> None:
    """Returns once a save in flight is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self.wait()
    self._manager.close()


def save_params(path: str, params) -> None:
  """Writes final params (what the next stage or export reads), atomically."""
  with ocp.Checkpointer(_pytree_handler()) as checkpointer:
    checkpointer.save(os.path.abspath(path), args=ocp.args.PyTreeSave(params), force=True)


def load_params(path: str, abstract_params, what: str = 'params'):
  """Reads params written by save_params into the structure of `abstract_params`; leaves
  without a sharding come whole onto this process's first device, as freshly made params
  are (the checkpoint's own sharding may name another mesh, or other processes' devices)."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f'{what}: checkpoint {path} not found')
  check_complete(path)
  here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract_params = jax.tree.map(
      lambda a: a if getattr(a, 'sharding', None) else jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                                             sharding=here),
      abstract_params)
  mismatch = first_mismatch(_tree_metadata(path), abstract_params)
  if mismatch:
    raise CheckpointError(f'{what}: checkpoint {path} does not fit the model config: {mismatch}')
  parallel.sync(f'load {path}')  # Orbax's own barriers are collectives
  try:
    with ocp.Checkpointer(_pytree_handler()) as checkpointer:
      return checkpointer.restore(path, args=_restore_args(abstract_params))
  except (ValueError, KeyError) as e:
    raise CheckpointError(f'{what}: checkpoint {path} does not fit the model config: '
                          f'{str(e).splitlines()[0]}') from None


def load_trained_params(trained: workdir_lib.TrainedParams, abstract_params,
                        what: str = 'params'):
  """The U-Net params that find_trained_params found: final params, or those of a train
  state checkpoint. `what` names them in messages."""
  if not trained.state_key:
    return load_params(trained.params_path, abstract_params, what)
  return _train_state_params(trained.params_path, trained.state_key, abstract_params)


def _train_state_params(step_dir: str, key: str, abstract_params):
  """The params `key` of a train state that Checkpointer saved, read alone (the
  optimizer state stays on disk), with the model's parameter names and shapes."""
  state_dir = epath.Path(step_dir) / workdir_lib.STATE_ITEM
  mismatch = first_mismatch(_tree_metadata(state_dir).get(key), abstract_params)
  if mismatch:
    raise CheckpointError(f'{step_dir}: its {key} do not fit the model config: {mismatch}')
  target = {key: abstract_params}
  try:
    restored = _pytree_handler().restore(state_dir, args=_restore_args(target, partial=True))
  except ValueError as e:
    raise CheckpointError(f'{step_dir}: does not fit the model config: '
                          f'{str(e).splitlines()[0]}') from None
  return restored[key]


def top_level_names(path: str) -> set:
  """The top-level keys of the params tree saved at `path` (read from its metadata)."""
  return set(_tree_metadata(os.path.abspath(path)).keys())


def abstract_like(tree):
  """ShapeDtypeStructs of a pytree of arrays, to restore into."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def with_shardings(abstract, shardings):
  """ShapeDtypeStructs that restore each array straight into its sharding, whatever mesh
  the checkpoint was written from (Orbax reads the slices each device needs)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)
