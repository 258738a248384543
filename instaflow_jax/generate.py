r"""Text to images from a diffusers folder or one of our training runs.

  python -m instaflow_jax.generate --model=PATH --prompt="a red circle" [--prompt=...] \
      [--prompts_file=FILE] [--steps=1] [--guidance=0] [--seed=0] [--batch_size=8] \
      [--sampler=NAME] [--stage=NAME] [--params=ema|raw] [--lora=FILE --lora_scale=1] \
      [--init_image=FILE --strength=0.6] --out=DIR

--model: a diffusers folder (model_index.json), or of ours a workdir (its latest finished
stage of distill > reflow > rf, or --stage), a stage directory, its params/, or one of its
checkpoints/STEP directories (EMA params, or the raw ones with --params=raw).
--prompts_file: one prompt per line (blank lines are skipped), after the --prompt ones.
--sampler: 'euler' for a flow; 'dpm_solver++' or 'ddim' for a diffusion model (a folder
whose model_index.json names StableDiffusionPipeline); default 'euler' for a flow,
'dpm_solver++' for a diffusion model.
--lora: a LoRA .safetensors file (or a folder holding pytorch_lora_weights.safetensors) in
diffusers' or kohya's key style, merged into the U-Net (and the text encoder where it adapts
it) at --lora_scale.
--init_image: image to image (a flow): every prompt starts from this image (resized to the
model's size) at --strength (1: its noise alone; near 0: the image kept), along the flow's
path, with --steps steps from s = 1 - strength to 1.

Writes DIR/NNNN_<prompt>.png per prompt and DIR/grid.png, all at once when generation has
succeeded (nothing is written on failure). Image i starts from the noise of image i of
Pipeline.generate(all prompts, seed=SEED), whatever --batch_size.
Bad input (a missing file, a model path of no known kind, a --sampler that does not fit
the model, an unwritable --out, an --init_image that is no image, a --lora whose layers
do not fit the model) stops the run with one line `error: ...` and exit status 1 (cli.py),
before any compute but the LoRA's check, which reads the model's weights first.
"""
import dataclasses
import functools
import os
import re
from typing import Iterator, List, Sequence

import numpy as np
from absl import flags

from instaflow_jax import cli
from instaflow_jax import huge_pages
from instaflow_jax import images as image_io
from instaflow_jax import pipeline as pipeline_lib
from instaflow_jax import sampling

@dataclasses.dataclass(frozen=True)
class ModelFlags:
  """The flags that name a model (--model, --stage, --params) and a LoRA merged into it
  (--lora, --lora_scale), shared by the commands that generate."""
  model: flags.FlagHolder
  stage: flags.FlagHolder
  params: flags.FlagHolder
  lora: flags.FlagHolder
  lora_scale: flags.FlagHolder

  @classmethod
  def define(cls, flag_values: flags.FlagValues) -> 'ModelFlags':
    return cls(
        model=flags.DEFINE_string('model', None, 'A diffusers folder, or a workdir, stage '
                                  'directory, params/ or checkpoints/STEP directory of ours.',
                                  flag_values=flag_values),
        stage=flags.DEFINE_string('stage', '', 'The stage of a workdir (default: the latest '
                                  'finished one).', flag_values=flag_values),
        params=flags.DEFINE_enum('params', 'ema', ['ema', 'raw'], 'Of a checkpoints/STEP '
                                 'directory: the EMA or the raw params.', flag_values=flag_values),
        lora=flags.DEFINE_string('lora', None, 'A LoRA file (diffusers or kohya keys) to merge.',
                                 flag_values=flag_values),
        lora_scale=flags.DEFINE_float('lora_scale', 1.0, 'The scale of the --lora deltas.',
                                      flag_values=flag_values))

  def source(self) -> pipeline_lib.ModelSource:
    """What --model names, checked without loading weights."""
    return pipeline_lib.find_model(self.model.value, self.stage.value, self.params.value)

  def load(self, source: pipeline_lib.ModelSource) -> pipeline_lib.Pipeline:
    """The pipeline of `source`, with --lora merged."""
    pipe = pipeline_lib.load_pipeline(source)
    return pipe.with_lora(self.lora.value, self.lora_scale.value) if self.lora.value else pipe


# Our own flag set, parsed by main: several entry points can share a process (tests).
FLAGS = flags.FlagValues()
_MODEL = ModelFlags.define(FLAGS)
_PROMPT = flags.DEFINE_multi_string('prompt', [], 'A prompt (repeat for several).',
                                    flag_values=FLAGS)
_PROMPTS_FILE = flags.DEFINE_string('prompts_file', None, 'A text file, one prompt per line.',
                                    flag_values=FLAGS)
_STEPS = flags.DEFINE_integer('steps', 1, 'Sampler steps (network evaluations).', lower_bound=1,
                              flag_values=FLAGS)
_SAMPLER = flags.DEFINE_enum('sampler', None, ['euler', 'dpm_solver++', 'ddim'], 'The ODE '
                             "solver (default: a flow's 'euler', a diffusion model's "
                             "'dpm_solver++').", flag_values=FLAGS)
_GUIDANCE = flags.DEFINE_float('guidance', 0.0, 'Classifier-free guidance w (used when > 1).',
                               flag_values=FLAGS)
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the initial noise.', flag_values=FLAGS)
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 8, 'Images per compiled call.', lower_bound=1,
                                   flag_values=FLAGS)
_OUT = flags.DEFINE_string('out', None, 'Output directory.', flag_values=FLAGS)
_INIT_IMAGE = flags.DEFINE_string('init_image', None, 'An image to start from (image to '
                                  'image, a flow).', flag_values=FLAGS)
_STRENGTH = flags.DEFINE_float('strength', 0.6, 'Of --init_image: how much of the flow is run '
                               'again, in (0, 1].', lower_bound=0.0, upper_bound=1.0,
                               flag_values=FLAGS)
flags.mark_flags_as_required(['model', 'out'], flag_values=FLAGS)

GRID = 'grid.png'


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
                    guidance: float, seed: int, batch_size: int, sampler: str = None,
                    init_image: np.ndarray = None, strength: float = 1.0):
  """(images [N, H, W, 3] in [0, 1], sampling.Timing). The noise of all N images is drawn
  at once, as Pipeline.generate draws it, then cut into batches. `sampler` as
  Pipeline.generate's (None: the model's default); `init_image` [H, W, 3] in [0, 1], with
  `strength`, the start of every image (Pipeline.generate's init_images)."""
  size = pipe.default_size
  latents = np.asarray(pipe.initial_latents(len(prompts), size, size, seed))
  batches = list(padded_batches(prompts, latents, min(batch_size, len(prompts))))

  def run(batch_prompts, batch_latents, count):
    init = {} if init_image is None else dict(
        init_images=np.repeat(init_image[None], len(batch_prompts), axis=0), strength=strength)
    return pipe.generate(batch_prompts, num_inference_steps=steps, guidance_scale=guidance,
                         latents=batch_latents, sampler=sampler, **init)[:count]

  def progress(index):
    done = sum(count for _, _, count in batches[:index + 1])
    print(f'batch {index + 1}/{len(batches)}: {done} images', flush=True)

  outputs, timing = sampling.timed_batches([functools.partial(run, *batch) for batch in batches],
                                           [len(batch[0]) for batch in batches], progress)
  return np.concatenate(outputs), timing


def file_name(index: int, prompt: str, max_chars: int = 48) -> str:
  """NNNN_<prompt as lowercase words joined by '-'>.png, safe on any file system."""
  slug = re.sub(r'[^a-z0-9]+', '-', prompt.lower()).strip('-')[:max_chars].rstrip('-')
  return f'{index:04d}_{slug or "prompt"}.png'


def write_images(folder: str, prompts: Sequence[str], images: np.ndarray) -> None:
  for index, (prompt, image) in enumerate(zip(prompts, images)):
    image_io.save_png(os.path.join(folder, file_name(index, prompt)), image)
  image_io.save_png(os.path.join(folder, GRID), image_io.make_grid(images))


def generate_from_flags() -> None:
  prompts = read_prompts(_PROMPT.value, _PROMPTS_FILE.value)
  source = _MODEL.source()
  kind = pipeline_lib.source_kind(source)
  sampler = pipeline_lib.sampler_of(kind, _SAMPLER.value)
  init_image = None
  if _INIT_IMAGE.value:
    init_image = image_io.read_image(_INIT_IMAGE.value)
    if kind != 'flow':
      raise ValueError(f"--init_image: image to image runs a flow's ODE; "
                       f'{_MODEL.model.value} is a {kind} model')
    if _STRENGTH.value == 0.0:
      raise ValueError('--strength=0 keeps the image as it is; give a strength in (0, 1]')
  with cli.staged_output(_OUT.value, into_existing=True) as staging:
    pipe = _MODEL.load(source)
    images, timing = generate_images(
        pipe, prompts, steps=_STEPS.value, guidance=_GUIDANCE.value, seed=_SEED.value,
        batch_size=_BATCH_SIZE.value, sampler=sampler, strength=_STRENGTH.value,
        init_image=None if init_image is None else image_io.resized_pixels(
            init_image, pipe.default_size))
    write_images(staging, prompts, images)
  print(f'wrote {len(prompts)} images and {GRID} to {_OUT.value}')
  print(f'compile: {timing.compile_s:.2f} s; generation: {1000 * timing.per_image_s:.1f} '
        f'ms/image ({len(prompts)} images, batches of {min(_BATCH_SIZE.value, len(prompts))})')


def main(argv: Sequence[str]) -> None:
  cli.run_command(FLAGS, argv, generate_from_flags)


if __name__ == '__main__':
  huge_pages.restart_with_huge_pages()
  cli.run_main(main)
