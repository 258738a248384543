"""Every config file loads, and names the sections its stages read."""
import importlib

import pytest

from instaflow_jax import stages

CONFIGS = ['shapes', 'sd15_rf', 'sd15_pairs', 'sd15_reflow', 'sd15_distill', 'instaflow_1_7b',
           'coco_eval']


@pytest.mark.parametrize('name', CONFIGS)
def test_config_loads_with_sections_for_its_stages(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  for stage in config.stages:
    assert stage in stages.STAGES
    assert stage in config, f'{name}: stage {stage} has no config section'
  if 'eval' in config.stages:  # every model it measures has its settings
    for model in config.eval.models:
      for section in ('steps', 'guidance', 'labels'):
        assert model in config.eval[section], (name, model, section)


@pytest.mark.parametrize('variant', ['quick', None])
def test_shapes_runs_the_whole_chain(variant):
  from configs import shapes
  assert shapes.get_config(variant).stages == ('rf', 'pairs', 'reflow', 'distill', 'eval')


def test_unknown_shapes_variant_is_named():
  from configs import shapes
  with pytest.raises(ValueError, match="unknown variant 'fast'"):
    shapes.get_config('fast')
