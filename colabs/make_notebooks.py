r"""Writes the notebooks of colabs/ from the cells below, with no outputs.

  python colabs/make_notebooks.py [OUT_DIR]   # default: this folder

Edit the cells here and run it, rather than editing the .ipynb files: the JSON stays
reviewable as Python, and tests/test_colabs.py checks that the committed notebooks are
exactly what this script writes. Each notebook has one cell tagged `parameters`
(papermill's convention): tools that run it with other values add a cell after it.
"""
import os
import sys
import textwrap

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))

INSTALL_CELL = """
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
"""

ONE_STEP_GENERATION = [
    ('markdown', """
# One-step text-to-image with InstaFlow-0.9B, in JAX

InstaFlow-0.9B ([Liu et al., ICLR 2024](https://arxiv.org/abs/2309.06380)) makes a
512×512 image from a prompt with **one** evaluation of its U-Net: a rectified flow
fine-tuned from Stable Diffusion 1.5, straightened by reflow and distilled into a single
Euler step. This notebook downloads the released weights from the Hugging Face Hub
(`XCLiu/instaflow_0_9B_from_sd_1_5`, CC BY-NC 4.0: non-commercial use) and samples them
with `instaflow_jax`, whose Flax U-Net, VAE and CLIP text encoder load the diffusers
folder directly.

A GPU runtime is much faster (Runtime → Change runtime type); a CPU runtime works too.
`REPO` is where `instaflow_jax` is installed from when it is missing: a checkout of this
repository (clone or upload it first) or its git URL.
"""),
    ('parameters', """
MODEL = 'XCLiu/instaflow_0_9B_from_sd_1_5'  # a Hub repo id, or a local diffusers folder (used as is)
PROMPTS = [
    'a photograph of an astronaut riding a horse',
    'a cozy wooden cabin in a snowy forest at night',
    'a bowl of ramen, studio lighting',
    'an oil painting of a lighthouse in a storm',
]
STEPS = 1       # Euler steps: InstaFlow is made for one
GUIDANCE = 0.0  # classifier-free guidance w, used only when w > 1 (it doubles the U-Net batch)
SEED = 0        # of the initial noise
REPO = '.'      # pip requirement for instaflow_jax: a checkout of this repository, or its git URL
"""),
    ('code', INSTALL_CELL),
    ('markdown', """
## Load the weights

`Pipeline.from_diffusers` reads `model_index.json`, `unet/`, `vae/`, `text_encoder/` and
`tokenizer/`, checks every key and shape against the component's config, and converts
the weights to Flax (from safetensors, or from `.bin` files with PyTorch).
"""),
    ('code', """
import os
import time

from instaflow_jax.pipeline import Pipeline

# What Pipeline.from_diffusers reads: the repository's other files are not downloaded.
COMPONENTS = ['model_index.json', 'unet/*', 'vae/*', 'text_encoder/*', 'tokenizer/*']


def model_folder(model: str) -> str:
  \"\"\"A local diffusers folder as is; otherwise a Hub repo id, downloaded (once: the Hub
  client caches it).\"\"\"
  if os.path.isdir(model):
    return model
  from huggingface_hub import snapshot_download
  return snapshot_download(model, allow_patterns=COMPONENTS)


start = time.perf_counter()
pipe = Pipeline.from_diffusers(model_folder(MODEL))
print(f'loaded {MODEL} in {time.perf_counter() - start:.1f} s: '
      f'{pipe.default_size}x{pipe.default_size} images')
"""),
    ('markdown', """
## Generate

The whole sampler (text encoder, `STEPS` U-Net evaluations, VAE decoder) is one jitted
program. The first call compiles it; `generate_images` then times a second, compiled call
on its own, so the two costs are reported apart.
"""),
    ('code', """
from instaflow_jax.generate import generate_images

images, timing = generate_images(pipe, PROMPTS, steps=STEPS, guidance=GUIDANCE, seed=SEED,
                                 batch_size=len(PROMPTS))
print(f'{len(images)} images of {images.shape[1]}x{images.shape[2]}, {STEPS} step(s): '
      f'compile {timing.compile_s:.2f} s, {1000 * timing.per_image_s:.1f} ms per image')
"""),
    ('code', """
import textwrap

import matplotlib.pyplot as plt


def show(images, prompts):
  \"\"\"One image per prompt, the prompt as its title.\"\"\"
  fig, axes = plt.subplots(1, len(images), figsize=(4 * len(images), 4.6), squeeze=False)
  for ax, image, prompt in zip(axes[0], images, prompts):
    ax.imshow(image, interpolation='nearest')
    ax.set_title(textwrap.fill(prompt, 32), fontsize=10)
    ax.axis('off')
  plt.show()


show(images, PROMPTS)
"""),
    ('markdown', """
Try other prompts or seeds (the compiled program is reused while the number of prompts
stays the same), or `XCLiu/2_rectified_flow_from_sd_1_5` (the 2-rectified flow InstaFlow
was distilled from) with `STEPS = 4` or more and `GUIDANCE = 1.5`.
"""),
]

RECIPE_ON_CPU = [
    ('markdown', """
# The InstaFlow recipe end to end, on a CPU

`instaflow_jax` trains the whole recipe, which the released InstaFlow code does not ship:
a rectified flow (stage `rf`), (noise, image) pairs from its ODE (`pairs`), the
2-rectified flow trained on those pairs (`reflow`), a one-step student distilled from it
(`distill`), and an evaluation of all of them (`eval`). The embedded default needs no
download: captioned coloured shapes generated locally, a small frozen CLIP text encoder
with random weights, and pixel space instead of a VAE. `configs/shapes.py:quick` runs
every stage, shrunk, in minutes on a CPU runtime; `configs/shapes.py` trains for real
(see the README for times).

`REPO` is a checkout of this repository (in Colab, clone or upload it first): the configs
live there, and `instaflow_jax` is installed from it when missing. Running the recipe
cell again continues where it stopped: stages already complete in `WORKDIR` are skipped,
an interrupted one resumes from its last checkpoint.
"""),
    ('parameters', """
REPO = '.'                          # a checkout of this repository
CONFIG = 'configs/shapes.py:quick'  # relative to REPO
WORKDIR = 'runs/quick'              # relative to this notebook's directory
EXTRA_FLAGS = []                    # more overrides, e.g. ['--config.rf.steps=100']
"""),
    ('code', INSTALL_CELL),
    ('code', """
import os
import subprocess
import sys


def run_recipe(repo, config, workdir, extra_flags):
  \"\"\"`python -m instaflow_jax.main` on the config, its log printed as it comes (a
  subprocess, so that its flags and its JAX state are its own).\"\"\"
  command = [sys.executable, '-m', 'instaflow_jax.main', f'--config={config}',
             f'--workdir={os.path.abspath(workdir)}', *extra_flags]
  with subprocess.Popen(command, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True) as process:
    for line in process.stdout:
      print(line, end='')
  if process.returncode:
    raise RuntimeError(f'instaflow_jax.main stopped with exit status {process.returncode}')


run_recipe(REPO, CONFIG, WORKDIR, EXTRA_FLAGS)
"""),
    ('markdown', """
## Samples of each training stage

Each training stage writes a grid of samples from fixed noise every `sample_every` steps
(with its `sample_steps` Euler steps and `sample_guidance`); here is the last one of each.
"""),
    ('code', """
import glob

import matplotlib.pyplot as plt
from PIL import Image


def latest_sample_grids(workdir):
  \"\"\"(stage, path) of the last samples/step_*.png of each stage, in the order they ran.\"\"\"
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
"""),
    ('markdown', """
## Evaluation

Stage `eval` samples every model with each solver on held-out prompts from the same
noise, and reports Frechet distance, prompt fidelity, straightness, the number of
function evaluations and the time per image (`eval/report.md`, `eval/metrics.json`).
"""),
    ('code', """
import re

from IPython import display

IMAGE_LINK = re.compile(r'!\\[[^\\]]*\\]\\(([^)]+)\\)')


def show_report(eval_dir):
  \"\"\"report.md as Markdown, then the images it links to: their paths are relative to
  eval/, which Markdown in a notebook cannot resolve.\"\"\"
  with open(os.path.join(eval_dir, 'report.md')) as f:
    text = f.read()
  display.display(display.Markdown(IMAGE_LINK.sub('', text)))
  for name in IMAGE_LINK.findall(text):
    display.display(display.Image(filename=os.path.join(eval_dir, name)))


show_report(os.path.join(WORKDIR, 'eval'))
"""),
]

REFLOW_2D_TOY = [
    ('markdown', """
# Rectified flow and reflow on a 2-D toy

A rectified flow learns a velocity field v(x, s) whose ODE carries noise X0 ~ N(0, I)
(s = 0) to data X1 (s = 1), by regressing v(x_s, s) on X1 − X0 along the straight lines
x_s = s·X1 + (1 − s)·X0. With X0 and X1 drawn **independently** (1-RF), lines from the
same region of noise head to different modes; the ODE cannot cross itself, so it
follows their average and its paths bend. Reflow draws new pairs (X0, ODE(X0)) from the
1-RF: a deterministic coupling whose lines hardly cross, so the 2-RF trained on it is
nearly straight and **one Euler step** lands close to where the full ODE goes. This is
the core of InstaFlow, shown here on a mixture of Gaussians in seconds.

Straightness (Liu et al., 2022) is the mean over the path of ‖(X1 − X0) − v(x_s, s)‖²:
0 for straight paths. Training, pairs and straightness use the package's own
`instaflow_jax.flow` functions, the same ones the text-to-image stages use.
"""),
    ('parameters', """
STEPS = 3000     # training steps of each flow
BATCH = 512
LR = 3e-3
N_PAIRS = 10000  # (noise, 1-RF sample) pairs that the 2-RF is trained on
ODE_STEPS = 100  # Euler steps of the ODE solves: the pairs, the paths, the straightness
MODES = 4        # Gaussians of the data distribution, on a circle
RADIUS = 4.0
MODE_STD = 0.4
N_EVAL = 2000    # noise samples for straightness and one-step samples
N_PATHS = 200    # paths drawn
SEED = 0
REPO = '.'       # pip requirement for instaflow_jax: a checkout of this repository, or its git URL
"""),
    ('code', INSTALL_CELL),
    ('code', """
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

from instaflow_jax.flow import rectified_flow
from instaflow_jax.flow import samplers


class VelocityMLP(nn.Module):
  \"\"\"v(x, s) for 2-D points x [batch, 2] at flow time s.\"\"\"
  width: int = 128
  depth: int = 3

  @nn.compact
  def __call__(self, x, s):
    # The samplers pass one s for the batch, training one s per example: a column either way.
    s = jnp.broadcast_to(jnp.reshape(s, (-1, 1)), (x.shape[0], 1)).astype(x.dtype)
    h = jnp.concatenate([x, s], axis=-1)
    for _ in range(self.depth):
      h = nn.silu(nn.Dense(self.width)(h))
    return nn.Dense(x.shape[-1])(h)


model = VelocityMLP()
angles = 2 * np.pi * (np.arange(MODES) + 0.5) / MODES
CENTERS = jnp.asarray(RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=1), jnp.float32)


def sample_data(rng, n):
  \"\"\"n points of the mixture: a random centre each, plus Gaussian noise.\"\"\"
  mode_rng, noise_rng = jax.random.split(rng)
  modes = jax.random.randint(mode_rng, (n,), 0, MODES)
  return CENTERS[modes] + MODE_STD * jax.random.normal(noise_rng, (n, 2))


def velocity(params):
  \"\"\"The field as samplers' VelocityFn, v(x, s).\"\"\"
  return lambda x, s: model.apply(params, x, s)
"""),
    ('markdown', """
## Training: one loss for both flows, only the coupling changes

`coupling(rng)` returns a batch of (X0, X1): independent draws for the 1-RF, rows of the
stored pairs for the 2-RF. The whole training run is one `lax.scan`, compiled once.
"""),
    ('code', """
def flow_loss(params, x0, x1, rng):
  \"\"\"The rectified-flow regression at random times s on the line from x0 to x1.\"\"\"
  s = rectified_flow.sample_time(rng, x0.shape[0])
  prediction = model.apply(params, rectified_flow.interpolate(x0, x1, s), s)
  target = rectified_flow.velocity_target(x0, x1)
  return rectified_flow.per_example_loss(prediction, target).mean()


optimizer = optax.adam(optax.cosine_decay_schedule(LR, STEPS))


@functools.partial(jax.jit, static_argnums=1)
def train(params, coupling, rng):
  \"\"\"STEPS Adam steps on batches from `coupling`; (params, the loss of each step).\"\"\"
  def step(carry, step_rng):
    params, opt_state = carry
    batch_rng, time_rng = jax.random.split(step_rng)
    loss, grads = jax.value_and_grad(flow_loss)(params, *coupling(batch_rng), time_rng)
    updates, opt_state = optimizer.update(grads, opt_state)
    return (optax.apply_updates(params, updates), opt_state), loss

  (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)),
                                     jax.random.split(rng, STEPS))
  return params, losses


def independent_coupling(rng):
  noise_rng, data_rng = jax.random.split(rng)
  return jax.random.normal(noise_rng, (BATCH, 2)), sample_data(data_rng, BATCH)


init_rng, rf_rng, pairs_rng, reflow_rng, eval_rng, data_rng = jax.random.split(
    jax.random.key(SEED), 6)
params_1rf, losses_1rf = train(model.init(init_rng, jnp.zeros((1, 2)), jnp.zeros((1,))),
                               independent_coupling, rf_rng)
print(f'1-RF: final loss {losses_1rf[-100:].mean():.3f} (it cannot reach 0: the target '
      'X1 - X0 is random given x_s)')
"""),
    ('markdown', """
## Reflow: pairs from the 1-RF's ODE, then the 2-RF

The 2-RF starts from the 1-RF's weights, as stage `reflow` of the recipe starts from
stage `rf`'s.
"""),
    ('code', """
pairs_x0 = jax.random.normal(pairs_rng, (N_PAIRS, 2))
pairs_x1 = samplers.euler_sample(velocity(params_1rf), pairs_x0, ODE_STEPS)


def reflow_coupling(rng):
  rows = jax.random.randint(rng, (BATCH,), 0, N_PAIRS)
  return pairs_x0[rows], pairs_x1[rows]


params_2rf, losses_2rf = train(params_1rf, reflow_coupling, reflow_rng)
print(f'2-RF: final loss {losses_2rf[-100:].mean():.4f} (X1 is a function of X0 now: '
      'a straight field can fit it)')
"""),
    ('markdown', """
## Paths before and after reflow
"""),
    ('code', """
def euler_path(velocity_fn, x0, num_steps):
  \"\"\"Every state of the Euler solve, [num_steps + 1, batch, 2], for drawing: the
  samplers return only the end, which the check below compares with.\"\"\"
  def step(x, s):
    x = x + velocity_fn(x, s) / num_steps
    return x, x

  _, states = jax.lax.scan(step, x0, rectified_flow.euler_times(num_steps))
  return jnp.concatenate([x0[None], states])


@jax.jit
def solve(params, x0):
  \"\"\"One model from the noise x0: the end of its ODE, its straightness, its one-step
  sample and the paths to draw (params are an argument: one program for both models).\"\"\"
  velocity_fn = velocity(params)
  end, straightness = samplers.euler_with_straightness(velocity_fn, x0, ODE_STEPS)
  return dict(end=end, straightness=straightness.mean(),
              one_step=samplers.euler_sample(velocity_fn, x0, 1),
              path=euler_path(velocity_fn, x0[:N_PATHS], ODE_STEPS))


models = {'1-RF': params_1rf, '2-RF': params_2rf}
solved = {name: solve(params, jax.random.normal(eval_rng, (N_EVAL, 2)))
          for name, params in models.items()}
for result in solved.values():
  np.testing.assert_allclose(result['path'][-1], result['end'][:N_PATHS], atol=1e-4)

fig, axes = plt.subplots(1, 2, figsize=(12, 6), sharex=True, sharey=True)
for ax, name in zip(axes, models):
  path = np.asarray(solved[name]['path'])
  ax.plot(path[:, :, 0], path[:, :, 1], color='tab:blue', alpha=0.25, lw=0.8)
  ax.scatter(*path[0].T, s=4, color='black', label='noise X0')
  ax.scatter(*path[-1].T, s=4, color='tab:red', label=f'X1 ({ODE_STEPS} Euler steps)')
  ax.set_title(f"{name}: straightness {solved[name]['straightness']:.4f}")
  ax.set_aspect('equal')
axes[0].legend(loc='upper left')
plt.show()
for name in models:
  print(f"straightness {name}: {solved[name]['straightness']:.4f}")
"""),
    ('markdown', """
## One Euler step

With X0 and X1 independent, the 1-RF's velocity at s = 0 is E[X1] − X0: its single
step lands near the mean of the data, between the modes. The 2-RF's lands near where its
full ODE goes.
"""),
    ('code', """
fig, axes = plt.subplots(1, 3, figsize=(15, 5), sharex=True, sharey=True)
panels = [('data', sample_data(data_rng, N_EVAL))] + [
    (f'{name}, one step', solved[name]['one_step']) for name in models]
for ax, (title, points) in zip(axes, panels):
  ax.scatter(*np.asarray(points).T, s=3, alpha=0.5)
  ax.set_title(title)
  ax.set_aspect('equal')
plt.show()
for name in models:
  error = jnp.linalg.norm(solved[name]['one_step'] - solved[name]['end'], axis=1).mean()
  print(f'one-step error {name}: {error:.3f} (mean distance to its {ODE_STEPS}-step ODE end)')
"""),
]

NOTEBOOKS = {
    'one_step_generation.ipynb': (ONE_STEP_GENERATION, {'accelerator': 'GPU'}),
    'recipe_on_cpu.ipynb': (RECIPE_ON_CPU, {}),
    'reflow_2d_toy.ipynb': (REFLOW_2D_TOY, {}),
}


def make_cell(kind: str, source: str, cell_id: str):
  """A notebook cell; ids are fixed so that rebuilding an unchanged notebook changes nothing."""
  source = textwrap.dedent(source).strip('\n')
  if kind == 'markdown':
    cell = nbformat.v4.new_markdown_cell(source)
  else:
    cell = nbformat.v4.new_code_cell(source)
    if kind == 'parameters':
      cell.metadata['tags'] = ['parameters']
  cell['id'] = cell_id
  return cell


def make_notebook(stem: str, cells, colab_metadata: dict):
  notebook = nbformat.v4.new_notebook(metadata={
      'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'},
      'language_info': {'name': 'python'},
      'colab': {'provenance': []},
      **colab_metadata,
  })
  notebook.cells = [make_cell(kind, source, f'{stem}-{index:02d}')
                    for index, (kind, source) in enumerate(cells)]
  nbformat.validate(notebook)
  return notebook


def write_notebooks(out_dir: str) -> None:
  os.makedirs(out_dir, exist_ok=True)
  for name, (cells, colab_metadata) in NOTEBOOKS.items():
    stem = name[:-len('.ipynb')]
    nbformat.write(make_notebook(stem, cells, colab_metadata), os.path.join(out_dir, name))


if __name__ == '__main__':
  write_notebooks(sys.argv[1] if len(sys.argv) > 1 else HERE)
