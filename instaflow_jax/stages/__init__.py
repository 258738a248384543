"""The recipe's stages, run in the order a config names them, each in WORKDIR/<stage>/."""
import json
import os

import ml_collections
from absl import logging

from instaflow_jax import pipeline as pipeline_lib
from instaflow_jax.convert.torch_names import ConversionError
from instaflow_jax.stages import distill
from instaflow_jax.stages import evaluate
from instaflow_jax.stages import pairs
from instaflow_jax.stages import train_flow
from instaflow_jax.training import checkpoint
from instaflow_jax.training import loop

STAGES = {
    'rf': train_flow.run_rf,
    'pairs': pairs.run_pairs,
    'reflow': train_flow.run_reflow,
    'distill': distill.run_distill,
    'eval': evaluate.run_eval,
}

# Errors that a user can fix (bad config, missing or corrupt inputs, divergence): main
# reports them in one line and exits non-zero.
USER_ERRORS = (ValueError, OSError, ConversionError, checkpoint.CheckpointError,
               loop.NonFiniteLossError)


def prepare_stage_dir(workdir: str, stage: str, config: ml_collections.ConfigDict) -> str:
  """Creates WORKDIR/<stage> and writes the resolved config there."""
  stage_dir = os.path.join(workdir, stage)
  try:
    os.makedirs(stage_dir, exist_ok=True)
    with open(os.path.join(stage_dir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  except OSError as e:
    raise OSError(f'workdir {workdir!r} is not writable ({e.strerror}); choose another '
                  '--workdir') from None
  return stage_dir


def run_all(config: ml_collections.ConfigDict, workdir: str) -> None:
  unknown = [s for s in config.stages if s not in STAGES]
  if unknown:
    raise ValueError(f'config.stages names unknown stage {unknown[0]!r}; known: {sorted(STAGES)}')
  pipeline_lib.store_text_side(config, workdir)
  for stage in config.stages:
    stage_dir = os.path.join(workdir, stage)
    if loop.is_complete(stage_dir):
      logging.info('stage %s: already complete in %s, skipped', stage, stage_dir)
      continue
    logging.info('stage %s: running in %s', stage, stage_dir)
    summary = STAGES[stage](config, prepare_stage_dir(workdir, stage, config))
    loop.mark_complete(stage_dir, summary or {})
    logging.info('stage %s: done %s', stage, json.dumps(summary or {}))
