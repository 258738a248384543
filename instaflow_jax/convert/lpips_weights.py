"""LPIPS weights -> our Flax LPIPS (instaflow_jax/models/lpips.py).

LPIPS has two sets of weights from two places:
  * the `lin` layers, fitted to human judgements, which the `lpips` package ships
    (lpips/weights/v0.1/{vgg,alex}.pth, keys 'lin{k}.model.1.weight');
  * the trunk, torchvision's ImageNet VGG16 / AlexNet, which lpips downloads at run time.
    Nothing can be downloaded here, so the user passes the torchvision state dict file
    (keys 'features.{i}.weight'); its feature i goes to the lpips slice that holds it, as
    lpips' pretrained_networks cuts torchvision's `features`.
"""
import importlib.util
import os
import re
from typing import Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from instaflow_jax.convert.torch_names import ConversionError
from instaflow_jax.convert.torch_names import read_torch_file
from instaflow_jax.convert.torch_names import torch_state_to_flax
from instaflow_jax.models.abstract import abstract_variables
from instaflow_jax.models.lpips import INPUT_SCALE
from instaflow_jax.models.lpips import INPUT_SHIFT
from instaflow_jax.models.lpips import LPIPS
from instaflow_jax.models.lpips import trunk
from instaflow_jax.models.lpips import trunk_slices

_TORCHVISION_MODEL = {'vgg': 'vgg16', 'alex': 'alexnet'}
# lpips.LPIPS registers its ScalingLayer constants as buffers, so they are in its state dict.
_CONSTANTS = {'scaling_layer.shift': INPUT_SHIFT, 'scaling_layer.scale': INPUT_SCALE}
# lpips.LPIPS holds lin0..lin4 a second time in the ModuleList `lins`.
_LINS_ALIAS = re.compile(r'^lins\.(\d+)\.(.+)$')
_FEATURE = re.compile(r'^features\.(\d+)\.(.+)$')


def shipped_lin_path(net: str) -> str:
  """The lin weights file that the installed `lpips` package ships for `net`."""
  trunk(net)
  spec = importlib.util.find_spec('lpips')
  if spec is None or not spec.submodule_search_locations:
    raise ConversionError('the lpips package is not installed; pass lin_path=<lpips lin '
                          f'weights .pth> (lpips/weights/v0.1/{net}.pth)')
  return os.path.join(spec.submodule_search_locations[0], 'weights', 'v0.1', f'{net}.pth')


def _lpips_parameters(state: Mapping[str, np.ndarray], source: str) -> Dict[str, np.ndarray]:
  """The parameter entries of an lpips.LPIPS state dict: the ScalingLayer buffers must be
  LPIPS v0.1's constants and each `lins.K` must equal `linK`; both are then dropped."""
  params = {k: v for k, v in state.items() if k not in _CONSTANTS and not _LINS_ALIAS.match(k)}
  for key, constant in _CONSTANTS.items():
    if key in state and not np.array_equal(np.asarray(state[key], np.float32).ravel(), constant):
      raise ConversionError(f'{source}: {key}={np.asarray(state[key]).ravel()} is not LPIPS '
                            f"v0.1's {constant}")
  for key, value in state.items():
    alias = _LINS_ALIAS.match(key)
    if alias is None:
      continue
    target = f'lin{alias[1]}.{alias[2]}'
    if target in params and not np.array_equal(np.asarray(params[target]), np.asarray(value)):
      raise ConversionError(f'{source}: {key} differs from {target}, which it aliases')
    params.setdefault(target, value)
  return params


def _trunk_and_lins(abstract) -> Tuple[dict, dict]:
  """eval_shape(init)'s params split into the trunk's ('net') and the rest (the lin layers)."""
  lins = dict(abstract['params'])
  return {'net': lins.pop('net')}, lins


def lpips_state_to_params(state_dict: Mapping[str, np.ndarray], net: str,
                          source: str = 'lpips.LPIPS state dict'):
  """The Flax params of `LPIPS(net)` from a full `lpips.LPIPS(net=net).state_dict()`."""
  abstract = abstract_variables(LPIPS(net))
  return torch_state_to_flax(_lpips_parameters(state_dict, source), abstract, source)


def torchvision_trunk_to_lpips(state: Mapping[str, np.ndarray], net: str,
                               source: str) -> Dict[str, np.ndarray]:
  """torchvision 'features.{i}.*' -> lpips 'net.slice{s}.{i}.*'. The rest of the torchvision
  model (avgpool, classifier) is not part of LPIPS and is left out; a feature index outside
  every slice stays as it is, for the converter to report."""
  slice_of = {i: s for s, indices in enumerate(trunk_slices(net), start=1) for i in indices}
  renamed = {}
  for key, value in state.items():
    feature = _FEATURE.match(key)
    if feature is None:
      continue
    index = int(feature[1])
    renamed[f'net.slice{slice_of[index]}.{index}.{feature[2]}' if index in slice_of else key] = value
  if not renamed:
    raise ConversionError(f"{source}: no 'features.N' keys; expected the state dict of "
                          f'torchvision.models.{_TORCHVISION_MODEL[net]}')
  return renamed


def load_lpips(net: str, lin_path: Optional[str] = None, trunk_path: Optional[str] = None,
               dtype=jnp.float32) -> Tuple[LPIPS, dict]:
  """(module, params) of LPIPS v0.1 with `net`'s trunk from `trunk_path` (a torchvision
  state dict file) and the lin layers from `lin_path` (default: the lpips package's file).

  `dtype` is the trunk's compute dtype; the params are float32.
  """
  trunk(net)
  if trunk_path is None:
    raise ValueError(f'LPIPS needs pretrained {net} trunk weights: pass trunk_path=<torchvision '
                     f'{_TORCHVISION_MODEL[net]} state dict .pth> (none can be downloaded here)')
  lin_path = lin_path or shipped_lin_path(net)
  module = LPIPS(net, dtype=dtype)
  trunk_shapes, lin_shapes = _trunk_and_lins(abstract_variables(module))
  lin_params = torch_state_to_flax(_lpips_parameters(read_torch_file(lin_path), lin_path), lin_shapes,
                                   lin_path)
  trunk_params = torch_state_to_flax(
      torchvision_trunk_to_lpips(read_torch_file(trunk_path), net, trunk_path), trunk_shapes, trunk_path)
  return module, jax.tree.map(jnp.asarray, {**trunk_params, **lin_params})
