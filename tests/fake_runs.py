"""Stage directories of ours written as the stages write them, without training."""
import os

import ml_collections

from instaflow_jax import checkpoint
from instaflow_jax import workdir as workdir_lib


def diffusers_model_config(folder: str) -> ml_collections.ConfigDict:
  """A config whose model is the diffusers folder `folder` (as configs/sd15_*.py name it)."""
  return ml_collections.ConfigDict({'model': dict(
      source='diffusers', diffusers_path=folder, compute_dtype='float32', remat_policy='none')})


def write_stage(workdir: str, stage: str, config: ml_collections.ConfigDict, params=None,
                done: bool = True) -> str:
  """WORKDIR/<stage> with its config.json, final params (when given) and DONE marker."""
  stage_dir = os.path.join(workdir, stage)
  workdir_lib.write_stage_config(stage_dir, config)
  if params is not None:
    checkpoint.save_params(os.path.join(stage_dir, workdir_lib.FINAL_PARAMS), params)
  if done:
    workdir_lib.mark_complete(stage_dir, {})
  return stage_dir
