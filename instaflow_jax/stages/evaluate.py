"""Stage 'eval': the paper's comparison on our models, in one report with pictures.

For each trained model of the workdir (`eval.models`: 1-RF, 2-RF, the distilled student;
or a diffusers folder given in `eval.paths`, e.g. the released InstaFlow-0.9B)
and each solver (Euler with each of `eval.steps[model]` steps; adaptive Dopri5 for the
models in `eval.dopri5`), images are generated for the first `num_prompts` captions of the
held-out split from fixed noise, and measured against the real held-out images:

- fd: the Frechet distance between generated and real images in the evaluator's
  feature space (the floor: real held-out vs real training images);
- fidelity: the fraction of images that show what their prompt says, as the evaluator
  reads them, with each attribute's own fraction and the fraction among the prompts that
  name one shape and among those that name two (captioned shapes only);
- straightness of the Euler trajectories, the mean NFE of Dopri5, and the wall time per
  image (compilation excluded and reported apart);
- the machine (formulations.description(): the backend, its device or CPU model, and on a
  CPU whether the C++ kernels run), since the times are its and a model trained on another
  CPU is another model.

`eval.evaluator='inception'` measures photographs as the paper does (configs/coco_eval.py):
FD in pytorch-fid's Inception features (its weight file, `eval.inception_path`) and the
CLIP score (`eval.clip_path`, a CLIP model folder) instead of fidelity.
The evaluator of captioned shapes is a small classifier (evaluation/shapes_evaluator.py)
trained here once on the training split and cached in eval/evaluator/; its accuracy on
real held-out images is part of the report. Writes eval/metrics.json, eval/report.md and
PNGs: FD vs steps, FD vs seconds per image, and one grid of the same prompts and noise
across models at one step and the teacher at its most steps.

With `data.eval_prompts_file` the prompts are that file's first `num_prompts` lines and
there are no real images (a user who reflows Stable Diffusion has prompts only): no FD,
no floor, no real row in the grid; the CLIP score (evaluator 'inception' with
`eval.clip_path`), straightness, NFE and times are measured as above. The shapes evaluator
needs the dataset's scene labels and is refused then.
"""
import dataclasses
import functools
import json
import os
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from instaflow_jax import checkpoint
from instaflow_jax import images as image_io
from instaflow_jax import pipeline as pipeline_lib
from instaflow_jax import sampling
from instaflow_jax import workdir as workdir_lib
from instaflow_jax.convert import diffusers as diffusers_io
from instaflow_jax.convert import inception_weights
from instaflow_jax.data import input as input_lib
from instaflow_jax.data import shapes
from instaflow_jax.evaluation import clip_score
from instaflow_jax.evaluation import frechet
from instaflow_jax.evaluation import report
from instaflow_jax.evaluation import shapes_evaluator
from instaflow_jax.flow import samplers
from instaflow_jax.models import formulations
from instaflow_jax.stages import common

_NOISE_STREAM = 0x6576616c  # 'eval': the held-out noise, apart from other uses of the seed
EVALUATOR_DIR = 'evaluator'


def real_examples(config: ml_collections.ConfigDict, split: str, count: int):
  """(images float [N, S, S, 3] in [0, 1], captions, examples) of the first `count`."""
  data_config = input_lib.input_config(config.data, split)
  source = input_lib.open_source(data_config)
  if count > len(source):
    raise ValueError(f'eval: {count} examples asked of {input_lib.describe(data_config)}, '
                     f'which has {len(source)}; lower eval.num_prompts')
  examples = [source[i] for i in range(count)]
  images = np.stack([input_lib.model_image(np.asarray(e[data_config.image_key]),
                                           config.data.image_size) for e in examples])
  captions = [input_lib.captions_of(e, data_config.caption_key)[0] for e in examples]
  return image_io.to_unit_range(images), captions, examples


@dataclasses.dataclass(frozen=True)
class HeldOut:
  """The prompts eval generates from, with the real images (float [N, S, S, 3] in [0, 1])
  and the dataset examples they come with; both None when the prompts come from a file."""
  captions: list
  real: Optional[np.ndarray] = None
  examples: Optional[list] = None


def file_prompts(config: ml_collections.ConfigDict) -> list:
  """The first eval.num_prompts prompts of data.eval_prompts_file, refused when the file has
  fewer or the evaluator needs what a prompts file lacks."""
  path = common.prompts_file(config, 'eval_prompts_file')
  if config.eval.evaluator == 'shapes':
    raise ValueError(f"eval.evaluator 'shapes' needs the dataset's scene labels, which the "
                     f"prompts file {path} lacks; set eval.evaluator='inception' (CLIP score, "
                     "no FD) or data.eval_prompts_file=''")
  prompts = input_lib.read_prompts(path)
  if len(prompts) < config.eval.num_prompts:
    raise ValueError(f'eval: {config.eval.num_prompts} prompts asked of prompts file {path}, '
                     f'which has {len(prompts)}; lower eval.num_prompts')
  return prompts[:config.eval.num_prompts]


def check_held_out(config: ml_collections.ConfigDict) -> None:
  """Checks a prompts file for eval before the run's first stage, not after hours of work."""
  if common.prompts_file(config, 'eval_prompts_file'):
    file_prompts(config)


def held_out_set(config: ml_collections.ConfigDict) -> HeldOut:
  """data.eval_prompts_file's prompts alone, or the held-out split's captions with their
  images and examples."""
  if common.prompts_file(config, 'eval_prompts_file'):
    return HeldOut(file_prompts(config))
  real, captions, examples = real_examples(config, config.data.eval_split,
                                           config.eval.num_prompts)
  return HeldOut(captions, real, examples)


def labels_of(examples) -> dict:
  return {k: np.array([e[k] for e in examples]) for k in shapes.LABEL_KEYS}


def cached_evaluator(stage_dir: str, config: ml_collections.ConfigDict, seed: int):
  """The shapes classifier, trained on the training split once and kept in eval/evaluator."""
  path = os.path.join(stage_dir, EVALUATOR_DIR)
  abstract = jax.eval_shape(lambda: shapes_evaluator.ShapesClassifier().init(
      jax.random.key(0), jnp.zeros((1, config.data.image_size, config.data.image_size, 3))
  )['params'])
  if os.path.isdir(path):
    return shapes_evaluator.Evaluator(checkpoint.load_params(path, abstract, what='evaluator'))
  images, _, examples = real_examples(config, config.data.train_split,
                                      config.eval.evaluator_examples)
  evaluator = shapes_evaluator.train_evaluator(images, labels_of(examples),
                                               steps=config.eval.evaluator_steps, seed=seed)
  checkpoint.save_params(path, evaluator.params)
  return evaluator


def feature_statistics(features: np.ndarray):
  """(mean, covariance) in float64, as FD takes them."""
  statistics = frechet.FeatureStatistics()
  statistics.update(features)
  return statistics.statistics()


def model_solvers(eval_config, model: str) -> list:
  solvers = [samplers.Solver('euler', int(n)) for n in eval_config.steps[model]]
  if model in eval_config.dopri5:
    solvers.append(samplers.Solver('dopri5', rtol=eval_config.rtol, atol=eval_config.atol))
  return solvers


def solver_name(solver: samplers.Solver) -> str:
  return str(solver.num_steps) if solver.kind == 'euler' else 'dopri5'


def check_models(eval_config, workdir: str) -> None:
  """Every model has its settings and its params: checked before any compute."""
  for model in eval_config.models:
    for section in ('steps', 'guidance', 'labels'):
      if model not in eval_config[section]:
        raise ValueError(f'eval.models names {model!r} but eval.{section} has no entry for it')
  for model in eval_config.models:
    folder = eval_config.get('paths', {}).get(model)
    if folder:
      diffusers_io.read_model_index(folder)
    else:
      workdir_lib.stage_params_path(workdir, model, f'eval.models ({model})')


def model_pipeline(eval_config, workdir: str, model: str) -> pipeline_lib.Pipeline:
  """A stage of this workdir as that stage built it (the student may be a stacked U-Net),
  or the diffusers folder eval.paths gives for `model` (e.g. the released InstaFlow-0.9B)."""
  folder = eval_config.get('paths', {}).get(model)
  if folder:
    # eval solves flows (Euler, Dopri5), whatever class name the folder carries
    return pipeline_lib.Pipeline.from_diffusers(folder, kind='flow')
  return pipeline_lib.Pipeline.from_checkpoint(
      workdir_lib.find_trained_params(workdir, stage=model))


def generate_all(pipe, params, captions, noise, guidance: float, solver, batch_size: int):
  """Images of every caption, with the mean NFE and straightness of the solves and the
  wall time per image (the first call compiles; it is timed apart)."""
  uncond = lambda count: pipe.tokenize([''] * count) if guidance > 1.0 else None

  def run(start, stop):
    images, solution = sampling.sample_images(
        pipe.modules, params, pipe.tokenize(captions[start:stop]), uncond(stop - start),
        noise[start:stop], jnp.float32(guidance), solver)
    return np.asarray(images), solution

  batches = [(start, min(start + batch_size, len(captions)))
             for start in range(0, len(captions), batch_size)]
  outputs, timing = sampling.timed_batches([functools.partial(run, *batch) for batch in batches],
                                           [stop - start for start, stop in batches])
  return np.concatenate([images for images, _ in outputs]), {
      'nfe': float(np.mean([int(s.nfe) for _, s in outputs])),
      'straightness': float(np.mean(np.concatenate([np.asarray(s.straightness)
                                                    for _, s in outputs]))),
      'seconds_per_image': timing.per_image_s,
      'compile_seconds': timing.compile_s}


class ShapesJudge:
  """Captioned shapes: FD in the shapes classifier's feature space, and prompt fidelity."""

  def __init__(self, stage_dir: str, config, examples):
    self.evaluator = cached_evaluator(stage_dir, config, config.seed)
    self.evaluator_steps = config.eval.evaluator_steps
    self.labels = labels_of(examples)
    self.scenes = [shapes.Scene.from_labels({k: v[i] for k, v in self.labels.items()})
                   for i in range(len(examples))]

  def measure(self, images):
    """(features, prompt metrics) of images made from (or of) the held-out prompts."""
    features, cells = self.evaluator.predict(images)
    return features, shapes_evaluator.prompt_fidelity(self.scenes, cells)

  def about_real(self, real) -> dict:
    _, cells = self.evaluator.predict(real)
    real_fidelity = shapes_evaluator.prompt_fidelity(self.scenes, cells)['fidelity']
    warning = shapes_evaluator.misreading_warning(real_fidelity, self.evaluator_steps)
    if warning:
      logging.warning(warning)
    return {'evaluator_accuracy': shapes_evaluator.attribute_accuracy(cells, self.labels),
            'real_fidelity': real_fidelity}


class InceptionJudge:
  """Photographs (the paper's COCO protocol): FD in pytorch-fid's Inception pool features,
  and the CLIP score when `eval.clip_path` names a CLIP model folder."""

  def __init__(self, eval_config, captions, measures_fd: bool = True):
    # Without real images there is no FD, and no need of the Inception weights.
    self._features = inception_features(eval_config.inception_path) if measures_fd else None
    self.batch_size = eval_config.batch_size
    self.captions = captions
    self.clip = clip_score.TransformersClip(eval_config.clip_path) if eval_config.clip_path else None

  def measure(self, images):
    """(Inception features, None without FD; the CLIP score when there is a CLIP model)."""
    features = None if self._features is None else np.concatenate(
        [np.asarray(self._features(images[i:i + self.batch_size]))
         for i in range(0, len(images), self.batch_size)])
    if self.clip is None:
      return features, {}
    return features, {'clip_score': clip_score.clip_score(images, self.captions, self.clip)}

  def about_real(self, real) -> dict:
    return {'real_clip_score': self.measure(real)[1]['clip_score']} if self.clip else {}


def inception_features(path: str):
  """images -> pytorch-fid's Inception pool features, jitted."""
  module, variables = inception_weights.load_fid_inception(path)
  return formulations.jit(lambda images: module.apply(variables, images))


def make_judge(config, stage_dir: str, held_out: HeldOut):
  if config.eval.evaluator == 'shapes':
    return ShapesJudge(stage_dir, config, held_out.examples)
  if config.eval.evaluator == 'inception':
    return InceptionJudge(config.eval, held_out.captions, measures_fd=held_out.real is not None)
  raise ValueError(f"eval.evaluator {config.eval.evaluator!r} is unknown; use 'shapes' "
                   "(captioned shapes) or 'inception' (photographs, pytorch-fid's weights)")


def measure_real(config, judge, real: Optional[np.ndarray]):
  """(FD statistics of the real held-out images, their metrics: the FD floor against as many
  real reference images, and the judge's own); (None, {}) without real images."""
  if real is None:
    return None, {}
  real_stats = feature_statistics(judge.measure(real)[0])
  reference, _, _ = real_examples(config, config.eval.reference_split, config.eval.num_prompts)
  floor = frechet.frechet_distance(*real_stats, *feature_statistics(judge.measure(reference)[0]))
  return real_stats, {'fd_floor': floor, **judge.about_real(real)}


def prompts_source(config) -> dict:
  """What the report names as the prompts' source when it is a file."""
  path = common.prompts_file(config, 'eval_prompts_file')
  return {'prompts_file': path} if path else {}


def one_step_summary(metrics: dict) -> dict:
  """The stage's summary: each model's FD at one step, or its CLIP score without FD."""
  key = 'fd' if report.measures_fd(metrics) else 'clip_score'
  return {f'{key}_one_step': {m: r['1'][key] for m, r in metrics['models'].items()
                              if key in r.get('1', {})}}


def run_eval(config: ml_collections.ConfigDict, stage_dir: str) -> Mapping[str, Any]:
  eval_config = config.eval
  workdir = os.path.dirname(stage_dir)
  check_models(eval_config, workdir)
  held_out = held_out_set(config)
  captions = held_out.captions
  workdir_lib.write_stage_config(stage_dir, config)
  judge = make_judge(config, stage_dir, held_out)
  real_stats, real_metrics = measure_real(config, judge, held_out.real)
  metrics = {'num_prompts': len(captions), **prompts_source(config), **real_metrics,
             'machine': formulations.description(), 'models': {}, 'straightness': {}}
  noise_key = jax.random.fold_in(jax.random.key(config.seed), _NOISE_STREAM)
  grid_rows = []
  for model in eval_config.models:
    pipe = model_pipeline(eval_config, workdir, model)
    noise = jax.random.normal(noise_key, (len(captions),) + pipe.latent_shape, jnp.float32)
    results = {}
    for solver in model_solvers(eval_config, model):
      images, measured = generate_all(pipe, pipe.params, captions, noise,
                                      eval_config.guidance[model], solver, eval_config.batch_size)
      features, prompt_metrics = judge.measure(images)
      if real_stats is not None:
        measured['fd'] = frechet.frechet_distance(*feature_statistics(features), *real_stats)
      measured.update(prompt_metrics)
      if solver.kind != 'euler':
        del measured['straightness']
      results[solver_name(solver)] = measured
      logging.info('eval: %s, %s: %s', model, report.solver_label(solver), json.dumps(measured))
      grid_rows += report.grid_rows_of(eval_config, model, solver, images)
    metrics['models'][model] = results
    euler = [int(n) for n in eval_config.steps[model]]
    metrics['straightness'][model] = results[str(max(euler))]['straightness']
  report.write(stage_dir, eval_config, metrics, grid_rows, held_out.real)
  return one_step_summary(metrics)
