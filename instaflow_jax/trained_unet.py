"""The U-Net params that a training stage made: its final (or checkpointed) params, or, for a
stage that trained a LoRA (model.lora.stages names it), that LoRA merged onto the params
the stage started from (its `init`: another stage's, found the same way, an absolute
params path, or the base model's). A LoRA stage stores the LoRA alone, in its checkpoints
and in its params/.
"""
import os
from typing import Any, Optional

import jax
import ml_collections

from instaflow_jax import checkpoint
from instaflow_jax import workdir as workdir_lib
from instaflow_jax.models import lora as lora_lib


def stage_lora(config, stage: str) -> Optional[ml_collections.ConfigDict]:
  """model.lora of `config` (a ConfigDict or a config.json's dict) when stage `stage`
  trains a LoRA; None otherwise, and for configs written before the field."""
  lora = config['model'].get('lora')
  if not lora or stage not in tuple(lora['stages']):
    return None
  return ml_collections.ConfigDict(dict(lora))


def lora_scale(lora_config) -> float:
  """What the trained LoRA's deltas are multiplied by: alpha / rank, as in peft."""
  return lora_config.alpha / lora_config.rank


def init_lora(base_params, lora_config, seed: int):
  """The LoRA a stage starts from, on `base_params` (its init)."""
  return lora_lib.init_lora(base_params, tuple(lora_config.target_modules), lora_config.rank,
                            jax.random.key(seed))


def merged(base_params, lora, lora_config):
  """The U-Net params a LoRA stage's `lora` stands for."""
  return lora_lib.merge(base_params, lora, lora_scale(lora_config))


def load(trained: workdir_lib.TrainedParams, abstract_params, base_params,
         what: str = 'params'):
  """The U-Net params of one of our stages. `abstract_params`: the U-Net's structure;
  `base_params`: the base model's params, where a LoRA stage started from them; `what`:
  the config field that named them, for messages."""
  config = trained.stage_config()
  lora_config = stage_lora(config, trained.stage)
  if lora_config is None:
    return checkpoint.load_trained_params(trained, abstract_params, what)
  init = config.get(trained.stage, {}).get('init', '')
  if not init and base_params is None:
    raise ValueError(f'{trained.params_path}: a LoRA on the base model, which a stacked U-Net '
                     'cannot start from; start the stacked stage from a stage of the whole U-Net')
  start = (base_params if not init else
           params_at(workdir_lib.stage_params_path(trained.workdir, init, f'{trained.stage}.init'),
                     abstract_params, base_params, f'{trained.stage}.init'))
  return merged(start, load_lora(trained, lora_config, checkpoint.abstract_like(start), what),
                lora_config)


def load_lora(trained: workdir_lib.TrainedParams, lora_config, abstract_params,
              what: str = 'params'):
  """The LoRA alone that a LoRA stage trained on a U-Net of `abstract_params`."""
  abstract_lora = jax.eval_shape(lambda p: init_lora(p, lora_config, 0), abstract_params)
  return checkpoint.load_trained_params(trained, abstract_lora, what)


def params_at(path: str, abstract_params, base_params, what: str) -> Any:
  """The U-Net params saved at `path`: a stage's params/ (through load), or params of no
  stage (convert's output, say)."""
  config_path = os.path.join(os.path.dirname(os.path.abspath(path)), workdir_lib.CONFIG_FILE)
  if os.path.basename(os.path.normpath(path)) == workdir_lib.FINAL_PARAMS and os.path.isfile(
      config_path):
    return load(workdir_lib.TrainedParams(config_path, os.path.abspath(path)), abstract_params,
                base_params, what)
  return checkpoint.load_params(path, abstract_params, what=what)
