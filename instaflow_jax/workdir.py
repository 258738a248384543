"""The run directory: its layout, and finding what a run holds.

  WORKDIR/
    text/                     the embedded model's text side (tokenizer/, text_encoder/)
    <stage>/                  encode, rf, pairs, reflow, distill, eval
      config.json             the resolved config of the stage's last run
      checkpoints/STEP/state  the train state every N steps (Orbax), and .../meta
      rejected_checkpoints/   checkpoints a resume must not take (damaged, diverged)
      params/                 the final (EMA) params of a training stage (Orbax)
      DONE                    the stage's summary, written when it has completed

A stage writes its config.json when it starts its work, once its inputs and the config
have been checked against what the stage directory already holds: a command refused at
start leaves the workdir as it was.
"""
import dataclasses
import json
import os
from typing import Any, Mapping

import jax
import ml_collections
from absl import logging

from instaflow_jax import parallel

CONFIG_FILE = 'config.json'
CHECKPOINTS = 'checkpoints'
STATE_ITEM = 'state'  # the train state's item in a checkpoint step directory
REJECTED_DIR = 'rejected_checkpoints'
FINAL_PARAMS = 'params'
DONE_FILE = 'DONE'
TEXT_DIR = 'text'
# The stages whose final params are a U-Net, the latest of the recipe first.
TRAINED_STAGES = ('distill', 'reflow', 'rf')


def _not_writable(workdir: str, error: OSError) -> OSError:
  return OSError(f'workdir {workdir!r} is not writable ({error.strerror}); choose another '
                 '--workdir')


def ensure_workdir(workdir: str) -> None:
  """Creates the workdir (nothing in it): an unwritable one stops the run before any work."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise _not_writable(workdir, e) from None


def has_begun_stages(workdir: str) -> bool:
  """Whether a stage has begun its work in `workdir` (it writes its config.json first)."""
  return os.path.isdir(workdir) and any(
      os.path.isfile(os.path.join(workdir, name, CONFIG_FILE)) for name in os.listdir(workdir))


def changed_fields(old, new, prefix: str = '') -> list:
  """[(field, old value, new value)] of two nested config dicts, in sorted order."""
  changes = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key), new.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      changes += changed_fields(a, b, f'{prefix}{key}.')
    elif a != b:
      changes.append((f'{prefix}{key}', a, b))
  return changes


def read_stage_config(stage_dir: str):
  """The config.json a stage's last run wrote, as a dict; None where there is none."""
  path = os.path.join(stage_dir, CONFIG_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_stage_config(stage_dir: str, config: ml_collections.ConfigDict) -> None:
  """Writes the resolved config to stage_dir/config.json (atomically, process 0), and logs
  each field that differs from what an earlier run of the stage wrote there (a resumed
  stage continues with the new settings, e.g. a lower learning rate)."""
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  previous = read_stage_config(stage_dir)
  stage = os.path.basename(os.path.normpath(stage_dir))
  for field, old, new in changed_fields(previous, json.loads(text)) if previous else ():
    logging.warning('%s: %s changed since the stage last ran: %s -> %s', stage, field,
                    json.dumps(old), json.dumps(new))
  if jax.process_index() > 0:
    return
  path = os.path.join(stage_dir, CONFIG_FILE)
  try:
    os.makedirs(stage_dir, exist_ok=True)
    with open(path + '.tmp', 'w') as f:
      f.write(text)
    os.replace(path + '.tmp', path)
  except OSError as e:
    raise _not_writable(os.path.dirname(os.path.normpath(stage_dir)), e) from None


def is_complete(stage_dir: str) -> bool:
  return os.path.exists(os.path.join(stage_dir, DONE_FILE))


def warn_changes_to_complete_stage(stage_dir: str, config: ml_collections.ConfigDict,
                                   section: str) -> None:
  """Logs each field of the config section a complete stage reads that differs from what
  it ran with: the stage is skipped, so the new value would otherwise go unnoticed (later
  stages read what the stage holds, e.g. the pairs it wrote, not what the config says)."""
  previous = read_stage_config(stage_dir)
  if not previous or section not in previous or section not in config:
    return
  current = json.loads(config[section].to_json_best_effort())
  for field, old, new in changed_fields(previous[section], current, f'{section}.'):
    logging.warning('stage %s is complete: %s is %s there, %s in this config, which does '
                    'not apply to it; remove %s to redo the stage with it', section, field,
                    json.dumps(old), json.dumps(new), stage_dir)


def mark_complete(stage_dir: str, summary: Mapping[str, Any]) -> None:
  """Written by process 0 once every process has finished the stage."""
  parallel.sync(f'{stage_dir} done')
  if jax.process_index() > 0:
    return
  tmp = os.path.join(stage_dir, DONE_FILE + '.tmp')
  with open(tmp, 'w') as f:
    json.dump(dict(summary), f, indent=2)
  os.replace(tmp, os.path.join(stage_dir, DONE_FILE))


def stage_params_path(workdir: str, init: str, what: str) -> str:
  """Where the params named by a config's `init` or `teacher` are (the final params of a
  stage of this workdir, or an absolute path), checked to exist so that a missing teacher
  stops a stage before any compute."""
  path = init if os.path.isabs(init) else os.path.join(workdir, init, FINAL_PARAMS)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{what}: checkpoint {path} not found; run stage {init!r} first or '
                        'point the config at existing params')
  return path


@dataclasses.dataclass(frozen=True)
class TrainedParams:
  """Where the U-Net params of one of our training stages are, and its config.json."""
  config_path: str
  params_path: str  # a final params/ directory, or a checkpoints/STEP directory
  state_key: str = ''  # for checkpoints/STEP: 'ema_params' or 'params' of the train state

  def stage_config(self) -> dict:
    """The stage's config.json, as a dict."""
    if not os.path.isfile(self.config_path):
      raise FileNotFoundError(f'{self.config_path}: file not found')
    try:
      config = read_stage_config(os.path.dirname(self.config_path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f'{self.config_path}: not valid JSON ({e})') from None
    if not isinstance(config.get('model'), dict):
      raise ValueError(f'{self.config_path}: no model section; not the config.json of a stage')
    return config

  def model_config(self) -> ml_collections.ConfigDict:
    """The `model` section of the stage's config.json: what Pipeline.from_config builds."""
    return ml_collections.ConfigDict(self.stage_config()['model'])

  @property
  def stage(self) -> str:
    """The stage's name (its directory's)."""
    return os.path.basename(os.path.dirname(os.path.abspath(self.config_path)))

  @property
  def workdir(self) -> str:
    """The run the stage belongs to (its text side is there)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(self.config_path)))


def find_trained_params(path: str, stage: str = '', params: str = 'ema') -> TrainedParams:
  """Finds (without loading anything) the params of one of our training stages.

  path: a workdir (its stage `stage`, or else its latest finished stage of TRAINED_STAGES),
  a stage directory or its final params/ (the EMA params), or one of its checkpoints/STEP
  directories (the EMA params, or the raw ones with params='raw').
  """
  if params not in ('ema', 'raw'):
    raise ValueError(f"params={params!r}: use 'ema' or 'raw'")
  if stage and stage not in TRAINED_STAGES and not os.path.isdir(
      os.path.join(path, stage, FINAL_PARAMS)):
    raise ValueError(f'stage {stage!r} has no U-Net params; use one of {TRAINED_STAGES} or '
                     'another stage with a params/ directory')
  path = os.path.abspath(os.path.join(path, stage))
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{path}: directory not found')
  if any(os.path.isfile(os.path.join(path, s, CONFIG_FILE)) for s in TRAINED_STAGES):
    path = latest_finished_stage(path)
  if os.path.isfile(os.path.join(path, CONFIG_FILE)):
    stage_dir, path = path, os.path.join(path, FINAL_PARAMS)
    if not os.path.isdir(path):
      raise FileNotFoundError(f'{stage_dir}: no final params ({FINAL_PARAMS}/): the stage has not '
                          f'finished; give one of its {CHECKPOINTS}/STEP directories')
  elif os.path.isdir(os.path.join(path, STATE_ITEM)):  # <stage>/checkpoints/STEP
    return TrainedParams(os.path.join(os.path.dirname(os.path.dirname(path)), CONFIG_FILE),
                         path, 'ema_params' if params == 'ema' else 'params')
  elif os.path.basename(path) == FINAL_PARAMS:
    stage_dir = os.path.dirname(path)
  else:
    raise ValueError(f'{path}: neither a diffusers folder (model_index.json) nor a '
                     f'workdir, stage directory, {FINAL_PARAMS}/ or {CHECKPOINTS}/STEP '
                     'directory of ours')
  if params == 'raw':
    raise ValueError(f'{path}: final params are the EMA params; for the raw ones give a '
                     f'{CHECKPOINTS}/STEP directory')
  return TrainedParams(os.path.join(stage_dir, CONFIG_FILE), path)


def latest_finished_stage(workdir: str) -> str:
  """The directory of the run's latest finished stage of TRAINED_STAGES."""
  for stage in TRAINED_STAGES:
    stage_dir = os.path.join(workdir, stage)
    if is_complete(stage_dir) and os.path.isdir(os.path.join(stage_dir, FINAL_PARAMS)):
      return stage_dir
  raise FileNotFoundError(f'{workdir}: no finished stage with params '
                      f'(looked for {", ".join(TRAINED_STAGES)})')
