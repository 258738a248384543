r"""Invert-then-generate on a run of the embedded default: how well each flow maps a real
held-out image to its noise (Pipeline.invert, N Euler steps backwards) and back (N steps
forwards), for the 1-RF (stage rf) and the 2-RF (stage reflow), at 1, 2, 4 and 8 steps.

  .venv/bin/python -m benchmarks.inversion --workdir=runs/shapes [--count=64] \
      [--picture=docs/shapes_inversion.png]

Both flows invert and generate with their captions and no guidance. The error is the RMSE
of the reconstruction in pixels in [0, 1], over the first `count` images of the held-out
split. Prints a Markdown table; the picture's rows are the real images and each flow's
reconstructions.
"""
import argparse

import ml_collections
import numpy as np

from instaflow_jax import images as image_io
from instaflow_jax import pipeline as pipeline_lib
from instaflow_jax import workdir as workdir_lib
from instaflow_jax.stages import evaluate

STEPS = (1, 2, 4, 8)
FLOWS = {'rf': '1-RF', 'reflow': '2-RF'}
PICTURE_IMAGES = 8


def reconstruction(pipe, images, captions, steps: int) -> np.ndarray:
  noise = pipe.invert(images, captions, num_inference_steps=steps)
  return pipe.generate(captions, num_inference_steps=steps, latents=noise)


def rmse(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.sqrt(np.mean(np.square(a - b))))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--count', type=int, default=64)
  parser.add_argument('--picture', default='')
  args = parser.parse_args()
  config = workdir_lib.find_trained_params(args.workdir, stage='rf').stage_config()
  images, captions, _ = evaluate.real_examples(
      ml_collections.ConfigDict(config), config['data']['eval_split'], args.count)
  errors, rows = {}, [('real', images[:PICTURE_IMAGES])]
  for stage, label in FLOWS.items():
    pipe = pipeline_lib.Pipeline.from_checkpoint(
        workdir_lib.find_trained_params(args.workdir, stage=stage))
    for steps in STEPS:
      again = reconstruction(pipe, images, captions, steps)
      errors[stage, steps] = rmse(again, images)
      rows.append((f'{label}, {steps} step{"s" * (steps > 1)}', again[:PICTURE_IMAGES]))
  print('| flow | ' + ' | '.join(f'{n} step{"s" * (n > 1)}' for n in STEPS) + ' |')
  print('|---|' + '---:|' * len(STEPS))
  for stage, label in FLOWS.items():
    print(f'| {label} | ' + ' | '.join(f'{errors[stage, n]:.4f}' for n in STEPS) + ' |')
  print('| 2-RF / 1-RF | ' + ' | '.join(f'{errors["reflow", n] / errors["rf", n]:.2f}'
                                        for n in STEPS) + ' |')
  if args.picture:
    image_io.save_png(args.picture, image_io.labelled_rows(rows, upscale=2, label_width=90))
    print(f'wrote {args.picture}')


if __name__ == '__main__':
  main()
