"""LoRA: low-rank deltas on a network's kernels, as a params tree of their own.

A LoRA mirrors the network's params tree down to each adapted layer, which holds two
arrays instead of its kernel: `down` [fan_in, rank] and `up` [rank, out], fan_in being
the kernel's inputs (a Dense's in, a convolution's kh * kw * in, in HWIO order). The
layer computes with kernel + scale * reshape(down @ up, kernel.shape): merge() adds the
deltas to the params and the layers stay as they are. Training a LoRA differentiates the
loss through merge() with respect to the LoRA alone; `up` starts at zero, so a fresh LoRA
changes nothing.
"""
from typing import Sequence, Tuple

import flax
import jax
import jax.numpy as jnp

DOWN, UP = 'down', 'up'
Path = Tuple[str, ...]


def layers_of(lora) -> dict:
  """{module path: {'down', 'up'}} of a LoRA tree."""
  flat = flax.traverse_util.flatten_dict(lora)
  modules = {path[:-1] for path in flat}
  return {module: {DOWN: flat[module + (DOWN,)], UP: flat[module + (UP,)]} for module in modules}


def target_layers(params, target_modules: Sequence[str]) -> dict:
  """{module path: kernel} of the layers whose name (the last segment of their path, as
  'to_q' or 'to_out_0') is one of `target_modules`."""
  flat = flax.traverse_util.flatten_dict(params)
  return {path[:-1]: kernel for path, kernel in flat.items()
          if path[-1] == 'kernel' and len(path) > 1 and path[-2] in target_modules}


def init_lora(params, target_modules: Sequence[str], rank: int, rng: jax.Array):
  """A fresh LoRA of `rank` on the layers of `params` that `target_modules` name: down
  ~ N(0, 1/rank^2) (peft's 'gaussian' init), up = 0. ValueError when none is named."""
  targets = target_layers(params, target_modules)
  if not targets:
    raise ValueError(f'model.lora.target_modules = {tuple(target_modules)} names no layer of '
                     "the U-Net; name layers such as 'to_q', 'to_k', 'to_v', 'to_out_0'")
  flat = {}
  for index, (module, kernel) in enumerate(sorted(targets.items())):
    fan_in = kernel.size // kernel.shape[-1]
    flat[module + (DOWN,)] = jax.random.normal(jax.random.fold_in(rng, index), (fan_in, rank),
                                               jnp.float32) / rank
    flat[module + (UP,)] = jnp.zeros((rank, kernel.shape[-1]), jnp.float32)
  return flax.traverse_util.unflatten_dict(flat)


def rank_of(lora) -> int:
  """The rank of a LoRA's first layer."""
  return next(iter(layers_of(lora).values()))[DOWN].shape[-1]


def delta(layer: dict, kernel_shape: Tuple[int, ...]) -> jax.Array:
  """The kernel delta of one LoRA layer, float32, in the kernel's shape."""
  down = layer[DOWN].astype(jnp.float32)
  up = layer[UP].astype(jnp.float32)
  return jnp.matmul(down, up, precision=jax.lax.Precision.HIGHEST).reshape(kernel_shape)


def merge(params, lora, scale=1.0):
  """`params` with scale * each LoRA layer's delta added to its kernel (kernels keep their
  dtype). Jittable: the trained LoRA is merged inside the training step."""
  flat = dict(flax.traverse_util.flatten_dict(params))
  for module, layer in layers_of(lora).items():
    path = module + ('kernel',)
    if path not in flat:
      raise ValueError(f'LoRA layer {"/".join(module)} is no layer of the model')
    kernel = flat[path]
    merged = kernel.astype(jnp.float32) + scale * delta(layer, kernel.shape)
    flat[path] = merged.astype(kernel.dtype)
  return flax.traverse_util.unflatten_dict(flat)
