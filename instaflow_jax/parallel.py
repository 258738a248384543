"""Meshes, shardings and multi-process set-up: how one run spreads over devices and hosts.

A run's layout comes from its config (configs/shapes.py):

  mesh            named mesh axes and their sizes, {data: -1, fsdp: 1, tensor: 1} by
                  default; -1 takes the devices the other axes leave
  axis_rules      logical axis name -> mesh axes: the parameter axes the models annotate
                  (models/layers.py: embed, mlp, conv_in, conv_out, norm, vocab) and the
                  activation axis 'batch'
  min_shard_size  parameters with fewer elements stay replicated: sharding them saves
                  little memory and costs a collective each

Parameters follow their logical axes through the rules (FSDP puts 'embed' and 'conv_in'
on the fsdp axis, tensor parallelism 'mlp' and 'conv_out' on the tensor axis); a dimension
that its mesh axes do not divide stays whole. The optimizer moments follow their
parameters (training/state.py); step counts, frozen networks and RNG keys are replicated.
A batch is split over the mesh axes of 'batch'; each process feeds its own slice of the
global batch (data/input.py), assembled with jax.make_array_from_process_local_data, so
the input pipeline never sees the mesh.

main enters the config's layout (`use`); the training loop and the stages read it with
`current_layout`, which without one is plain data parallelism over every device.
"""
import contextlib
import dataclasses
import itertools
import math
import os
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import mesh_utils
from jax.experimental import multihost_utils
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# The logical axes of the models (models/layers.py) and of the activations' batch, on the
# mesh axes: the batch over data and fsdp, FSDP on the weights' input width, tensor
# parallelism on their output width; norms and embeddings stay whole. Configs start here.
AXIS_RULES = (
    ('batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),
    ('conv_in', 'fsdp'),
    ('mlp', 'tensor'),
    ('conv_out', 'tensor'),
    ('norm', None),
    ('vocab', None),
)

BATCH = 'batch'  # the logical name of the batch axis of activations
DATA_PARALLEL_RULES = ((BATCH, 'data'),)

Rules = Tuple[Tuple[str, Any], ...]


@dataclasses.dataclass(frozen=True)
class Layout:
  """A device mesh and the rules that place arrays on it."""
  mesh: Mesh
  rules: Rules
  min_shard_size: int = 0

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def batch_axes(self) -> Tuple[str, ...]:
    return _axis_names(nn.logical_to_mesh_axes((BATCH,), self.rules)[0])

  @property
  def batch_parallelism(self) -> int:
    """How many ways a batch is split (the product of the batch axes' sizes)."""
    return math.prod(self.mesh.shape[axis] for axis in self.batch_axes)

  @property
  def batch_sharding(self) -> NamedSharding:
    """The leading (batch) axis split over the batch axes, the rest whole."""
    return NamedSharding(self.mesh, P(self.batch_axes or None))

  def describe(self) -> str:
    return ' x '.join(f'{name}={size}' for name, size in self.mesh.shape.items())

  def check_batch_size(self, batch_size: int, what: str, micro_batches: int = 1) -> None:
    """A clear error, before any compile, for a batch the batch axes cannot split evenly
    (into each of `micro_batches` micro-batches)."""
    ways = self.batch_parallelism * micro_batches
    if batch_size % ways:
      per = f' x {micro_batches} micro-batches' if micro_batches > 1 else ''
      raise ValueError(f'{what}={batch_size} is not divisible by the {self.batch_parallelism} '
                       f"devices of the batch axes {'+'.join(self.batch_axes)} (mesh "
                       f'{self.describe()}){per}; use a multiple of {ways}')

  def param_sharding(self, shape: Sequence[int], logical: Optional[P]) -> NamedSharding:
    """Where a parameter of `shape` with logical axes `logical` lives (None: replicated).
    A dimension stays whole where its mesh axes have size 1 or do not divide it."""
    if logical is None or math.prod(shape) < self.min_shard_size:
      return self.replicated
    mesh_axes = nn.logical_to_mesh_axes(tuple(logical), self.rules)
    spec = [axes if self._size(axes) > 1 and size % self._size(axes) == 0 else None
            for size, axes in zip(shape, mesh_axes)]
    return NamedSharding(self.mesh, P(*spec)) if any(spec) else self.replicated

  def param_shardings(self, params, axes=None):
    """Shardings of a params tree, from its logical axes (a tree of PartitionSpecs, as
    `logical_axes(module)` gives); everything replicated without them."""
    if axes is None:
      return jax.tree.map(lambda _: self.replicated, params)
    return jax.tree.map(lambda x, logical: self.param_sharding(np.shape(x), logical), params,
                        axes)

  def shard_batch(self, local_batch):
    """This process's slice of the global batch -> global arrays split over the batch axes."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(x)),
        local_batch)

  def _size(self, axes) -> int:
    return math.prod(self.mesh.shape[axis] for axis in _axis_names(axes))


def _axis_names(axes) -> Tuple[str, ...]:
  """Mesh axes given as None, a name, or a tuple of names, as a tuple."""
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def create_mesh(axes: Mapping[str, int], devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A mesh with the named axes and sizes of `axes` (in order, outermost first; one size
  may be -1: the devices left), over `devices` (default: every device of every process)."""
  devices = list(jax.devices() if devices is None else devices)
  names, sizes = tuple(axes), [int(size) for size in axes.values()]
  described = ', '.join(f'{name}={size}' for name, size in zip(names, sizes))
  if sizes.count(-1) > 1 or any(size < 1 and size != -1 for size in sizes):
    raise ValueError(f'config.mesh ({described}): sizes must be positive, with at most one -1')
  fixed = math.prod(size for size in sizes if size != -1)
  if -1 in sizes and len(devices) % fixed == 0:
    sizes[sizes.index(-1)] = len(devices) // fixed
  if math.prod(sizes) != len(devices):
    raise ValueError(f'config.mesh ({described}) does not divide the {len(devices)} devices '
                     f'of this run ({jax.process_count()} process(es) x '
                     f'{jax.local_device_count()}); the sizes must multiply to {len(devices)}')
  return Mesh(mesh_utils.create_device_mesh(sizes, devices), names,
              axis_types=(AxisType.Auto,) * len(names))


def layout_from_config(config, devices: Optional[Sequence[Any]] = None) -> Layout:
  """The layout that a run config's `mesh`, `axis_rules` and `min_shard_size` describe,
  over every device (or `devices`)."""
  mesh = create_mesh(dict(config.mesh), devices)
  rules = tuple((name, axes) for name, axes in config.axis_rules)
  for name, axes in rules:
    unknown = [axis for axis in _axis_names(axes) if axis not in mesh.shape]
    if unknown:
      raise ValueError(f'config.axis_rules map {name!r} to mesh axis {unknown[0]!r}, which '
                       f'config.mesh ({", ".join(mesh.axis_names)}) does not have')
  layout = Layout(mesh, rules, config.min_shard_size)
  _check_one_param_axis(layout)
  return layout


def _check_one_param_axis(layout: Layout) -> None:
  """Refuses params split over two mesh axes at once (FSDP with tensor parallelism): XLA's
  partitioner then computes wrong gradients through a concatenation along a split channel
  axis, which every U-Net skip connection is (seen with jax 0.10.2 on CPU: conv, concat,
  conv; the forward pass is right)."""
  axes = sorted({axis for name, mesh_axes in layout.rules if name != BATCH
                 for axis in _axis_names(mesh_axes) if layout.mesh.shape[axis] > 1})
  if len(axes) > 1:
    raise ValueError(f'config.mesh ({layout.describe()}) splits params over '
                     f'{" and ".join(axes)} at once, for which XLA computes wrong gradients '
                     "through the U-Net's skip concatenations; give only one of them a size "
                     'above 1')


def data_parallel(devices: Optional[Sequence[Any]] = None) -> Layout:
  """Every device (or `devices`) on one 'data' axis; parameters replicated."""
  devices = jax.devices() if devices is None else devices
  return Layout(create_mesh({'data': len(devices)}, devices), DATA_PARALLEL_RULES)


_ACTIVE = []


@contextlib.contextmanager
def use(layout: Layout) -> Iterator[Layout]:
  """Makes `layout` the one that `current_layout` returns inside the block, and its mesh
  JAX's mesh in context (jax.set_mesh: what is traced inside, e.g. the TPU's attention
  kernel, can split itself over the mesh's batch axes)."""
  _ACTIVE.append(layout)
  try:
    with jax.set_mesh(layout.mesh):
      yield layout
  finally:
    _ACTIVE.pop()


def current_layout() -> Layout:
  return _ACTIVE[-1] if _ACTIVE else data_parallel()


def logical_axes(module: nn.Module):
  """The logical axes (PartitionSpecs) of a module's params, from its annotations, without
  computing any parameter (eval_shape of init on the module's example inputs)."""
  variables = jax.eval_shape(module.init, jax.random.key(0), *module.example_inputs())
  return nn.get_partition_spec(variables)['params']


def put(tree, shardings):
  """Places a tree of arrays (numpy, on one of this process's devices, or replicated on any
  mesh) onto `shardings` (one, or a matching tree). Through the host: on CPU and GPU, JAX
  does not move an array onto a mesh that spans other processes' devices."""
  return jax.device_put(jax.tree.map(np.asarray, tree), shardings)


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name)
  return None if value is None else int(value)


def initialize_distributed(auto: bool = False, coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
  """Joins a multi-process run (jax.distributed) before anything uses a device.

  Explicitly: the three arguments, each falling back to JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES, JAX_PROCESS_ID. `auto`: JAX detects what is not given (TPU pod
  slices, SLURM, Open MPI). With none of these, the run is one process.
  """
  explicit = {
      'coordinator_address': coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS'),
      'num_processes': _env_int('JAX_NUM_PROCESSES') if num_processes is None else num_processes,
      'process_id': _env_int('JAX_PROCESS_ID') if process_id is None else process_id}
  missing = [name for name, value in explicit.items() if value is None]
  if not auto and len(missing) == len(explicit):
    return
  if not auto and missing:
    raise ValueError(f'multi-process run: --{", --".join(missing)} not given (the coordinator '
                     'address, number of processes and process id go together; or use '
                     '--distributed where JAX detects them: TPU pods, SLURM, Open MPI)')
  jax.distributed.initialize(**explicit)


# A process may arrive hours after the others (process 0 preparing a dataset), or minutes
# (compiling what the others found in the compilation cache).
_BARRIER_TIMEOUT_MS = 6 * 3600 * 1000
_barriers = itertools.count()


def sync(name: str) -> None:
  """Waits until every process has arrived here (a no-op in a single-process run).

  A barrier of JAX's coordination service rather than a collective on the devices: on CPU
  (gloo) the first collective among a set of devices fails when a process comes more than
  30 s after the others, so code that does collectives right after work that takes
  different time on different processes (compiling, loading) meets here first."""
  if jax.process_count() > 1:
    ocp.multihost.get_barrier_sync_fn()(key=f'{name} #{next(_barriers)}',
                                        timeout_ms=_BARRIER_TIMEOUT_MS)


def any_process(flag: bool) -> bool:
  """Whether `flag` is set on any process (every process gets the same answer)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.bool_(flag))))


def process_0_first(name: str, fn: Callable[[], Any]) -> Any:
  """Runs `fn` on process 0, then on the others: for files that every process would
  otherwise create at the same time (the first writes them, the others find them)."""
  if jax.process_index() == 0:
    result = fn()
    sync(name)
    return result
  sync(name)
  return fn()
