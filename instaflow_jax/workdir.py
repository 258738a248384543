"""The run directory: WORKDIR/<stage>/, each with the resolved config.json of its last run.

A stage writes its config.json when it starts its work, once its inputs and the config
have been checked against what the stage directory already holds: a command refused at
start leaves the workdir as it was.
"""
import json
import os

import jax
import ml_collections
from absl import logging

CONFIG_FILE = 'config.json'


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
