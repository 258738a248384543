"""Every config file loads, and names the sections its stages read."""
import importlib

import pytest

from instaflow_jax import stages

CONFIGS = ['shapes', 'sd15_rf', 'sd15_pairs', 'sd15_reflow', 'sd15_distill', 'instaflow_1_7b']


@pytest.mark.parametrize('name', CONFIGS)
def test_config_loads_with_sections_for_its_stages(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  for stage in config.stages:
    assert stage in stages.STAGES
    assert stage in config, f'{name}: stage {stage} has no config section'


def test_quick_variant_runs_the_whole_chain():
  from configs import shapes
  assert shapes.get_config('quick').stages == ('rf', 'pairs', 'reflow', 'distill')
  with pytest.raises(ValueError, match="unknown variant 'fast'"):
    shapes.get_config('fast')
