"""Bad input, typed as a user types it: `python -m instaflow_jax.main` in a subprocess.

Each case must end with a non-zero exit, a last stderr line `error: ...`, no traceback,
and the workdir exactly as it was (every file's path and bytes).
"""
import hashlib
import json
import os
import shlex
import shutil
import subprocess
from typing import Callable, NamedTuple

import jax
import numpy as np
import pytest

from configs import shapes
from instaflow_jax import config_checks
from instaflow_jax.training import loop
from tests import runs
from tests.test_loop import damage
from tests.test_main import final_params


def tree_digest(path: str) -> str:
  """One hash of every file and directory under `path` (names and contents)."""
  digest = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    digest.update(os.path.relpath(root, path).encode() + b'/\n')
    for name in sorted(files):
      digest.update(name.encode() + b'\n')
      with open(os.path.join(root, name), 'rb') as f:
        digest.update(hashlib.sha256(f.read()).digest())
  return digest.hexdigest()


def finished_rf(quick_chain, workdir: str) -> str:
  """WORKDIR/rf as the quick chain left it, with the run's text side (WORKDIR/text)."""
  for name in ('text', 'rf'):
    shutil.copytree(os.path.join(quick_chain, name), os.path.join(workdir, name))
  return os.path.join(workdir, 'rf')


def interrupted_rf(quick_chain, workdir: str) -> str:
  """WORKDIR/rf as a run killed after its last checkpoint leaves it."""
  stage_dir = finished_rf(quick_chain, workdir)
  os.remove(os.path.join(stage_dir, 'DONE'))
  shutil.rmtree(os.path.join(stage_dir, 'params'))
  return stage_dir


def damage_every_checkpoint(quick_chain, workdir: str) -> None:
  """Each checkpoint's largest file cut to half, as a full disk leaves it."""
  stage_dir = interrupted_rf(quick_chain, workdir)
  for step in os.listdir(os.path.join(stage_dir, 'checkpoints')):
    damage(os.path.join(stage_dir, 'checkpoints', step))


def nothing(quick_chain, workdir: str) -> None:
  del quick_chain, workdir


WIDER = "--config.model.unet.block_out_channels=(16,48)"


def empty_prompts_file(quick_chain, workdir: str) -> None:
  del quick_chain
  with open(os.path.join(workdir, 'prompts.txt'), 'w') as f:
    f.write('\n  \n\n')


def sd_folder_with_scheduler(**fields) -> Callable[[str, str], None]:
  """Prepares WORKDIR/sd: a tiny random SD folder whose scheduler config has `fields`."""
  def prepare(quick_chain, workdir: str) -> None:
    del quick_chain
    from tests import tiny_models
    folder = os.path.join(workdir, 'sd')
    tiny_models.write_tiny_sd_pipeline(folder)
    path = os.path.join(folder, 'scheduler', 'scheduler_config.json')
    with open(path) as f:
      config = json.load(f)
    with open(path, 'w') as f:
      json.dump({**config, **fields}, f)
  return prepare


def uncaptioned_folder(quick_chain, workdir: str) -> None:
  """WORKDIR/data: images, no captions anywhere."""
  del quick_chain
  from tests import own_data
  own_data.write_images(os.path.join(workdir, 'data'), 3)


def metadata_of_missing_files(quick_chain, workdir: str) -> None:
  """WORKDIR/data/metadata.jsonl naming images that are not there."""
  del quick_chain
  os.makedirs(os.path.join(workdir, 'data'))
  with open(os.path.join(workdir, 'data', 'metadata.jsonl'), 'w') as f:
    for name in ('a.jpg', 'b.jpg'):
      f.write(json.dumps({'file_name': name, 'text': 'a red circle'}) + '\n')


FOLDER = ['--config.data.source=folder', '--config.data.path={workdir}/data']


SD_TEACHER = ['--config.model.source=diffusers', '--config.model.diffusers_path={workdir}/sd',
              '--config.pairs.teacher={workdir}/sd']



class Case(NamedTuple):
  name: str
  prepare: Callable[[str, str], None]  # (quick_chain, workdir): what the workdir holds
  stages: tuple
  flags: list  # {workdir} is filled in
  message: str  # the start of the last stderr line; {workdir} is filled in
  config: str = 'configs/shapes.py:quick'


CASES = [Case(*case) for case in [
    ('missing config file', nothing, ('rf',), [],
     "error: --config=configs/no_such_config.py does not load: [Errno 2] No such file or "
     "directory: 'configs/no_such_config.py'", 'configs/no_such_config.py'),
    ('zero steps', nothing, ('rf',), ['--config.rf.steps=0'],
     'error: config.rf.steps = 0: must be a whole number >= 1'),
    ('negative steps', nothing, ('rf',), ['--config.rf.steps=-5'],
     'error: config.rf.steps = -5: must be a whole number >= 1'),
    ('zero checkpoint interval', nothing, ('rf',), ['--config.rf.checkpoint_every=0'],
     'error: config.rf.checkpoint_every = 0: must be a whole number >= 1'),
    ('zero pairs', nothing, ('pairs',), ['--config.pairs.num_pairs=0'],
     'error: config.pairs.num_pairs = 0: must be a whole number >= 1'),
    ('EMA decay of 1', nothing, ('rf',), ['--config.rf.ema_decay=1.0'],
     'error: config.rf.ema_decay = 1.0: must be in [0.0, 1.0)'),
    ('image size of two values', nothing, ('rf',), ['--config.data.image_size=24'],
     'error: config.data.image_size = 24 but the model makes 16x16 images'),
    ('resume with another model', interrupted_rf, ('rf',), [WIDER],
     'error: {workdir}/rf/checkpoints/30 does not fit the model config: parameter '
     'unet/down_blocks_1/attentions_0/norm/bias has shape (32,) in the checkpoint but (48,) in the '
     'model config'),
    ('teacher of another model', finished_rf, ('rf', 'pairs'), [WIDER],
     'error: pairs.teacher: checkpoint {workdir}/rf/params does not fit the model config: '
     'parameter down_blocks_1/attentions_0/norm/bias has shape (32,) in the checkpoint but '
     '(48,) in the model config'),
    ('every checkpoint damaged', damage_every_checkpoint, ('rf',), [],
     'error: {workdir}/rf/checkpoints/30 is damaged ('),
    ('teacher not trained', nothing, ('pairs',), [],
     "error: pairs.teacher: checkpoint {workdir}/rf/params not found; run stage 'rf' first"),
    ('unknown field', nothing, ('rf',), ['--config.rf.stepz=3'],
     'error: config override names an unknown field: stepz'),
    ('wrong type', nothing, ('rf',), ['--config.rf.steps=many'],
     'error: flag --config.rf.steps=many: invalid literal for int()'),
    ('unknown stage', nothing, ('rf', 'paint'), [],
     "error: config.stages names 'paint': neither a stage (encode, rf, pairs, reflow, distill, "
     'eval) nor a section config.paint whose kind is one of rf, reflow, distill'),
    ('unknown dataset', nothing, ('rf',), ['--config.data.name=no_such_dataset'],
     "error: tfds dataset 'no_such_dataset' not found"),
    ('missing prompts file', nothing, ('pairs',),
     ['--config.data.prompts_file={workdir}/no_prompts.txt'],
     'error: prompts file {workdir}/no_prompts.txt: No such file or directory; give a text '
     'file with one prompt a line'),
    ('image folder without captions', uncaptioned_folder, ('rf',), FOLDER,
     'error: image folder {workdir}/data has no captions: give metadata.jsonl (file_name, '
     'text), metadata.csv or a .txt beside each image'),
    ('metadata naming missing files', metadata_of_missing_files, ('rf',), FOLDER,
     'error: image folder {workdir}/data: 2 of 2 examples unusable, more than '
     'data.max_bad_fraction=0.01: 2 named in the metadata but missing (first: a.jpg); fix '
     'them or raise data.max_bad_fraction'),
    ('training on data never encoded', nothing, ('rf',),
     ['--config.rf.encoded=encode', '--config.rf.train_text_encoder=False'],
     'error: no encode shards in {workdir}/encode (meta.json missing): run stage encode first'),
    ('empty prompts file', empty_prompts_file, ('pairs',),
     ['--config.data.prompts_file={workdir}/prompts.txt'],
     'error: prompts file {workdir}/prompts.txt holds no prompt (every line is empty)'),
    ('teacher of an unsupported prediction type',
     sd_folder_with_scheduler(prediction_type='flow_prediction'), ('pairs',), SD_TEACHER,
     "error: {workdir}/sd/scheduler/scheduler_config.json: prediction_type 'flow_prediction' "
     "is not supported; use one of 'epsilon', 'v_prediction', 'sample' instead"),
    ('teacher of an unsupported beta schedule', sd_folder_with_scheduler(beta_schedule='sigmoid'),
     ('pairs',), SD_TEACHER,
     "error: {workdir}/sd/scheduler/scheduler_config.json: beta_schedule 'sigmoid' is not "
     "supported; use one of 'linear', 'scaled_linear', 'squaredcos_cap_v2' instead"),
]]


@pytest.mark.slow  # python -m instaflow_jax.main in a subprocess
@pytest.mark.parametrize('case', CASES, ids=[c.name for c in CASES])
def test_refused_in_one_line_with_the_workdir_unchanged(quick_chain, tfds_dir, tmp_path, case):
  workdir = str(tmp_path / 'w')
  os.makedirs(workdir)
  case.prepare(quick_chain, workdir)
  before = tree_digest(workdir)
  flags = [flag.format(workdir=workdir) for flag in case.flags]
  result = runs.run_main(workdir, tfds_dir, *flags, stages=case.stages, config=case.config)
  assert result.returncode != 0
  message = case.message.format(workdir=workdir)
  assert runs.last_line(result).startswith(message), result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  assert tree_digest(workdir) == before


@pytest.mark.slow  # python -m instaflow_jax.main in a subprocess
def test_read_only_workdir_fails_in_one_line(tfds_dir):
  result = runs.run_main('/sys/instaflow_jax_workdir', tfds_dir)
  assert result.returncode != 0
  assert runs.last_line(result) == (
      "error: workdir '/sys/instaflow_jax_workdir' is not writable (Operation not permitted); "
      'choose another --workdir')


@pytest.mark.slow  # python -m instaflow_jax.main in a subprocess
def test_divergence_stops_with_a_command_that_resumes(tfds_dir, tmp_path):
  workdir = str(tmp_path / 'w')
  result = runs.run_main(workdir, tfds_dir, '--config.rf.optimizer.lr=1e30',
                         '--config.rf.optimizer.warmup_steps=0', '--config.rf.steps=6',
                         '--config.rf.checkpoint_every=2')
  assert result.returncode != 0
  message = runs.last_line(result)
  assert message.startswith('error: rf: loss '), result.stderr[-3000:]
  assert 'no checkpoint is from before the divergence' in message
  assert 'Traceback' not in result.stderr
  command = shlex.split(message.split(' restarts the stage: ', 1)[1])
  assert command[-1] == '--config.rf.optimizer.lr=1e+29'
  sane = subprocess.run(command[:-1] + ['--config.rf.optimizer.lr=1e-3'], cwd=runs.REPO,
                        capture_output=True, text=True, timeout=600)
  assert sane.returncode == 0, sane.stderr[-3000:]
  assert 'rf.optimizer.lr changed since the stage last ran: 1e+30 -> 0.001' in sane.stderr
  losses = [r['loss'] for r in loop.read_metrics(os.path.join(workdir, 'rf')) if 'loss' in r]
  assert len(losses) == 2 and np.all(np.isfinite(losses))  # steps 5 and 6
  params = jax.tree.leaves(final_params(os.path.join(workdir, 'rf')))
  assert params and all(np.all(np.isfinite(p)) for p in params)


def _count_fields():
  for stage in config_checks.TRAINING_STAGES:
    for name in config_checks.TRAINING_COUNTS:
      yield stage, name
  for section, names in config_checks.COUNTS.items():
    for name in names:
      yield section, name


@pytest.mark.parametrize('value', [0, -1])
def test_every_count_field_is_checked_and_named(value):
  for section, name in _count_fields():
    config = shapes.get_config('quick')
    config[section][name] = value
    if section not in config.stages:  # an optional stage (encode): checked when named
      config.stages = (section,) + tuple(config.stages)
    with pytest.raises(ValueError, match=rf'^config\.{section}\.{name} = {value}: must be a '
                                         r'whole number >= 1$'):
      config_checks.check_config(config)
  config_checks.check_config(shapes.get_config('quick'))  # the defaults pass


@pytest.mark.parametrize('fields, message', [
    ({'data.source': 'lmdb'}, r"^config.data.source = 'lmdb': use one of tfds, folder, "
                              r"webdataset$"),
    ({'data.source': 'webdataset'}, r"^config.data.path = '': data.source 'webdataset' reads the "
                                    r"files it names; set --config.data.path="),
    ({'data.crop': 'left'}, r"^config.data.crop = 'left': use one of center, random$"),
    ({'data.max_bad_fraction': 1.5}, r'^config.data.max_bad_fraction = 1.5: must be in '
                                     r'\[0.0, 1.0\]$'),
    ({'reflow.encoded': 'encode'}, r"^config.reflow.encoded = 'encode' and config.reflow.pairs = "
                                   r"'pairs': a stage trains on encoded data or on pairs, not "
                                   r'both'),
])
def test_data_fields_are_checked_and_named(fields, message):
  config = shapes.get_config('quick')
  for field, value in fields.items():
    section, name = field.split('.')
    config[section][name] = value
  with pytest.raises(ValueError, match=message):
    config_checks.check_config(config)


@pytest.mark.parametrize('fields, message', [
    ({'model.source': 'diffusers'}, r"^config.rf.train_text_encoder = True: only the embedded "
                                    r"model's text encoder trains"),
    ({'model.lora.stages': ('rf',)}, r"^config.rf.train_text_encoder = True and "
                                     r"config.model.lora.stages names 'rf': a LoRA stage trains "
                                     r'its LoRA alone'),
    ({'rf.encoded': 'encode'}, r"^config.rf.train_text_encoder = True and config.rf.encoded = "
                               r"'encode': the encode stage stored the text states of the "
                               r"untrained encoder; set encoded to '' or train_text_encoder to "
                               r'False$'),
    ({'rf_copy.kind': 'reflow'}, r"^config.rf_copy.train_text_encoder = True: only a stage of "
                                 r"kind 'rf' trains the text encoder"),
])
def test_text_encoder_training_is_refused_where_it_cannot_be_read(fields, message):
  """Only the embedded model's stage rf trains its text encoder, on its captions (rf_copy:
  a second training stage made from rf's section)."""
  config = shapes.get_config('quick')
  config.rf.train_text_encoder = True
  with config.unlocked():
    config.rf_copy = config.rf.copy_and_resolve_references()
  config.stages = ('rf_copy',) if 'rf_copy.kind' in fields else ('rf',)
  for field, value in fields.items():
    *path, name = field.split('.')
    section = config
    for part in path:
      section = section[part]
    section[name] = value
  config_checks.check_config(shapes.get_config('quick'))  # off by default
  with pytest.raises(ValueError, match=message):
    config_checks.check_config(config)
