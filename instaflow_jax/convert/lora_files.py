"""LoRA files <-> our LoRA trees (models/lora.py), for the U-Net and the text encoder.

Two key styles are read from a `.safetensors` file:
  diffusers (peft): 'unet.<module>.lora_A.weight' [rank, in(, kh, kw)] and
    '...lora_B.weight' [out, rank(, 1, 1)], 'text_encoder.<module>...' likewise; the
    scaling lora_alpha / rank (/ sqrt(rank) with use_rslora, alpha_pattern per module)
    comes from the file's `lora_adapter_metadata`, and is 1 without it, as diffusers
    reads it (what StableDiffusionPipeline.save_lora_weights writes);
  kohya / A1111: 'lora_unet_<module with _ for .>.lora_down.weight', '.lora_up.weight'
    and '.alpha' (scaling alpha / rank, 1 without it); 'lora_te_' for the text encoder.
<module> is the torch module name (down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q),
which is our params path by the rename rule of convert/torch_names.py. Each layer's
scaling is folded into `up` on reading, so a read LoRA merges with the user's scale alone.
Files are written in the diffusers style, with the metadata that diffusers'
load_lora_weights reads, the scaling folded into lora_B.
"""
import json
import math
import os
import re
from typing import Dict, Mapping, Sequence, Tuple

import flax
import numpy as np
import safetensors
import safetensors.numpy

from instaflow_jax.convert.diffusers import read_safetensors
from instaflow_jax.convert.torch_names import ConversionError
from instaflow_jax.convert.torch_names import torch_key
from instaflow_jax.models import lora as lora_lib
from instaflow_jax.models.abstract import flat_param_shapes

# The networks a LoRA file can adapt: their prefix in each key style.
PEFT_PREFIXES = {'unet': 'unet.', 'text_encoder': 'text_encoder.'}
KOHYA_PREFIXES = {'unet': ('lora_unet_',), 'text_encoder': ('lora_te_', 'lora_te1_')}
METADATA_KEY = 'lora_adapter_metadata'  # diffusers' LORA_ADAPTER_METADATA_KEY
WEIGHTS_NAME = 'pytorch_lora_weights.safetensors'  # what diffusers' save_lora_weights writes

_PEFT_KEY = re.compile(r'^(.+)\.lora_([AB])\.weight$')
_KOHYA_KEY = re.compile(r'^(.+)\.(lora_down\.weight|lora_up\.weight|alpha)$')
_PEFT_PART = {'A': lora_lib.DOWN, 'B': lora_lib.UP}
_KOHYA_PART = {'lora_down.weight': lora_lib.DOWN, 'lora_up.weight': lora_lib.UP, 'alpha': 'alpha'}


def module_name(module: Tuple[str, ...]) -> str:
  """The torch module name of a params path to a layer."""
  return torch_key(module + ('kernel',))[:-len('.weight')]


def _layer_names(component: str, params) -> Dict[str, Tuple[Tuple[str, ...], tuple]]:
  """{name in either key style: (module path, kernel shape)} of every kernel of a network."""
  names = {}
  for path, (shape, _) in flat_param_shapes(params).items():
    if path[-1] != 'kernel':
      continue
    # transformers 5 names CLIP's modules without the 'text_model.' that earlier ones had.
    name = module_name(path[:-1])
    for alias in {name, name.removeprefix('text_model.')}:
      names[PEFT_PREFIXES[component] + alias] = (path[:-1], shape)
      for prefix in KOHYA_PREFIXES[component]:
        names[prefix + alias.replace('.', '_')] = (path[:-1], shape)
  return names


def _resolve(lora_path: str) -> str:
  """The safetensors file of a LoRA: the path itself, or the weights file in a folder."""
  if os.path.isdir(lora_path):
    lora_path = os.path.join(lora_path, WEIGHTS_NAME)
  if not os.path.isfile(lora_path):
    raise ConversionError(f'{lora_path}: LoRA file not found')
  if not lora_path.endswith('.safetensors'):
    raise ConversionError(f'{lora_path}: not a .safetensors file; give the LoRA as safetensors')
  return lora_path


def _metadata(path: str) -> dict:
  """The peft config that diffusers stored with the weights ({} when none)."""
  with safetensors.safe_open(path, 'np') as f:
    text = (f.metadata() or {}).get(METADATA_KEY)
  try:
    return json.loads(text) if text else {}
  except json.JSONDecodeError:
    raise ConversionError(f'{path}: its {METADATA_KEY} is not valid JSON') from None


def _group_keys(path: str, state: Mapping[str, np.ndarray]) -> Dict[str, dict]:
  """{layer name: {'down', 'up'[, 'alpha']}} of a file's keys, in either style."""
  layers = {}
  for key, array in state.items():
    match = _PEFT_KEY.match(key)
    part = _PEFT_PART[match.group(2)] if match else None
    if not match:
      match = _KOHYA_KEY.match(key)
      part = _KOHYA_PART[match.group(2)] if match else None
    if not match:
      raise ConversionError(
          f'{path}: key {key!r} is not a LoRA weight (lora_A/lora_B or lora_down/lora_up/'
          'alpha); only LoRA files are read (not LoHa, LoKr or DoRA)')
    layers.setdefault(match.group(1), {})[part] = array
  if not layers:
    raise ConversionError(f'{path}: no LoRA weights in the file')
  return layers


def _scaling(name: str, layer: dict, rank: int, metadata: dict, component: str) -> float:
  """alpha / rank of one layer: the kohya file's alpha, else the peft metadata's."""
  if 'alpha' in layer:
    return float(np.asarray(layer['alpha'])) / rank
  config = {k[len(component) + 1:]: v for k, v in metadata.items()
            if k.startswith(component + '.')}
  if config.get('use_dora'):
    raise ConversionError(f'{component}: a DoRA adapter (use_dora); only LoRA is read')
  alpha = config.get('lora_alpha', rank)
  module = name[len(PEFT_PREFIXES[component]):]
  for pattern, value in (config.get('alpha_pattern') or {}).items():
    if re.match(rf'(.*\.)?({pattern})$', module):
      alpha = value
  return alpha / (math.sqrt(rank) if config.get('use_rslora') else rank)


def _to_ours(path: str, name: str, layer: dict,
             kernel_shape: tuple) -> Tuple[np.ndarray, np.ndarray]:
  """(down [fan_in, rank], up [rank, out]) of a file's torch-layout pair, checked."""
  if lora_lib.DOWN not in layer or lora_lib.UP not in layer:
    missing = 'down (lora_A / lora_down)' if lora_lib.DOWN not in layer else 'up (lora_B / lora_up)'
    raise ConversionError(f'{path}: LoRA layer {name!r} has no {missing} weight')
  down = np.asarray(layer[lora_lib.DOWN], np.float32)
  up = np.asarray(layer[lora_lib.UP], np.float32)
  rank = down.shape[0]
  if up.ndim < 2 or up.shape[1] != rank:
    raise ConversionError(f'{path}: LoRA layer {name!r}: rank mismatch, its down weight has '
                          f'rank {rank} and its up weight {up.shape[1:2]} (shapes {down.shape}, '
                          f'{up.shape}); the file is damaged')
  conv = len(kernel_shape) == 4
  if conv and kernel_shape[:2] == (1, 1) and down.ndim == up.ndim == 2:
    # A 1x1 convolution's LoRA stored as a Linear's (SD 2's linear projections).
    down, up = down[:, :, None, None], up[:, :, None, None]
  out, fan_in_shape = kernel_shape[-1], (
      (kernel_shape[2], kernel_shape[0], kernel_shape[1]) if conv else (kernel_shape[0],))
  want_down, want_up = (rank,) + fan_in_shape, (out, rank) + ((1, 1) if conv else ())
  if down.shape != want_down or up.shape != want_up:
    raise ConversionError(f'{path}: LoRA layer {name!r} has shapes {down.shape} and {up.shape}, '
                          f'the layer takes {want_down} and {want_up}; the LoRA was made '
                          'for another model config')
  # [rank, in(, kh, kw)] -> [fan_in, rank], the fan-in in our kernels' (HWIO) order
  down = down.transpose(2, 3, 1, 0) if conv else down.T
  return down.reshape(-1, rank), up.reshape(out, rank).T


def read_lora(lora_path: str, networks: Mapping[str, object]) -> Dict[str, dict]:
  """{component: LoRA tree} of a LoRA file for `networks` ({'unet': params, ...}, abstract
  or not), each layer's scaling folded into its `up`. Components the file does not adapt
  are absent. ConversionError names the file and the first key that fits no layer."""
  path = _resolve(lora_path)
  layers = _group_keys(path, read_safetensors(path))
  metadata = _metadata(path)
  tables = {component: _layer_names(component, params) for component, params in networks.items()}
  unmatched = sorted(name for name in layers if not any(name in t for t in tables.values()))
  if unmatched:
    raise ConversionError(
        f'{path}: LoRA layer {unmatched[0]!r} matches no layer of this model ({len(unmatched)} '
        f'of {len(layers)} match none); the LoRA was made for another architecture')
  trees = {}
  for component, table in tables.items():
    flat = {}
    for name, layer in layers.items():
      if name not in table:
        continue
      module, kernel_shape = table[name]
      down, up = _to_ours(path, name, layer, kernel_shape)
      flat[module + (lora_lib.DOWN,)] = down
      flat[module + (lora_lib.UP,)] = up * _scaling(name, layer, down.shape[1], metadata, component)
    if flat:
      trees[component] = flax.traverse_util.unflatten_dict(flat)
  return trees


def _to_torch(down: np.ndarray, up: np.ndarray,
              kernel_shape: tuple) -> Tuple[np.ndarray, np.ndarray]:
  """(lora_A, lora_B) in torch layout of one of our layers."""
  rank = down.shape[1]
  if len(kernel_shape) == 4:
    kh, kw, fan_in, _ = kernel_shape
    return (down.reshape(kh, kw, fan_in, rank).transpose(3, 2, 0, 1),
            up.T[:, :, None, None])
  return down.T, up.T


def write_lora(path: str, lora, kernel_shapes: Mapping[Tuple[str, ...], tuple], scale: float = 1.0,
               component: str = 'unet') -> None:
  """Writes a LoRA of `component` as diffusers' save_lora_weights does (peft keys, with the
  rank and modules in the metadata), for load_lora_weights. `scale` (a trained LoRA's
  alpha / rank) is folded into lora_B and lora_alpha is the rank: diffusers' loaders that
  read the metadata and those that do not (load_lora_adapter of a file) then agree.
  `kernel_shapes`: {module path: kernel shape} of the adapted layers."""
  state, names = {}, []
  for module, layer in sorted(lora_lib.layers_of(lora).items()):
    name = module_name(module)
    names.append(name)
    lora_a, lora_b = _to_torch(np.asarray(layer[lora_lib.DOWN], np.float32),
                               scale * np.asarray(layer[lora_lib.UP], np.float32),
                               kernel_shapes[module])
    prefix = PEFT_PREFIXES[component] + name
    state[f'{prefix}.lora_A.weight'] = np.ascontiguousarray(lora_a)
    state[f'{prefix}.lora_B.weight'] = np.ascontiguousarray(lora_b)
  rank = lora_lib.rank_of(lora)
  metadata = {f'{component}.r': rank, f'{component}.lora_alpha': rank,
              f'{component}.target_modules': names}
  tmp = path + '.tmp'
  safetensors.numpy.save_file(state, tmp, metadata={
      'format': 'pt', METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True)})
  os.replace(tmp, path)


def kernel_shapes(params, modules: Sequence[Tuple[str, ...]]) -> dict:
  """{module path: kernel shape} of `modules` in `params`."""
  flat = flax.traverse_util.flatten_dict(params)
  return {module: tuple(flat[module + ('kernel',)].shape) for module in modules}
