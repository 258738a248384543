"""Every config file loads, and names the sections its stages read; the Stable Diffusion
configs have the toy config's fields, written out in their own files."""
import importlib
import json
import os

import ml_collections
import pytest

from instaflow_jax import config_checks
from instaflow_jax import stages

CONFIGS = ['shapes', 'sd15_rf', 'sd15_pairs', 'sd15_reflow', 'sd15_distill', 'instaflow_1_7b',
           'coco_eval']
SD_CONFIGS = [name for name in CONFIGS if name != 'shapes']


def _load(name: str) -> ml_collections.ConfigDict:
  return importlib.import_module(f'configs.{name}').get_config()


@pytest.mark.parametrize('name', CONFIGS)
def test_config_loads_with_sections_for_its_stages(name):
  config = _load(name)
  for stage in config.stages:
    assert config_checks.stage_kind(config, stage) in stages.STAGES
    assert stage in config, f'{name}: stage {stage} has no config section'
  if 'eval' in config.stages:  # every model it measures has its settings
    for model in config.eval.models:
      for section in ('steps', 'guidance', 'labels'):
        assert model in config.eval[section], (name, model, section)


@pytest.mark.parametrize('name', CONFIGS)
def test_config_passes_the_checks_a_run_starts_with(name):
  config_checks.check_config(_load(name))


@pytest.mark.parametrize('variant', ['quick', None, 'long'])
def test_shapes_runs_the_whole_chain(variant):
  """Every stage but the optional encode (pixel space has no encoders worth caching)."""
  from configs import shapes
  assert shapes.get_config(variant).stages == tuple(s for s in stages.STAGES if s != 'encode')


def test_long_shapes_trains_longer_on_more_pairs_as_measured_and_changes_nothing_else():
  from configs import shapes
  default, long = shapes.get_config(), shapes.get_config('long')
  for stage in ('rf', 'reflow', 'distill'):
    assert long[stage].steps > default[stage].steps, stage
    long[stage].steps = default[stage].steps
  assert long.pairs.num_pairs > default.pairs.num_pairs
  long.pairs.num_pairs = default.pairs.num_pairs
  # The learning rates its stages were measured at.
  assert (long.rf.optimizer.lr, long.reflow.optimizer.lr) == (1e-3, 5e-4)
  assert (default.rf.optimizer.lr, default.reflow.optimizer.lr) == (2e-3, 5e-4)
  long.rf.optimizer.lr = default.rf.optimizer.lr
  # Its teacher was measured with one transformer layer at 6x6, the default's with two.
  assert (long.model.unet.transformer_layers_per_block,
          default.model.unet.transformer_layers_per_block) == (1, 2)
  long.model.unet.transformer_layers_per_block = 2
  # And with the random text encoder, which the default's trains in stage rf.
  assert (long.rf.train_text_encoder, default.rf.train_text_encoder) == (False, True)
  long.rf.train_text_encoder = True
  # Its eval keeps Dopri5, which the default leaves out.
  assert (long.eval.dopri5, default.eval.dopri5) == (('rf', 'reflow'), ())
  long.eval.dopri5 = ()
  assert long.to_dict() == default.to_dict()


def test_unknown_shapes_variant_is_named():
  from configs import shapes
  with pytest.raises(ValueError, match="unknown variant 'fast'"):
    shapes.get_config('fast')


# What an SD config leaves out of a section of configs/shapes.py, and what only it has. The
# embedded model's word tokenizer and the training of its text encoder; the stacked student's settings (model.unet_kind defaults
# to one U-Net); the captioned-shapes evaluator's classifier against the photographs'
# Inception and CLIP files and the diffusers folders compared as models.
_SD_MAY_OMIT = {'model': {'vocabulary', 'unet_kind', 'stacked'}, 'rf': {'train_text_encoder'},
                'eval': {'evaluator_examples', 'evaluator_steps'}}
_SD_ONLY = {'eval': {'inception_path', 'clip_path', 'paths'}}
# Sections whose keys name models, or override the fields of a diffusers folder's configs.
_NOT_FIELDS = ('model.text_encoder', 'model.unet', 'eval.labels', 'eval.paths', 'eval.steps',
               'eval.guidance')


def _field_names(section: ml_collections.ConfigDict, prefix: str = '') -> set:
  """The dotted names of a section's fields, into its sub-sections ('rf.optimizer.lr')."""
  names = set()
  for key, value in section.items():
    name = prefix + key
    if isinstance(value, ml_collections.ConfigDict) and name not in _NOT_FIELDS:
      names |= _field_names(value, name + '.')
    else:
      names.add(name)
  return names


def _section_fields(config: ml_collections.ConfigDict, section: str) -> set:
  return {name for name in _field_names(config) if name.split('.')[0] == section}


def _without(names: set, omitted: set) -> set:
  """`names` less the omitted fields and their sub-fields."""
  return {n for n in names if not any(n == o or n.startswith(o + '.') for o in omitted)}


@pytest.mark.parametrize('name', SD_CONFIGS)
def test_sd_config_has_the_fields_of_the_shapes_config(name):
  """A field added to configs/shapes.py and not to the SD configs (or the other way round)
  fails here: the SD configs write out their own fields, not the toy config's."""
  from configs import shapes
  sd, toy = _load(name), shapes.get_config()
  run_wide = set(toy) - set(stages.STAGES)  # seed, mesh, data, model, ...
  for section in set(sd) | run_wide:
    # A stage of its own name (a second phase) has the fields of its kind's section.
    kind = config_checks.stage_kind(sd, section) if section in sd.stages else section
    omit = {f'{section}.{field}' for field in _SD_MAY_OMIT.get(kind, ())}
    only = {f'{section}.{field}' for field in _SD_ONLY.get(kind, ())}
    only |= {f'{section}.kind'} if kind != section else set()
    toy_fields = {section + name[len(kind):] for name in _section_fields(toy, kind)}
    expected = _without(toy_fields | only, omit)
    got = _without(_section_fields(sd, section), omit)
    assert got == expected, (name, section, got ^ expected)


def _resolved(config: ml_collections.ConfigDict) -> dict:
  """Every leaf of a config by dotted name, as repr (types count: 1 is not 1.0)."""
  leaves = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict) and len(value):
      leaves.update({f'{key}.{k}': v for k, v in _resolved(value).items()})
    else:
      leaves[key] = repr(value.to_dict() if isinstance(value, ml_collections.ConfigDict)
                         else value)
  return leaves


def _record_sd_configs() -> None:
  with open(_RECORDED_SD_CONFIGS, 'w') as f:
    json.dump({name: _resolved(_load(name)) for name in SD_CONFIGS}, f, indent=1)
    f.write('\n')


_RECORDED_SD_CONFIGS = os.path.join(os.path.dirname(__file__), 'sd_configs.json')


@pytest.mark.parametrize('name', SD_CONFIGS)
def test_sd_config_resolves_to_its_recorded_values(name):
  """No SD config can be run in the tests (they need SD 1.5's weights): a change to one is
  meant when it shows here. Re-record with `python -m tests.test_configs`."""
  with open(_RECORDED_SD_CONFIGS) as f:
    recorded = json.load(f)[name]
  resolved = _resolved(_load(name))
  assert set(resolved) == set(recorded), set(resolved) ^ set(recorded)
  changed = {k: (recorded[k], resolved[k]) for k in resolved if resolved[k] != recorded[k]}
  assert not changed, changed


if __name__ == '__main__':
  _record_sd_configs()


def test_a_stage_of_its_own_name_runs_the_kind_its_section_gives():
  from configs import shapes
  config = shapes.get_config('quick')
  with config.unlocked():
    config.reflow_large = config.reflow.copy_and_resolve_references()
    config.reflow_large.kind = 'reflow'
    config.paint = ml_collections.ConfigDict({'kind': 'pairs'})
  assert config_checks.stage_kind(config, 'reflow') == 'reflow'
  assert config_checks.stage_kind(config, 'reflow_large') == 'reflow'
  for name in ('paint', 'nothing'):  # only training stages run twice; no section, no kind
    with pytest.raises(ValueError, match=f"config.stages names '{name}': neither a stage"):
      config_checks.stage_kind(config, name)
  config.stages = ('reflow_large',)
  config.reflow_large.steps = 0  # its section is checked as the kind's
  with pytest.raises(ValueError, match='config.reflow_large.steps = 0'):
    config_checks.check_config(config)
