r"""Text to images from a diffusers folder or one of our training runs.

  python -m instaflow_jax.generate --model=PATH --prompt="a red circle" [--prompt=...] \
      [--prompts_file=FILE] [--steps=1] [--guidance=0] [--seed=0] [--batch_size=8] \
      [--stage=NAME] [--params=ema|raw] --out=DIR

--model: a diffusers folder (model_index.json), or of ours a workdir (its latest finished
stage of distill > reflow > rf, or --stage), a stage directory, its params/, or one of its
checkpoints/STEP directories (EMA params, or the raw ones with --params=raw).
--prompts_file: one prompt per line (blank lines are skipped), after the --prompt ones.

Writes DIR/NNNN_<prompt>.png per prompt and DIR/grid.png, all at once when generation has
succeeded (nothing is written on failure). Image i starts from the noise of image i of
Pipeline.generate(all prompts, seed=SEED), whatever --batch_size.
Bad input (a missing file, a model path of no known kind, an unwritable --out) stops the
run before any compute with one line `error: ...` and exit status 1 (run_command and
run_main give `python -m instaflow_jax.convert` the same behaviour).
"""
import contextlib
import dataclasses
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Iterator, List, Sequence, Union

import numpy as np
from absl import app
from absl import flags
from absl import logging

from instaflow_jax import huge_pages
from instaflow_jax import images as image_io
from instaflow_jax import pipeline as pipeline_lib
from instaflow_jax.convert import diffusers as diffusers_io

# Our own flag set, parsed by main: several entry points can share a process (tests).
FLAGS = flags.FlagValues()
_MODEL = flags.DEFINE_string('model', None, 'A diffusers folder, or a workdir, stage '
                             'directory, params/ or checkpoints/STEP directory of ours.',
                             flag_values=FLAGS)
_PROMPT = flags.DEFINE_multi_string('prompt', [], 'A prompt (repeat for several).',
                                    flag_values=FLAGS)
_PROMPTS_FILE = flags.DEFINE_string('prompts_file', None, 'A text file, one prompt per line.',
                                    flag_values=FLAGS)
_STEPS = flags.DEFINE_integer('steps', 1, 'Euler steps.', lower_bound=1, flag_values=FLAGS)
_GUIDANCE = flags.DEFINE_float('guidance', 0.0, 'Classifier-free guidance w (used when > 1).',
                               flag_values=FLAGS)
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the initial noise.', flag_values=FLAGS)
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 8, 'Images per compiled call.', lower_bound=1,
                                   flag_values=FLAGS)
_OUT = flags.DEFINE_string('out', None, 'Output directory.', flag_values=FLAGS)
_STAGE = flags.DEFINE_string('stage', '', 'The stage of a workdir (default: the latest '
                             'finished one).', flag_values=FLAGS)
_PARAMS = flags.DEFINE_enum('params', 'ema', ['ema', 'raw'], 'Of a checkpoints/STEP '
                            'directory: the EMA or the raw params.', flag_values=FLAGS)
flags.mark_flags_as_required(['model', 'out'], flag_values=FLAGS)

GRID = 'grid.png'
ModelSource = Union[str, pipeline_lib.TrainedParams]  # a diffusers folder, or ours


@dataclasses.dataclass(frozen=True)
class Timing:
  compile_s: float    # the first call minus a compiled one
  per_image_s: float  # compiled calls, per requested image (padding included in the cost)


def read_prompts(prompts: Sequence[str], prompts_file: str = None) -> List[str]:
  prompts = list(prompts)
  if prompts_file:
    if not os.path.isfile(prompts_file):
      raise OSError(f'--prompts_file={prompts_file}: file not found')
    with open(prompts_file, encoding='utf-8') as f:
      prompts += [line.strip() for line in f if line.strip()]
  if not prompts:
    raise ValueError('no prompts: give --prompt or --prompts_file')
  return prompts


def find_model(path: str, stage: str = '', params: str = 'ema') -> ModelSource:
  """What `path` holds, checked without loading weights."""
  if os.path.isfile(os.path.join(path, diffusers_io.MODEL_INDEX)):
    if stage or params != 'ema':
      raise ValueError(f'{path} is a diffusers folder: --stage and --params apply to our '
                       'checkpoints only')
    return path
  trained = pipeline_lib.find_trained_params(path, stage, params)
  trained.model_config()  # a missing or broken config.json stops here, before any compute
  return trained


def load_pipeline(source: ModelSource) -> pipeline_lib.Pipeline:
  if isinstance(source, str):
    return pipeline_lib.Pipeline.from_diffusers(source)
  return pipeline_lib.Pipeline.from_checkpoint(source)


def padded_batches(prompts: Sequence[str], latents: np.ndarray, batch_size: int) -> Iterator:
  """(prompts, latents, count) of batch_size each; the last is padded with copies of its
  last entry so that every call has one shape (one compiled program)."""
  for start in range(0, len(prompts), batch_size):
    batch_prompts = list(prompts[start:start + batch_size])
    batch_latents = latents[start:start + batch_size]
    pad = batch_size - len(batch_prompts)
    yield (batch_prompts + batch_prompts[-1:] * pad,
           np.concatenate([batch_latents, np.repeat(batch_latents[-1:], pad, axis=0)]),
           len(batch_prompts))


def generate_images(pipe: pipeline_lib.Pipeline, prompts: Sequence[str], *, steps: int,
                    guidance: float, seed: int, batch_size: int):
  """(images [N, H, W, 3] in [0, 1], Timing). The noise of all N images is drawn at once,
  as Pipeline.generate draws it, then cut into batches."""
  size = pipe.default_size
  latents = np.asarray(pipe.initial_latents(len(prompts), size, size, seed))
  batches = list(padded_batches(prompts, latents, min(batch_size, len(prompts))))

  def run(batch_prompts, batch_latents):
    return pipe.generate(batch_prompts, num_inference_steps=steps, guidance_scale=guidance,
                         latents=batch_latents)

  start = time.perf_counter()
  run(*batches[0][:2])  # compiles; run again below, so that the generation is timed alone
  first_call_s = time.perf_counter() - start
  outputs = []
  start = time.perf_counter()
  for index, (batch_prompts, batch_latents, count) in enumerate(batches):
    outputs.append(run(batch_prompts, batch_latents)[:count])
    print(f'batch {index + 1}/{len(batches)}: {sum(map(len, outputs))} images', flush=True)
  generate_s = time.perf_counter() - start
  timing = Timing(compile_s=max(first_call_s - generate_s / len(batches), 0.0),
                  per_image_s=generate_s / len(prompts))
  return np.concatenate(outputs), timing


def file_name(index: int, prompt: str, max_chars: int = 48) -> str:
  """NNNN_<prompt as lowercase words joined by '-'>.png, safe on any file system."""
  slug = re.sub(r'[^a-z0-9]+', '-', prompt.lower()).strip('-')[:max_chars].rstrip('-')
  return f'{index:04d}_{slug or "prompt"}.png'


def write_images(folder: str, prompts: Sequence[str], images: np.ndarray) -> None:
  for index, (prompt, image) in enumerate(zip(prompts, images)):
    image_io.save_png(os.path.join(folder, file_name(index, prompt)), image)
  image_io.save_png(os.path.join(folder, GRID), image_io.make_grid(images))


@contextlib.contextmanager
def staged_output(out: str):
  """A staging directory inside `out` (created now, which checks that `out` is writable)
  whose files move into `out` only when the block succeeds."""
  created = not os.path.isdir(out)
  try:
    os.makedirs(out, exist_ok=True)
    staging = tempfile.mkdtemp(prefix='.generate-', dir=out)
  except OSError as e:
    raise OSError(f'--out={out} is not writable ({e.strerror or e})') from None
  try:
    yield staging
    for name in sorted(os.listdir(staging)):
      os.replace(os.path.join(staging, name), os.path.join(out, name))
  except BaseException:
    shutil.rmtree(staging)
    if created:
      os.rmdir(out)
    raise
  os.rmdir(staging)


def one_line(error: Exception) -> str:
  """An error's message on one line (absl joins several flag errors with newlines)."""
  return '; '.join(line.strip() for line in str(error).splitlines() if line.strip())


def run_command(flag_values: flags.FlagValues, argv: Sequence[str], command) -> None:
  """Parses `argv` (argv[0] is the program) into `flag_values` and runs command(); bad
  input ends the process with one line `error: ...` and exit status 1."""
  try:
    if flag_values.is_parsed():  # run again in one process (tests): start from the defaults
      flag_values.unparse_flags()
    extra = flag_values(argv)[1:]
    if extra:
      raise ValueError(f'unexpected arguments: {extra}')
    command()
  except (flags.Error, *pipeline_lib.LOAD_ERRORS) as e:
    sys.exit(f'error: {one_line(e)}')


def _parse_absl_flags(argv: Sequence[str]) -> Sequence[str]:
  """absl's own flags (--help, --verbosity); the rest is left to main."""
  rest = flags.FLAGS(argv, known_only=True)
  if flags.FLAGS['verbosity'].using_default_value:
    # Libraries' INFO lines (dozens per Orbax save) would drown ours; --verbosity=0 shows them.
    flags.FLAGS.verbosity = logging.WARNING
  return rest


def run_main(main) -> None:
  """app.run for a command line whose flags are its own FlagValues, parsed by `main`."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TensorFlow comes with tfds and clu
  app.run(main, flags_parser=_parse_absl_flags)


def generate_from_flags() -> None:
  prompts = read_prompts(_PROMPT.value, _PROMPTS_FILE.value)
  source = find_model(_MODEL.value, _STAGE.value, _PARAMS.value)
  with staged_output(_OUT.value) as staging:
    pipe = load_pipeline(source)
    images, timing = generate_images(pipe, prompts, steps=_STEPS.value,
                                     guidance=_GUIDANCE.value, seed=_SEED.value,
                                     batch_size=_BATCH_SIZE.value)
    write_images(staging, prompts, images)
  print(f'wrote {len(prompts)} images and {GRID} to {_OUT.value}')
  print(f'compile: {timing.compile_s:.2f} s; generation: {1000 * timing.per_image_s:.1f} '
        f'ms/image ({len(prompts)} images, batches of {min(_BATCH_SIZE.value, len(prompts))})')


def main(argv: Sequence[str]) -> None:
  run_command(FLAGS, argv, generate_from_flags)


if __name__ == '__main__':
  huge_pages.restart_with_huge_pages()
  run_main(main)
