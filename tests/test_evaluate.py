"""The eval stage: the report of the quick chain, prompts-only eval (a prompts file, CLIP
score without FD), the shapes evaluator's logic, bad input."""
import json
import math
import os

import numpy as np
import pytest

from configs import shapes as shapes_config
from instaflow_jax import stages
from instaflow_jax.data import shapes
from instaflow_jax.evaluation import report
from instaflow_jax.evaluation import shapes_evaluator as se
from instaflow_jax.stages import evaluate
from tests import tiny_models

MEASURES = ('fd', 'fidelity', *(f'fidelity_{a}' for a in se.FIDELITY_ATTRIBUTES),
            *(f'fidelity_{kind}' for kind in se.FIDELITY_BY_COUNT.values()), 'nfe',
            'seconds_per_image', 'compile_seconds')


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
  assert metrics['machine'].startswith('cpu (') and metrics['machine'].endswith(
      ('; C++ kernels)', '; XLA formulations)'))
  with open(os.path.join(eval_dir, report.REPORT_FILE)) as f:
    text = f.read()
  assert '| 2-RF + distill | Euler 1 |' in text
  assert '| one shape | two shapes |' in text
  assert f"Measured on {metrics['machine']}." in text


def test_the_report_names_only_the_prompt_counts_the_held_out_set_has():
  measured = dict(nfe=1.0, fd=300.0, fidelity=0.5, fidelity_colour=0.75, fidelity_count=0.8,
                  fidelity_one_shape=0.5, straightness=0.0, seconds_per_image=0.01,
                  compile_seconds=1.0)
  metrics = dict(num_prompts=4, fd_floor=400.0, machine='cpu (test)', real_fidelity=1.0,
                 models={'distill': {'1': measured}}, straightness={'distill': 0.0})
  text = report.markdown(shapes_config.get_config('quick').eval, metrics)
  assert ('colour, count: the fraction that show that attribute as the prompt says; one '
          'shape: fidelity among the prompts that name one shape.') in text
  assert 'two shapes' not in text
  assert '| fidelity | colour | count | one shape | straightness |' in text


def test_the_plots_name_the_dopri5_star_only_where_a_model_has_one():
  euler = {'1': {'fd': 300.0}, '4': {'fd': 280.0}}
  assert report.plot_x_label('NFE', {'models': {'rf': euler, 'reflow': euler}}) == 'NFE'
  with_dopri5 = {'rf': euler, 'reflow': dict(euler, dopri5={'fd': 279.0})}
  assert report.plot_x_label('NFE', {'models': with_dopri5}) == 'NFE; star: Dopri5'


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
  assert se.prompt_fidelity([ONE, TWO], cells) == {
      'fidelity': 1.0, **{f'fidelity_{a}': 1.0 for a in se.FIDELITY_ATTRIBUTES},
      'fidelity_one_shape': 1.0, 'fidelity_two_shapes': 1.0}
  cells['colour'][1, 5] = shapes.COLOURS.index('red')
  assert se.attribute_accuracy(cells, labels_of_scenes([ONE, TWO]))['colour'] == 2 / 3
  fidelity = se.prompt_fidelity([ONE, TWO], cells)
  assert (fidelity['fidelity'], fidelity['fidelity_one_shape'],
          fidelity['fidelity_two_shapes']) == (0.5, 1.0, 0.0)


def test_fidelity_by_count_only_for_the_counts_the_prompts_have():
  cells = se.cell_targets(labels_of_scenes([ONE, ONE]))
  fidelity = se.prompt_fidelity([ONE, ONE], cells)
  assert fidelity['fidelity_one_shape'] == 1.0 and 'fidelity_two_shapes' not in fidelity


def test_two_shapes_match_in_any_cells_that_keep_the_relation():
  square, cross = ('square', 'blue', 'large'), ('cross', 'white', 'small')
  assert se.matches_prompt(TWO, {6: cross, 0: square}) is False  # square above, not left of
  assert se.matches_prompt(TWO, {6: square, 8: cross})  # other cells, still left of
  assert se.matches_prompt(TWO, {8: square, 6: cross}) is False  # right of
  assert se.matches_prompt(TWO, {6: square}) is False
  assert se.matches_prompt(ONE, {0: ('circle', 'red', 'small')})
  assert se.matches_prompt(ONE, {1: ('circle', 'red', 'small')}) is False


def test_each_attribute_is_judged_on_its_own():
  square, cross = ('square', 'blue', 'large'), ('cross', 'white', 'small')
  red_square = ('square', 'red', 'large')
  wrong_colour = se.attribute_matches(TWO, {3: red_square, 5: cross})
  assert wrong_colour == {'colour': False, 'shape': True, 'size': True, 'count': True,
                          'position': True}
  # Swapped cells: the square (the caption's first) is right of the cross, not left of it.
  assert se.attribute_matches(TWO, {3: cross, 5: square})['position'] is False
  assert se.attribute_matches(TWO, {3: cross, 5: square})['colour'] is True
  missing = se.attribute_matches(TWO, {3: square})
  assert not any(missing[a] for a in ('colour', 'shape', 'size', 'count', 'position'))
  assert se.attribute_matches(ONE, {0: ('circle', 'red', 'large')}) == {
      'colour': True, 'shape': True, 'size': False, 'count': True, 'position': True}
  assert se.attribute_matches(ONE, {4: ('circle', 'red', 'small')})['position'] is False


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


PROMPTS = ['a red circle', 'two blue squares', 'a green cross', 'a white square']
PROMPTS_ONLY_MEASURES = ('clip_score', 'straightness', 'nfe', 'seconds_per_image',
                         'compile_seconds')


@pytest.fixture(scope='module')
def flow_folder(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('flow'))
  tiny_models.write_tiny_pipeline(path)
  return path


def write_prompts(tmp_path, prompts) -> str:
  path = tmp_path / 'eval_prompts.txt'
  path.write_text('\n'.join(prompts) + '\n', encoding='utf-8')
  return str(path)


def prompts_only_config(tmp_path, flow_folder, prompts, evaluator='inception'):
  """configs/shapes.py:quick evaluating the tiny flow folder on a prompts file. The dataset
  folder and the Inception weights do not exist: eval must read neither."""
  config = shapes_config.get_config('quick')
  config.stages = ('eval',)
  config.data.data_dir = str(tmp_path / 'no_tensorflow_datasets')
  config.data.eval_prompts_file = write_prompts(tmp_path, prompts)
  config.eval.update(dict(models=('tiny',), labels=dict(tiny='tiny flow'), steps=dict(tiny=(1, 2)),
                          guidance=dict(tiny=1.0), dopri5=(), num_prompts=3, batch_size=2,
                          grid_prompts=2, evaluator=evaluator))
  config.eval.paths = dict(tiny=flow_folder)
  config.eval.inception_path = str(tmp_path / 'no_inception.pth')
  config.eval.clip_path = ''
  return config


@pytest.mark.slow  # compiles a U-Net's one- and two-step samplers
def test_prompts_only_eval_measures_clip_score_and_no_fd(tmp_path, flow_folder):
  config = prompts_only_config(tmp_path, flow_folder, PROMPTS)
  config.eval.clip_path = tiny_models.write_tiny_clip_model(str(tmp_path / 'clip'))
  eval_dir = str(tmp_path / 'work' / 'eval')
  summary = evaluate.run_eval(config, eval_dir)
  with open(os.path.join(eval_dir, report.METRICS_FILE)) as f:
    metrics = json.load(f)
  assert metrics['num_prompts'] == 3
  assert metrics['prompts_file'] == config.data.eval_prompts_file
  assert 'fd_floor' not in metrics and 'real_clip_score' not in metrics
  assert list(metrics['models']['tiny']) == ['1', '2']
  for name, measured in metrics['models']['tiny'].items():
    assert sorted(measured) == sorted(PROMPTS_ONLY_MEASURES), name
    assert all(math.isfinite(v) for v in measured.values()), (name, measured)
  assert metrics['models']['tiny']['2']['nfe'] == 2
  assert math.isfinite(metrics['straightness']['tiny'])
  assert summary == {'clip_score_one_step': {'tiny': metrics['models']['tiny']['1']['clip_score']}}
  with open(os.path.join(eval_dir, report.REPORT_FILE)) as f:
    text = f.read()
  assert 'FD was not measured: prompts only' in text
  assert '| model | solver | NFE | clip_score | straightness | s / image | compile s |' in text
  assert '| tiny flow | Euler 1 | 1.0 |' in text
  assert 'nan' not in text.lower() and 'FD vs' not in text
  assert os.path.getsize(os.path.join(eval_dir, report.GRID_FILE)) > 0
  for plot in (report.FD_VS_STEPS_FILE, report.FD_VS_SECONDS_FILE):
    assert not os.path.exists(os.path.join(eval_dir, plot))


def test_prompts_only_eval_takes_the_first_num_prompts(tmp_path, flow_folder):
  config = prompts_only_config(tmp_path, flow_folder, PROMPTS)
  held_out = evaluate.held_out_set(config)
  assert held_out == evaluate.HeldOut(PROMPTS[:3])  # no real images, no examples


@pytest.mark.parametrize('prompts, evaluator, error', [
    (PROMPTS[:2], 'inception',
     r'eval: 3 prompts asked of prompts file .*eval_prompts.txt, which has 2; lower '
     r'eval.num_prompts'),
    (PROMPTS, 'shapes',
     r"eval.evaluator 'shapes' needs the dataset's scene labels, which the prompts file "
     r".*eval_prompts.txt lacks"),
])
def test_prompts_only_eval_refuses_before_any_compute(tmp_path, flow_folder, prompts, evaluator,
                                                      error):
  config = prompts_only_config(tmp_path, flow_folder, prompts, evaluator)
  workdir = tmp_path / 'work'
  with pytest.raises(ValueError, match=error):
    stages.run_all(config, str(workdir))  # before the first stage of a chain
  assert not workdir.exists()
  with pytest.raises(ValueError, match=error):
    evaluate.run_eval(config, str(workdir / 'eval'))  # and when the stage starts
  assert not workdir.exists()


def test_an_evaluator_that_misreads_real_images_says_so_and_what_to_do():
  warning = se.misreading_warning(0.7825, steps=1000)
  assert warning == (
      "eval: the shapes evaluator reads only 78.2% of the real held-out images as their "
      "captions say, and the models' fidelities are read as low: train it longer "
      "(eval.evaluator_steps, now 1000) and delete WORKDIR/eval/evaluator")
  assert se.misreading_warning(se.MIN_REAL_FIDELITY, steps=1000) is None
  assert se.misreading_warning(0.98, steps=1000) is None
