"""Stages 'rf' and 'reflow': train a text-conditioned rectified flow v(x_s, s | text) with
the flow-matching loss (training/flow_loss.py), on the data (rf) or on the teacher's coupled
pairs (reflow)."""
import os
from typing import Any, Mapping

import ml_collections

from instaflow_jax import pipeline as pipeline_lib
from instaflow_jax import text_side
from instaflow_jax.stages import common
from instaflow_jax.training import flow_loss
from instaflow_jax.training import loop


def run_train_flow(config: ml_collections.ConfigDict, stage_dir: str) -> Mapping[str, Any]:
  """A stage of kind 'rf' (independent noise) or 'reflow' (the teacher's coupled pairs,
  `pairs` of its section), with the config section named as its directory."""
  stage = os.path.basename(os.path.normpath(stage_dir))
  train_config = config[stage]
  pipe = pipeline_lib.Pipeline.for_training(config.model, seed=config.seed,
                                            workdir=os.path.dirname(stage_dir))
  init_params = common.initial_unet_params(pipe, os.path.dirname(stage_dir), train_config.init,
                                           f'{stage}.init')
  data = common.training_input(config, stage_dir, pipe, train_config)
  prompts = common.sample_prompts(config, train_config.num_samples)
  params = loop.train(
      train_config, stage_dir, stage=stage, batches=data.batches, seed=config.seed,
      run_config=config, **common.trained_part(
          config, stage, pipe, init_params, common.frozen_params(pipe),
          flow_loss.flow_matching_loss(pipe.modules, train_config),
          common.make_sample_fn(pipe, prompts, train_config, config.seed)))
  if train_config.get('train_text_encoder'):
    # Before the stage is complete: a run killed in between redoes this on resuming.
    text_side.store_trained_encoder(os.path.dirname(stage_dir), pipe.text_encoder,
                                    params[common.TRAINED_TEXT_ENCODER])
  return {'steps': train_config.steps, 'examples_per_epoch': len(data)}
