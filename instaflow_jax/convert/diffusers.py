"""diffusers pipeline folders <-> our configs and Flax params, in both directions.

A folder holds model_index.json and one sub-folder per component (unet/, vae/,
text_encoder/, tokenizer/, ...). Weights are read from `*.safetensors` with safetensors'
numpy API (no torch needed), from a sharded `*.safetensors.index.json`, or, when no
safetensors file exists, from `*.bin` with torch.load(weights_only=True).
"""
import dataclasses
import json
import os
import re
import shutil
from typing import Any, Callable, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from instaflow_jax.convert.torch_names import ConversionError
from instaflow_jax.convert.torch_names import flax_to_torch_state
from instaflow_jax.convert.torch_names import read_torch_file
from instaflow_jax.convert.torch_names import torch_state_to_flax
from instaflow_jax.models.abstract import abstract_variables
from instaflow_jax.models.autoencoder import AutoencoderConfig
from instaflow_jax.models.autoencoder import AutoencoderKL
from instaflow_jax.models.clip_text import CLIPTextConfig
from instaflow_jax.models.clip_text import CLIPTextModel
from instaflow_jax.models.unet import UNet2DConditionModel
from instaflow_jax.models.unet import UNetConfig

MODEL_INDEX = 'model_index.json'


def _text_encoder_keys(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Published CLIP checkpoints name keys 'text_model.…'; transformers 5 saves them
  without that prefix. Older ones also carry the non-trainable position_ids buffer."""
  return {(k if k.startswith('text_model.') else 'text_model.' + k): v
          for k, v in state.items() if not k.endswith('embeddings.position_ids')}


_LEGACY_ATTENTION = re.compile(r'^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$')
_LEGACY_NAMES = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}
_ATTENTION_WEIGHT = re.compile(r'\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$')


def rename_legacy_vae_keys(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Brings an older diffusers VAE state dict to today's names.

  Older files name the mid-block attention projections query/key/value/proj_attn (diffusers
  renames them on load, see ModelMixin._fix_state_dict_keys_on_load), and some store them as
  1x1 convolutions [out, in, 1, 1]; they become to_q/to_k/to_v/to_out.0 Linear weights
  [out, in]. Every other key passes unchanged.
  """
  renamed = {}
  for key, array in state.items():
    match = _LEGACY_ATTENTION.match(key)
    if match:
      prefix, name, leaf = match.groups()
      key = f'{prefix}.{_LEGACY_NAMES[name]}.{leaf}'
    if _ATTENTION_WEIGHT.search(key) and np.ndim(array) == 4 and np.shape(array)[2:] == (1, 1):
      array = np.reshape(array, np.shape(array)[:2])
    renamed[key] = array
  return renamed


@dataclasses.dataclass(frozen=True)
class Component:
  """How one network of a pipeline folder is stored and built."""
  weights_stem: str               # file name of the weights without extension
  library: str                    # what model_index.json names as its library
  class_name: str                 # and as its class
  read_config: Callable[[dict], Any]
  write_config: Callable[[Any], dict]
  module: Callable[..., Any]      # module class, called with (config, dtype=, param_dtype=)
  fix_state: Callable[[Dict[str, np.ndarray]], Dict[str, np.ndarray]] = lambda s: s


COMPONENTS: Dict[str, Component] = {
    'unet': Component('diffusion_pytorch_model', 'diffusers', 'UNet2DConditionModel',
                      UNetConfig.from_diffusers_config, UNetConfig.to_diffusers_config,
                      UNet2DConditionModel),
    'vae': Component('diffusion_pytorch_model', 'diffusers', 'AutoencoderKL',
                     AutoencoderConfig.from_diffusers_config, AutoencoderConfig.to_diffusers_config,
                     AutoencoderKL, rename_legacy_vae_keys),
    'text_encoder': Component('model', 'transformers', 'CLIPTextModel',
                              CLIPTextConfig.from_transformers_config,
                              CLIPTextConfig.to_transformers_config,
                              CLIPTextModel, _text_encoder_keys),
}


def read_json(path: str) -> dict:
  if not os.path.isfile(path):
    raise ConversionError(f'{path}: file not found')
  try:
    with open(path) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConversionError(f'{path}: not valid JSON ({e})') from None


def read_model_index(folder: str) -> dict:
  path = os.path.join(folder, MODEL_INDEX)
  if not os.path.isfile(path):
    raise ConversionError(
        f'{folder}: no {MODEL_INDEX}; expected a diffusers pipeline folder '
        '(model_index.json, unet/, vae/, text_encoder/, tokenizer/)')
  return read_json(path)


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
  try:
    return safetensors.numpy.load_file(path)
  except Exception as e:  # safetensors raises its own error types for corrupt headers/data
    raise ConversionError(
        f'{path}: cannot read safetensors file ({e}); it is truncated or corrupt, '
        'download or export it again') from None


def read_state_dict(component_dir: str, stem: str) -> Tuple[Dict[str, np.ndarray], str]:
  """The weights of one component and the file(s) they came from."""
  single = os.path.join(component_dir, f'{stem}.safetensors')
  if os.path.isfile(single):
    return read_safetensors(single), single
  index = os.path.join(component_dir, f'{stem}.safetensors.index.json')
  if os.path.isfile(index):
    state = {}
    for shard in sorted(set(read_json(index)['weight_map'].values())):
      state.update(read_safetensors(os.path.join(component_dir, shard)))
    return state, index
  legacy = os.path.join(component_dir, f'{stem}.bin')
  if os.path.isfile(legacy):
    return read_torch_file(legacy), legacy
  raise ConversionError(f'{component_dir}: no weights ({stem}.safetensors, '
                        f'{stem}.safetensors.index.json or {stem}.bin)')


def load_component(folder: str, name: str, dtype=jnp.float32):
  """(config, module, params) of component `name` of a pipeline folder."""
  spec = COMPONENTS[name]
  component_dir = os.path.join(folder, name)
  config_path = os.path.join(component_dir, 'config.json')
  try:
    config = spec.read_config(read_json(config_path))
  except ValueError as e:
    raise ConversionError(f'{config_path}: {e}') from None
  module = spec.module(config, dtype=dtype, param_dtype=dtype)
  state, source = read_state_dict(component_dir, spec.weights_stem)
  params = torch_state_to_flax(spec.fix_state(state), abstract_variables(module), source)
  return config, module, jax.tree.map(jnp.asarray, params)


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
  tmp = path + '.tmp'
  write(tmp)
  os.replace(tmp, path)


def write_json(path: str, data: Mapping) -> None:
  def write(tmp):
    with open(tmp, 'w') as f:
      json.dump(data, f, indent=2, sort_keys=True)
      f.write('\n')
  _atomic_write(path, write)


def save_component(folder: str, name: str, config: Any, params) -> None:
  """Writes component `name` (config.json + safetensors) the way its library saves it."""
  spec = COMPONENTS[name]
  component_dir = os.path.join(folder, name)
  os.makedirs(component_dir, exist_ok=True)
  write_json(os.path.join(component_dir, 'config.json'), spec.write_config(config))
  state = {k: np.asarray(v, np.float32) if v.dtype == jnp.bfloat16 else np.asarray(v)
           for k, v in flax_to_torch_state(params).items()}
  _atomic_write(os.path.join(component_dir, f'{spec.weights_stem}.safetensors'),
                lambda tmp: safetensors.numpy.save_file(state, tmp, metadata={'format': 'pt'}))


def copy_component(source_folder: str, folder: str, name: str) -> None:
  """Copies a component we do not convert (tokenizer, scheduler, ...) as it is."""
  src, dst = os.path.join(source_folder, name), os.path.join(folder, name)
  if os.path.abspath(src) != os.path.abspath(dst):
    shutil.copytree(src, dst, dirs_exist_ok=True)


def model_index_for(components: Mapping[str, Tuple[str, str]], base: Mapping = None,
                    class_name: str = None) -> dict:
  """model_index.json content: `base` (the source folder's index) with our components,
  and `class_name` when given (else the base's, or StableDiffusionPipeline)."""
  index = dict(base or {'_class_name': 'StableDiffusionPipeline'})
  if class_name:
    index['_class_name'] = class_name
  index.setdefault('_diffusers_version', _diffusers_version())
  for name, (library, class_name) in components.items():
    index[name] = [library, class_name]
  return index


def _diffusers_version() -> str:
  try:
    from importlib.metadata import version
    return version('diffusers')
  except Exception:  # diffusers is optional at run time; any recent version reads the index
    return '0.30.0'


def save_pipeline(path: str, networks: Mapping[str, Tuple[Any, Any]], tokenizer,
                  base: str = None, class_name: str = None) -> None:
  """Writes a diffusers folder that diffusers/transformers `from_pretrained` load.

  networks: {component: (config, params)} of each of COMPONENTS. The components we do not
  convert (scheduler, safety checker, ...) are copied from the folder `base`, when given,
  and its model_index.json is kept with our components' entries (and `class_name`, the
  pipeline class, when given)."""
  os.makedirs(path, exist_ok=True)
  for name in COMPONENTS:
    save_component(path, name, *networks[name])
  tokenizer.save_pretrained(os.path.join(path, 'tokenizer'))
  base_index = read_model_index(base) if base else {}
  for name, entry in base_index.items():
    converted = name in COMPONENTS or name == 'tokenizer'
    if (not converted and isinstance(entry, list) and entry[0] is not None
        and os.path.isdir(os.path.join(base, name))):
      copy_component(base, path, name)
  components = {name: (spec.library, spec.class_name) for name, spec in COMPONENTS.items()}
  components['tokenizer'] = ('transformers', 'CLIPTokenizer')
  write_json(os.path.join(path, MODEL_INDEX), model_index_for(components, base_index or None,
                                                               class_name))


def is_pipeline_folder(path: str) -> bool:
  """Whether `path` is a diffusers pipeline folder (it has a model_index.json)."""
  return os.path.isfile(os.path.join(path, MODEL_INDEX))
