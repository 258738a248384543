# ---
# jupyter:
#   accelerator: GPU
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
# # One-step text-to-image with InstaFlow-0.9B, in JAX
#
# InstaFlow-0.9B ([Liu et al., ICLR 2024](https://arxiv.org/abs/2309.06380)) makes a
# 512×512 image from a prompt with **one** evaluation of its U-Net: a rectified flow
# fine-tuned from Stable Diffusion 1.5, straightened by reflow and distilled into a single
# Euler step. This notebook downloads the released weights from the Hugging Face Hub
# (`XCLiu/instaflow_0_9B_from_sd_1_5`, CC BY-NC 4.0: non-commercial use) and samples them
# with `instaflow_jax`, whose Flax U-Net, VAE and CLIP text encoder load the diffusers
# folder directly.
#
# A GPU runtime is much faster (Runtime → Change runtime type); a CPU runtime works too.
# `REPO` is where `instaflow_jax` is installed from when it is missing: a checkout of this
# repository (clone or upload it first) or its git URL.

# %% tags=["parameters"]
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

# %% [markdown]
# ## Load the weights
#
# `Pipeline.from_diffusers` reads `model_index.json`, `unet/`, `vae/`, `text_encoder/` and
# `tokenizer/`, checks every key and shape against the component's config, and converts
# the weights to Flax (from safetensors, or from `.bin` files with PyTorch).

# %%
import os
import time

from instaflow_jax.pipeline import Pipeline

# What Pipeline.from_diffusers reads: the repository's other files are not downloaded.
COMPONENTS = ['model_index.json', 'unet/*', 'vae/*', 'text_encoder/*', 'tokenizer/*']


def model_folder(model: str) -> str:
  """A local diffusers folder as is; otherwise a Hub repo id, downloaded (once: the Hub
  client caches it)."""
  if os.path.isdir(model):
    return model
  from huggingface_hub import snapshot_download
  return snapshot_download(model, allow_patterns=COMPONENTS)


start = time.perf_counter()
pipe = Pipeline.from_diffusers(model_folder(MODEL), kind='flow')  # InstaFlow is a flow
print(f'loaded {MODEL} in {time.perf_counter() - start:.1f} s: '
      f'{pipe.default_size}x{pipe.default_size} images')

# %% [markdown]
# ## Generate
#
# The whole sampler (text encoder, `STEPS` U-Net evaluations, VAE decoder) is one jitted
# program. The first call compiles it; `generate_images` then times a second, compiled call
# on its own, so the two costs are reported apart.

# %%
from instaflow_jax.generate import generate_images

images, timing = generate_images(pipe, PROMPTS, steps=STEPS, guidance=GUIDANCE, seed=SEED,
                                 batch_size=len(PROMPTS))
print(f'{len(images)} images of {images.shape[1]}x{images.shape[2]}, {STEPS} step(s): '
      f'compile {timing.compile_s:.2f} s, {1000 * timing.per_image_s:.1f} ms per image')

# %%
import textwrap

import matplotlib.pyplot as plt


def show(images, prompts):
  """One image per prompt, the prompt as its title."""
  fig, axes = plt.subplots(1, len(images), figsize=(4 * len(images), 4.6), squeeze=False)
  for ax, image, prompt in zip(axes[0], images, prompts):
    ax.imshow(image, interpolation='nearest')
    ax.set_title(textwrap.fill(prompt, 32), fontsize=10)
    ax.axis('off')
  plt.show()


show(images, PROMPTS)

# %% [markdown]
# Try other prompts or seeds (the compiled program is reused while the number of prompts
# stays the same), or `XCLiu/2_rectified_flow_from_sd_1_5` (the 2-rectified flow InstaFlow
# was distilled from) with `STEPS = 4` or more and `GUIDANCE = 1.5`.
