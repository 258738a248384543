# ---
# jupyter:
#   colab:
#     provenance: []
#   jupytext:
#     notebook_metadata_filter: accelerator,colab,language_info
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
#   language_info:
#     name: python
# ---

# %% [markdown]
# # The InstaFlow recipe end to end, on a CPU
#
# `instaflow_jax` trains the whole recipe, which the released InstaFlow code does not ship:
# a rectified flow (stage `rf`), (noise, image) pairs from its ODE (`pairs`), the
# 2-rectified flow trained on those pairs (`reflow`), a one-step student distilled from it
# (`distill`), and an evaluation of all of them (`eval`). The embedded default needs no
# download: captioned coloured shapes generated locally, a small CLIP text encoder that
# stage `rf` trains from random weights, and pixel space instead of a VAE. `configs/shapes.py:quick` runs
# every stage, shrunk, in minutes on a CPU runtime; `configs/shapes.py` trains for real
# (see the README for times).
#
# `REPO` is a checkout of this repository (in Colab, clone or upload it first): the configs
# live there, and `instaflow_jax` is installed from it when missing. Running the recipe
# cell again continues where it stopped: stages already complete in `WORKDIR` are skipped,
# an interrupted one resumes from its last checkpoint.

# %% tags=["parameters"]
REPO = '.'                          # a checkout of this repository
CONFIG = 'configs/shapes.py:quick'  # relative to REPO
WORKDIR = 'runs/quick'              # relative to this notebook's directory
EXTRA_FLAGS = []                    # more overrides, e.g. ['--config.rf.steps=100']

# %%
# Colab starts without instaflow_jax; a machine set up with the repository's
# launch/install.sh has it already, and then nothing is installed.
import importlib
import importlib.util
import subprocess
import sys

INSTALL = importlib.util.find_spec('instaflow_jax') is None
if INSTALL:
  subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', REPO], check=True)
  importlib.invalidate_caches()  # so that this running kernel finds the new package
print('installed instaflow_jax from', REPO if INSTALL else 'nothing: it was installed already')

# %%
import os
import subprocess
import sys


def run_recipe(repo, config, workdir, extra_flags):
  """`python -m instaflow_jax.main` on the config, its log printed as it comes (a
  subprocess, so that its flags and its JAX state are its own)."""
  command = [sys.executable, '-m', 'instaflow_jax.main', f'--config={config}',
             f'--workdir={os.path.abspath(workdir)}', *extra_flags]
  with subprocess.Popen(command, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True) as process:
    for line in process.stdout:
      print(line, end='')
  if process.returncode:
    raise RuntimeError(f'instaflow_jax.main stopped with exit status {process.returncode}')


run_recipe(REPO, CONFIG, WORKDIR, EXTRA_FLAGS)

# %% [markdown]
# ## Samples of each training stage
#
# Each training stage writes a grid of samples from fixed noise every `sample_every` steps
# (with its `sample_steps` Euler steps and `sample_guidance`); here is the last one of each.

# %%
import glob

import matplotlib.pyplot as plt
from PIL import Image


def latest_sample_grids(workdir):
  """(stage, path) of the last samples/step_*.png of each stage, in the order they ran."""
  grids = []
  for stage_dir in glob.glob(os.path.join(workdir, '*')):
    steps = sorted(glob.glob(os.path.join(stage_dir, 'samples', 'step_*.png')))
    if steps:
      grids.append((os.path.basename(stage_dir), steps[-1]))
  return sorted(grids, key=lambda grid: os.path.getmtime(grid[1]))


def show_grids(grids):
  fig, axes = plt.subplots(1, len(grids), figsize=(5 * len(grids), 5.4), squeeze=False)
  for ax, (stage, path) in zip(axes[0], grids):
    ax.imshow(Image.open(path), interpolation='nearest')  # tiny images: keep pixels sharp
    ax.set_title(f'{stage}: {os.path.splitext(os.path.basename(path))[0]}')
    ax.axis('off')
  plt.show()


show_grids(latest_sample_grids(WORKDIR))

# %% [markdown]
# ## Evaluation
#
# Stage `eval` samples every model with each solver on held-out prompts from the same
# noise, and reports Frechet distance, prompt fidelity, straightness, the number of
# function evaluations and the time per image (`eval/report.md`, `eval/metrics.json`).

# %%
import re

from IPython import display

IMAGE_LINK = re.compile(r'!\[[^\]]*\]\(([^)]+)\)')


def show_report(eval_dir):
  """report.md as Markdown, then the images it links to: their paths are relative to
  eval/, which Markdown in a notebook cannot resolve."""
  with open(os.path.join(eval_dir, 'report.md')) as f:
    text = f.read()
  display.display(display.Markdown(IMAGE_LINK.sub('', text)))
  for name in IMAGE_LINK.findall(text):
    display.display(display.Image(filename=os.path.join(eval_dir, name)))


show_report(os.path.join(WORKDIR, 'eval'))
