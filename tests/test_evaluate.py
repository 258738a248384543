"""The eval stage: the report of the quick chain, the shapes evaluator's logic, bad input."""
import json
import math
import os

import numpy as np
import pytest

from configs import shapes as shapes_config
from instaflow_jax.data import shapes
from instaflow_jax.evaluation import report
from instaflow_jax.evaluation import shapes_evaluator as se
from instaflow_jax.stages import evaluate

MEASURES = ('fd', 'fidelity', 'count_fidelity', 'nfe', 'seconds_per_image', 'compile_seconds')


def test_quick_chain_report_has_every_number_finite(quick_chain):
  eval_dir = os.path.join(quick_chain, 'eval')
  with open(os.path.join(eval_dir, report.METRICS_FILE)) as f:
    metrics = json.load(f)
  config = shapes_config.get_config('quick').eval
  assert list(metrics['models']) == list(config.models)
  for model in config.models:
    solvers = [str(n) for n in config.steps[model]] + (['dopri5'] if model in config.dopri5 else [])
    assert list(metrics['models'][model]) == solvers
    for name, measured in metrics['models'][model].items():
      expected = MEASURES + (('straightness',) if name != 'dopri5' else ())
      assert sorted(measured) == sorted(expected), (model, name)
      assert all(math.isfinite(v) for v in measured.values()), (model, name, measured)
    assert math.isfinite(metrics['straightness'][model])
  assert metrics['models']['reflow']['dopri5']['nfe'] > 6  # adaptive: more than one step
  assert sorted(metrics['evaluator_accuracy']) == sorted(se.ACCURACY_KEYS)
  assert all(0 <= v <= 1 for v in metrics['evaluator_accuracy'].values())
  assert math.isfinite(metrics['fd_floor']) and metrics['num_prompts'] == config.num_prompts
  for name in (report.REPORT_FILE, report.GRID_FILE, report.FD_VS_STEPS_FILE,
               report.FD_VS_SECONDS_FILE):
    assert os.path.getsize(os.path.join(eval_dir, name)) > 0, name
  with open(os.path.join(eval_dir, report.REPORT_FILE)) as f:
    assert '| 2-RF + distill | Euler 1 |' in f.read()


def labels_of_scenes(scenes):
  return {k: np.array([shapes.label_names(k).index(s.labels()[k]) for s in scenes])
          for k in shapes.LABEL_KEYS}


ONE = shapes.Scene((shapes.Shape('circle', 'red', 'small', 'top left'),))
TWO = shapes.Scene((shapes.Shape('square', 'blue', 'large', 'left'),
                    shapes.Shape('cross', 'white', 'small', 'right')), 'left of')


def test_cell_targets_place_each_shape_in_its_cell():
  targets = se.cell_targets(labels_of_scenes([ONE, TWO]))
  assert targets['shape'][0, 0] == shapes.SHAPES.index('circle')
  assert (targets['shape'][0, 1:] == se.EMPTY).all()
  assert targets['shape'][1, 3] == shapes.SHAPES.index('square')
  assert targets['colour'][1, 5] == shapes.COLOURS.index('white')
  assert targets['size'][1, 3] == shapes.SIZES.index('large')
  assert (targets['shape'][1] != se.EMPTY).sum() == 2


def test_perfect_reading_scores_one_and_a_wrong_colour_is_counted():
  cells = se.cell_targets(labels_of_scenes([ONE, TWO]))
  assert se.attribute_accuracy(cells, labels_of_scenes([ONE, TWO])) == {
      k: 1.0 for k in se.ACCURACY_KEYS}
  assert se.prompt_fidelity([ONE, TWO], cells) == {'fidelity': 1.0, 'count_fidelity': 1.0}
  cells['colour'][1, 5] = shapes.COLOURS.index('red')
  assert se.attribute_accuracy(cells, labels_of_scenes([ONE, TWO]))['colour'] == 2 / 3
  assert se.prompt_fidelity([ONE, TWO], cells)['fidelity'] == 0.5


def test_two_shapes_match_in_any_cells_that_keep_the_relation():
  square, cross = ('square', 'blue', 'large'), ('cross', 'white', 'small')
  assert se.matches_prompt(TWO, {6: cross, 0: square}) is False  # square above, not left of
  assert se.matches_prompt(TWO, {6: square, 8: cross})  # other cells, still left of
  assert se.matches_prompt(TWO, {8: square, 6: cross}) is False  # right of
  assert se.matches_prompt(TWO, {6: square}) is False
  assert se.matches_prompt(ONE, {0: ('circle', 'red', 'small')})
  assert se.matches_prompt(ONE, {1: ('circle', 'red', 'small')}) is False


def test_cells_are_cut_in_position_order():
  image = np.zeros((1, 24, 24, 3), np.float32)
  image[0, 8:16, 16:24] = 1.0  # the cell 'right'
  cells = np.asarray(se.to_cells(image))
  assert cells.shape == (9, 8, 8, 3)
  assert [int(c.max()) for c in cells] == [int(p == 'right') for p in shapes.POSITIONS]


def test_models_without_settings_or_params_fail_before_compute(tmp_path):
  config = shapes_config.get_config('quick').eval
  with pytest.raises(FileNotFoundError, match="run stage 'rf' first"):
    evaluate.check_models(config, str(tmp_path))
  config.models = ('rf', 'student')
  with pytest.raises(ValueError, match="eval.models names 'student' but eval.steps"):
    evaluate.check_models(config, str(tmp_path))
