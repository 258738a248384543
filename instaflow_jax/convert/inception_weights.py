"""pytorch-fid's FID Inception weights -> our FIDInceptionV3 (instaflow_jax/models/inception.py).

pytorch-fid downloads pt_inception-2015-12-05-6726825d.pth at run time; nothing can be
downloaded here, so the user passes that file (or any state dict of
`pytorch_fid.inception.fid_inception_v3()`). Its keys are torchvision Inception3's with
aux_logits=False and num_classes=1008:
  * 'X.conv.weight', 'X.bn.weight', 'X.bn.bias'  -> params, by the shared rename rule;
  * 'X.bn.running_mean', 'X.bn.running_var'      -> batch_stats 'X/bn/mean', 'X/bn/var';
  * 'X.bn.num_batches_tracked' (a training counter) and 'fc.*' (the classifier after the
    pool features) are not used, and are dropped.

The shared rule reads a module name ending in _<digits> as a list index, and torchvision
names some branches that way ('branch5x5_1'), so such keys are split like the rule splits
them ('branch5x5.1') before the lookup; errors about them name that form.
"""
import functools
import re
from typing import Dict, Mapping, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from instaflow_jax.convert.torch_names import ConversionError
from instaflow_jax.convert.torch_names import read_torch_file
from instaflow_jax.convert.torch_names import torch_key
from instaflow_jax.convert.torch_names import torch_state_to_flax
from instaflow_jax.models.abstract import abstract_variables
from instaflow_jax.models.inception import FIDInceptionV3

WEIGHTS_FILE = 'pt_inception-2015-12-05-6726825d.pth'
# The TensorFlow graph's classifier has 1008 classes; torchvision's ImageNet Inception 1000.
_FID_CLASSIFIER_SHAPE = (1008, 2048)
_RUNNING_STAT = re.compile(r'\.running_(mean|var)$')
_UNUSED = re.compile(r'(^fc\.(weight|bias)$)|(\.num_batches_tracked$)')
_NAME_INDEX = re.compile(r'_(\d+)\.')


def _rule_form(key: str) -> str:
  """'Mixed_5b.branch5x5_1.conv.weight' -> 'Mixed_5b.branch5x5.1.conv.weight' (torch_key's form)."""
  return _NAME_INDEX.sub(r'.\1.', key)


@functools.lru_cache(maxsize=1)
def _abstract_variables():
  """eval_shape(init) of the network, traced once: the weights do not change its shapes."""
  return abstract_variables(FIDInceptionV3())


def _stat_key(path: Tuple[str, ...]) -> str:
  """The torch key of batch_stats path (..., 'bn', 'mean'|'var'): '....bn.running_mean'."""
  module = torch_key(path[:-1] + ('bias',))[:-len('.bias')]
  return f'{module}.running_{path[-1]}'


def _check_classifier(state: Mapping[str, np.ndarray], source: str) -> None:
  """The classifier is dropped, but its shape tells the FID weights from torchvision's
  ImageNet Inception, whose features give FIDs that are not comparable to published ones."""
  if 'fc.weight' in state and tuple(np.shape(state['fc.weight'])) != _FID_CLASSIFIER_SHAPE:
    raise ConversionError(
        f"{source}: fc.weight has shape {tuple(np.shape(state['fc.weight']))}, not "
        f"{_FID_CLASSIFIER_SHAPE}: not pytorch-fid's FID Inception ({WEIGHTS_FILE})")


def _batch_stats(stats: Mapping[str, np.ndarray], abstract_stats, source: str):
  """The running statistics, checked key by key against eval_shape(init)'s batch_stats."""
  expected = {_stat_key(path): (path, leaf)
              for path, leaf in flax.traverse_util.flatten_dict(abstract_stats).items()}
  unexpected = sorted(set(stats) - set(expected))
  if unexpected:
    raise ConversionError(f'{source}: unexpected key {unexpected[0]!r} ({len(unexpected)} '
                          'unexpected in all); the weights do not belong to this model')
  missing = sorted(set(expected) - set(stats))
  if missing:
    raise ConversionError(f'{source}: missing key {missing[0]!r} ({len(missing)} missing in all)')
  flat = {}
  for key, (path, leaf) in expected.items():
    if tuple(np.shape(stats[key])) != tuple(leaf.shape):
      raise ConversionError(f'{source}: key {key!r} has shape {tuple(np.shape(stats[key]))}, '
                            f'the model expects {tuple(leaf.shape)}')
    flat[path] = np.asarray(stats[key], leaf.dtype)
  return flax.traverse_util.unflatten_dict(flat)


def inception_state_to_variables(state: Mapping[str, np.ndarray],
                                 source: str = 'FID Inception state dict') -> Dict[str, dict]:
  """{'params', 'batch_stats'} of FIDInceptionV3 from a `fid_inception_v3()` state dict."""
  _check_classifier(state, source)
  used = {_rule_form(k): v for k, v in state.items() if not _UNUSED.search(k)}
  params = {k: v for k, v in used.items() if not _RUNNING_STAT.search(k)}
  stats = {k: v for k, v in used.items() if _RUNNING_STAT.search(k)}
  abstract = _abstract_variables()
  return {'params': torch_state_to_flax(params, abstract, source),
          'batch_stats': _batch_stats(stats, abstract['batch_stats'], source)}


def load_fid_inception(path: str, dtype=jnp.float32) -> Tuple[FIDInceptionV3, Dict[str, dict]]:
  """(module, variables) of the FID Inception with weights from `path`, a state dict file of
  pytorch-fid's FID Inception (WEIGHTS_FILE). `dtype` is the compute dtype; the variables
  are float32."""
  if not path:
    raise ValueError(f"FID needs pytorch-fid's Inception weights: pass the path of {WEIGHTS_FILE} "
                     '(none can be downloaded here)')
  variables = inception_state_to_variables(read_torch_file(path), path)
  return FIDInceptionV3(dtype=dtype), jax.tree.map(jnp.asarray, variables)
