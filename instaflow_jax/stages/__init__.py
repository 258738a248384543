"""The recipe's stages, run in the order a config names them, each in WORKDIR/<stage>/."""
import json
import os

import ml_collections
from absl import logging

from instaflow_jax import config_checks
from instaflow_jax import text_side
from instaflow_jax import workdir as workdir_lib
from instaflow_jax.stages import common
from instaflow_jax.stages import distill
from instaflow_jax.stages import encode
from instaflow_jax.stages import evaluate
from instaflow_jax.stages import pairs
from instaflow_jax.stages import train_flow
from instaflow_jax.training import loop

# Each kind of stage (config_checks.STAGE_KINDS) and what runs it, given the config and its
# directory WORKDIR/<stage>, whose name is the config section the stage reads.
STAGES = {
    'encode': encode.run_encode,
    'rf': train_flow.run_train_flow,
    'pairs': pairs.run_pairs,
    'reflow': train_flow.run_train_flow,
    'distill': distill.run_distill,
    'eval': evaluate.run_eval,
}

# Errors that a user can fix (bad config, missing or corrupt inputs, divergence): main
# reports them in one line and exits non-zero. ValueError and OSError include
# convert's ConversionError and checkpoint.CheckpointError.
USER_ERRORS = (ValueError, OSError, loop.NonFiniteLossError)


def run_all(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Runs the stages of `config.stages` in WORKDIR/<stage>/, skipping complete ones. The
  config is checked first; each stage writes its config.json once its own checks pass."""
  config_checks.check_config(config)
  common.check_prompts_files(config)
  if 'eval' in config.stages:
    evaluate.check_held_out(config)
  workdir_lib.ensure_workdir(workdir)
  stored_text_side = text_side.store_text_side(config, workdir)
  try:
    for stage in config.stages:
      stage_dir = os.path.join(workdir, stage)
      if workdir_lib.is_complete(stage_dir):
        logging.info('stage %s: already complete in %s, skipped', stage, stage_dir)
        workdir_lib.warn_changes_to_complete_stage(stage_dir, config, stage)
        continue
      logging.info('stage %s: running in %s', stage, stage_dir)
      summary = STAGES[config_checks.stage_kind(config, stage)](config, stage_dir)
      workdir_lib.mark_complete(stage_dir, summary or {})
      logging.info('stage %s: done %s', stage, json.dumps(summary or {}))
  except USER_ERRORS:
    # Refused before any stage began: the text side this command stored goes too.
    if stored_text_side and not workdir_lib.has_begun_stages(workdir):
      text_side.remove_text_side(workdir)
    raise
