"""Checks of a run's config before any stage: every count, interval and fraction in its
range, and the image size the data gives the model. A bad value stops the run with one
line naming the field (main prints it as `error: ...`); nothing is computed or written.

Only the sections of the stages that `config.stages` names are checked.

A stage is named by its kind ('rf', 'reflow', ...), or, for a training stage that runs a
second time with other settings (the 2-RF's phase at a larger batch, say), by a name of its
own whose config section gives the kind: `config.reflow_large.kind = 'reflow'`.
"""
import json
import math
import os

import ml_collections

STAGE_KINDS = ('encode', 'rf', 'pairs', 'reflow', 'distill', 'eval')  # the recipe's, in order
TRAINING_STAGES = ('rf', 'reflow', 'distill')

# Whole numbers >= 1, per section (a section checks those of its fields it has: the
# evaluator's sizes belong to the shapes evaluator only).
TRAINING_COUNTS = ('steps', 'batch_size', 'grad_accum_steps', 'log_every',
                    'checkpoint_every', 'keep_checkpoints', 'sample_every', 'num_samples',
                    'sample_steps', 'preemption_check_every')
COUNTS = {
    'encode': ('shard_size', 'batch_size'),
    'pairs': ('num_pairs', 'shard_size', 'batch_size', 'num_steps'),
    'distill': ('student_steps', 'teacher_steps'),
    'eval': ('num_prompts', 'batch_size', 'evaluator_examples', 'evaluator_steps',
             'grid_prompts'),
}


def _field(section: str, name: str) -> str:
  return f'config.{section}.{name}'


def _check_count(config, section: str, name: str) -> None:
  value = config[section][name]
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f'{_field(section, name)} = {value!r}: must be a whole number >= 1')


def _check_range(value, field: str, low: float, high: float, high_included: bool) -> None:
  if not (low <= value < high or (high_included and value == high)):
    bracket = ']' if high_included else ')'
    raise ValueError(f'{field} = {value!r}: must be in [{low}, {high}{bracket}')


def _check_training(config, stage: str) -> None:
  section = config[stage]
  for name in TRAINING_COUNTS:
    _check_count(config, stage, name)
  _check_range(section.ema_decay, _field(stage, 'ema_decay'), 0.0, 1.0, high_included=False)
  _check_range(section.caption_dropout, _field(stage, 'caption_dropout'), 0.0, 1.0,
               high_included=True)
  lr = section.optimizer.lr
  if not (math.isfinite(lr) and lr > 0):
    raise ValueError(f'{_field(stage, "optimizer.lr")} = {lr!r}: must be a finite number > 0')
  if section.optimizer.warmup_steps < 0:
    raise ValueError(f'{_field(stage, "optimizer.warmup_steps")} = '
                     f'{section.optimizer.warmup_steps}: must be >= 0')
  if section.get('encoded') and section.pairs:
    raise ValueError(f'{_field(stage, "encoded")} = {section.encoded!r} and '
                     f'{_field(stage, "pairs")} = {section.pairs!r}: a stage trains on encoded '
                     'data or on pairs, not both; set one of them to \'\'')
  if section.get('train_text_encoder'):
    _check_text_encoder_training(config, stage)
  if section.batch_size % section.grad_accum_steps:
    raise ValueError(f'{_field(stage, "batch_size")} = {section.batch_size} is not divisible by '
                     f'{_field(stage, "grad_accum_steps")} = {section.grad_accum_steps}')


def _check_text_encoder_training(config, stage: str) -> None:
  """The text encoder trains with the U-Net only in the stage that starts the chain (kind
  'rf') of the embedded model, on captions: every later stage reads what it trained."""
  field = _field(stage, 'train_text_encoder')
  if config.model.source != 'embedded':
    raise ValueError(f"{field} = True: only the embedded model's text encoder trains "
                     "(model.source='embedded'); a diffusers model's stays as its folder has "
                     'it: set it to False')
  if stage_kind(config, stage) != 'rf':
    raise ValueError(f"{field} = True: only a stage of kind 'rf' trains the text encoder (the "
                     'stages after it read the one it trained): set it to False')
  if stage in config.model.get('lora', {}).get('stages', ()):
    raise ValueError(f'{field} = True and config.model.lora.stages names {stage!r}: a LoRA '
                     'stage trains its LoRA alone; set one of them off')
  if config[stage].get('encoded'):
    raise ValueError(f'{field} = True and {_field(stage, "encoded")} = '
                     f'{config[stage].encoded!r}: the encode stage stored the text states of '
                     "the untrained encoder; set encoded to '' or train_text_encoder to False")


def _check_eval_steps(config) -> None:
  for model, steps in config.eval.steps.items():
    for n in steps:
      if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f'config.eval.steps.{model} has {n!r}: step counts are whole '
                         'numbers >= 1')


# data.source's values, and what each reads (data/input.py, data/files.py).
DATA_SOURCES = ('tfds', 'folder', 'webdataset')
CROPS = ('center', 'random')


def _check_data(data) -> None:
  """The data section's source, crop and tolerance of bad files (configs written before
  these fields have none: the defaults)."""
  source = data.get('source', 'tfds')
  if source not in DATA_SOURCES:
    raise ValueError(f'config.data.source = {source!r}: use one of {", ".join(DATA_SOURCES)}')
  if source != 'tfds' and not data.get('path'):
    raise ValueError(f"config.data.path = '': data.source {source!r} reads the files it names; "
                     'set --config.data.path=' + ('FOLDER' if source == 'folder'
                                                   else "'/data/shards/*.tar'"))
  crop = data.get('crop', 'center')
  if crop not in CROPS:
    raise ValueError(f'config.data.crop = {crop!r}: use one of {", ".join(CROPS)}')
  _check_range(data.get('max_bad_fraction', 0.0), 'config.data.max_bad_fraction', 0.0, 1.0,
               high_included=True)


def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


def model_image_size(model: ml_collections.ConfigDict):
  """The image side the U-Net is made for: sample_size times the autoencoder's
  down-sampling (1 in pixel space). None where the diffusers folder cannot be read yet
  (loading it reports that)."""
  if model.source == 'embedded':
    return model.unet.sample_size
  try:
    unet = _read_json(os.path.join(model.diffusers_path, 'unet', 'config.json'))
    vae = _read_json(os.path.join(model.diffusers_path, 'vae', 'config.json'))
  except (OSError, ValueError):
    return None
  if not isinstance(unet.get('sample_size'), int):
    return None
  return unet['sample_size'] * 2 ** (len(vae['block_out_channels']) - 1)


def _check_image_size(config) -> None:
  expected = model_image_size(config.model)
  if expected is not None and config.data.image_size != expected:
    raise ValueError(
        f'config.data.image_size = {config.data.image_size} but the model makes '
        f'{expected}x{expected} images (U-Net sample_size x autoencoder scale); set '
        f'--config.data.image_size={expected}')


def stage_kind(config: ml_collections.ConfigDict, stage: str) -> str:
  """The kind of stage that `stage` of config.stages runs (ValueError for none)."""
  if stage in STAGE_KINDS:
    return stage
  section = config.get(stage)
  kind = section.get('kind') if isinstance(section, ml_collections.ConfigDict) else None
  if kind not in TRAINING_STAGES:
    raise ValueError(f'config.stages names {stage!r}: neither a stage ({", ".join(STAGE_KINDS)}) '
                     f'nor a section config.{stage} whose kind is one of '
                     f'{", ".join(TRAINING_STAGES)}')
  return kind


def _check_lora(config) -> None:
  lora = config.model.get('lora')
  if not lora or not lora.stages:
    return
  for stage in lora.stages:
    if stage not in config or stage_kind(config, stage) not in TRAINING_STAGES:
      raise ValueError(f'config.model.lora.stages names {stage!r}, which is no training stage '
                       f'of this config; name stages of kind {", ".join(TRAINING_STAGES)}')
  if isinstance(lora.rank, bool) or not isinstance(lora.rank, int) or lora.rank < 1:
    raise ValueError(f'config.model.lora.rank = {lora.rank!r}: must be a whole number >= 1')
  if not (math.isfinite(lora.alpha) and lora.alpha > 0):
    raise ValueError(f'config.model.lora.alpha = {lora.alpha!r}: must be a finite number > 0')
  if not lora.target_modules:
    raise ValueError('config.model.lora.target_modules is empty: name the layers to adapt, '
                     "e.g. ('to_q', 'to_k', 'to_v', 'to_out_0')")


def check_config(config: ml_collections.ConfigDict) -> None:
  """ValueError naming the first field of `config` out of its range."""
  stages = tuple(config.stages)
  for stage in stages:
    if stage_kind(config, stage) in TRAINING_STAGES:
      _check_training(config, stage)
  for section, names in COUNTS.items():
    if section in stages:
      for name in names:
        if name in config[section]:
          _check_count(config, section, name)
  if 'eval' in stages:
    _check_eval_steps(config)
  if 'data' in config:
    _check_data(config.data)
  if 'data' in config and 'model' in config:
    _check_image_size(config)
  if 'model' in config:
    _check_lora(config)
