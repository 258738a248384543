"""The params of a module: their shapes without computing anything, or freshly made."""
from typing import Any, Dict, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def abstract_variables(module: nn.Module) -> Any:
  """Shapes and dtypes of `module.init`'s variables (logical-axis boxes kept)."""
  return jax.eval_shape(module.init, jax.random.key(0), *module.example_inputs())


def abstract_params(module: nn.Module) -> Any:
  """ShapeDtypeStructs of the module's params, boxes removed: a target to load into."""
  return nn.meta.unbox(abstract_variables(module))['params']


def flat_param_shapes(variables) -> Dict[Tuple[str, ...], Tuple[Tuple[int, ...], np.dtype]]:
  """Flat {path: (shape, dtype)} of the 'params' of variables (abstract or not)."""
  params = nn.meta.unbox(variables)
  params = params.get('params', params)
  return {path: (tuple(leaf.shape), leaf.dtype)
          for path, leaf in flax.traverse_util.flatten_dict(params).items()}


def init_params(module: nn.Module, seed: int):
  """Freshly initialised float params of a module (logical-axis boxes removed).

  Jitted: running init op by op is slow for a U-Net on a CPU. Compiled at the backend's
  lowest optimisation level: it runs once, and its hundreds of random draws (one per
  param) compile much faster so."""
  init = jax.jit(module.init, compiler_options={'xla_backend_optimization_level': 0})
  variables = init(jax.random.key(seed), *module.example_inputs())
  return nn.meta.unbox(variables)['params']


def cast_floats(params, dtype):
  """params with every floating-point leaf cast to `dtype` (integer leaves kept)."""
  return jax.tree.map(
      lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)
