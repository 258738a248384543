"""The one rename rule between PyTorch state dicts and our Flax parameter trees.

A Flax path ('down_blocks_0', 'resnets_1', 'conv1', 'kernel') is the torch key
'down_blocks.0.resnets.1.conv1.weight': a list index joins its list's name with '_',
and the leaf names translate as

  kernel (4-D)  <->  weight of a Conv2d   [kh, kw, in, out] <-> [out, in, kh, kw]
  kernel (2-D)  <->  weight of a Linear   [in, out]         <-> [out, in]
  scale         <->  weight of a norm
  embedding     <->  weight of an Embedding
  bias          <->  bias
  positional_embedding  <->  the nn.Parameter of that name (AttentionPooling's)

Every check is against the expected tree (from jax.eval_shape of the model's init), and
every error names the file and the first key that does not fit.
"""
import os
import re
from typing import Dict, Mapping, Tuple

import flax
import flax.linen as nn
import numpy as np

from instaflow_jax.models.abstract import flat_param_shapes

# Torch module names that end in _<digit> themselves (diffusers' TimestepEmbedding), and
# so are not list indices.
_LITERAL_NAMES = frozenset({'linear_1', 'linear_2'})
_INDEXED = re.compile(r'^(.+)_(\d+)$')
# Leaves that are a torch module's own nn.Parameter, keyed by their name.
_PARAMETER_LEAVES = frozenset({'positional_embedding'})


class ConversionError(ValueError):
  """Weights that do not fit the model they are loaded into."""


def torch_key(path: Tuple[str, ...]) -> str:
  """The torch state-dict key of a Flax parameter path."""
  parts = []
  for segment in path[:-1]:
    match = _INDEXED.match(segment)
    if match and segment not in _LITERAL_NAMES:
      parts.extend(match.groups())
    else:
      parts.append(segment)
  leaf = path[-1]
  parts.append(leaf if leaf in _PARAMETER_LEAVES or leaf == 'bias' else 'weight')
  return '.'.join(parts)


def _to_flax_layout(leaf: str, array: np.ndarray) -> np.ndarray:
  if leaf == 'kernel' and array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  if leaf == 'kernel' and array.ndim == 2:
    return array.T
  return array


def _to_torch_layout(leaf: str, array: np.ndarray) -> np.ndarray:
  if leaf == 'kernel' and array.ndim == 4:
    return array.transpose(3, 2, 0, 1)
  if leaf == 'kernel' and array.ndim == 2:
    return array.T
  return array


def _torch_shape(leaf: str, flax_shape: Tuple[int, ...]) -> Tuple[int, ...]:
  if leaf == 'kernel' and len(flax_shape) == 4:
    return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
  if leaf == 'kernel' and len(flax_shape) == 2:
    return (flax_shape[1], flax_shape[0])
  return tuple(flax_shape)


def torch_state_to_flax(state: Mapping[str, np.ndarray], abstract_variables, source: str):
  """A torch state dict -> Flax params, checked key by key against the expected tree.

  `source` names the file(s) the state came from, for the error messages.
  """
  expected = flat_param_shapes(abstract_variables)
  by_key = {torch_key(path): path for path in expected}
  unexpected = sorted(set(state) - set(by_key))
  if unexpected:
    raise ConversionError(
        f'{source}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all); '
        'the weights do not belong to this model config')
  missing = sorted(set(by_key) - set(state))
  if missing:
    path = by_key[missing[0]]
    raise ConversionError(
        f'{source}: missing key {missing[0]!r} (expected shape '
        f'{_torch_shape(path[-1], expected[path][0])}; {len(missing)} missing in all)')
  flat = {}
  for key, path in by_key.items():
    shape, dtype = expected[path]
    want = _torch_shape(path[-1], shape)
    got = tuple(np.shape(state[key]))
    if got != want:
      raise ConversionError(f'{source}: key {key!r} has shape {got}, the model expects {want}')
    flat[path] = np.asarray(_to_flax_layout(path[-1], np.asarray(state[key])), dtype=dtype)
  return flax.traverse_util.unflatten_dict(flat)


def flax_to_torch_state(params) -> Dict[str, np.ndarray]:
  """Flax params -> a torch-layout state dict of contiguous float arrays."""
  params = nn.meta.unbox(params)
  params = params.get('params', params)
  return {torch_key(path): np.ascontiguousarray(_to_torch_layout(path[-1], np.asarray(leaf)))
          for path, leaf in flax.traverse_util.flatten_dict(params).items()}


def read_torch_file(path: str) -> Dict[str, np.ndarray]:
  """A torch state dict file as float32 numpy arrays; errors name the file."""
  import torch  # only for .bin/.pth files; safetensors needs no torch
  if not os.path.isfile(path):
    raise ConversionError(f'{path}: file not found')
  try:
    state = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:
    raise ConversionError(f'{path}: cannot read torch checkpoint ({e}); it is truncated or '
                          'corrupt, download or export it again') from None
  if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
    raise ConversionError(f'{path}: not a state dict (a mapping of names to tensors)')
  return {k: v.detach().to(torch.float32).numpy() for k, v in state.items()}
