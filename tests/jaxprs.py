"""What a function's jaxpr calls: the path a layer took, read from JAX's trace rather than
from XLA's compiled text (which changes with every XLA release)."""
from typing import Iterator, Set

import jax


def _equations(jaxpr) -> Iterator:
  """Every equation of `jaxpr`, into the jaxprs its equations hold (custom_vjp, pjit)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for value in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(value, 'jaxpr', value)  # a ClosedJaxpr holds its Jaxpr
        if hasattr(inner, 'eqns'):
          yield from _equations(inner)


def primitives(fn, *args) -> Set[str]:
  """The names of the primitives that fn(*args) traces to."""
  return {eqn.primitive.name for eqn in _equations(jax.make_jaxpr(fn)(*args).jaxpr)}


def ffi_targets(fn, *args) -> Set[str]:
  """The targets of the foreign-function calls (our C++ kernels) in fn(*args)."""
  return {eqn.params['target_name'] for eqn in _equations(jax.make_jaxpr(fn)(*args).jaxpr)
          if eqn.primitive.name == 'ffi_call'}
