"""Splash attention (models/formulations/tpu_attention.py) against the XLA formulation, on
the CPU in Pallas interpret mode: the kernel's own code path, its numbers and gradients.

`python -m tests.test_tpu_attention` (with 2 simulated CPU devices) prints the errors of the
same check under a 2-device mesh as JSON; test_two_devices runs it in its own process,
since the device count is fixed when jax starts.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from instaflow_jax import parallel
from instaflow_jax.models.formulations import tpu_attention
from tests import jaxprs
from tests import runs

# float32 on both sides: what is left is the order of the sums (seen: 2e-6 of the largest
# value, outputs and gradients).
TOLERANCE = 1e-5
HEADS = 2


def _qkv(batch, length, head_dim, dtype=jnp.float32, kv_length=None):
  keys = jax.random.split(jax.random.key(head_dim), 3)
  lengths = (length, kv_length or length, kv_length or length)
  return tuple(jax.random.normal(key, (batch, n, HEADS, head_dim), dtype)
               for key, n in zip(keys, lengths))


def _xla_attention(query, key, value):
  return jax.nn.dot_product_attention(query, key, value, implementation='xla')


def _output_and_gradients(attention):
  """q, k, v -> (out, d(sum(out * w))/d(q, k, v)) with fixed weights w, compiled."""
  def both(query, key, value):
    out, vjp = jax.vjp(attention, query, key, value)
    weights = jax.random.normal(jax.random.key(7), out.shape, out.dtype)
    return out, vjp(weights)
  return jax.jit(both)


def _relative_errors(got, expected):
  """max |got - expected| / max |expected|, leaf by leaf."""
  return [float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
          for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected))]


def _errors(batch, length, head_dim):
  """The relative errors of splash's output and q, k, v gradients against XLA's."""
  qkv = _qkv(batch, length, head_dim)
  return _relative_errors(_output_and_gradients(tpu_attention.splash_attention)(*qkv),
                          _output_and_gradients(_xla_attention)(*qkv))


@pytest.mark.parametrize('length,head_dim', [
    (256, 40),   # padded to 128; one 256 block each way
    (384, 80),   # padded to 128; 3 x 3 blocks of 128: the online softmax across kv blocks
    (256, 128),  # not padded
])
def test_output_and_gradients_match_the_xla_formulation(length, head_dim):
  errors = _errors(2, length, head_dim)
  print(f'{length} tokens, head dim {head_dim}: out, dq, dk, dv {errors}')
  assert max(errors) < TOLERANCE


def test_bfloat16_is_as_close_as_bfloat16_allows():
  """q is scaled in its own dtype before the kernel: one more rounding, of bf16's size."""
  query, key, value = _qkv(2, 256, 40, jnp.bfloat16)
  got = jax.jit(tpu_attention.splash_attention)(query, key, value)
  expected = _xla_attention(*(t.astype(jnp.float32) for t in (query, key, value)))
  assert got.dtype == jnp.bfloat16
  assert _relative_errors(got.astype(jnp.float32), expected)[0] < 2e-2


def test_splash_applies_to_long_self_attention_only():
  self_attention = jnp.zeros((2, 1024, 8, 80))
  text = jnp.zeros((2, 77, 8, 80))
  applies = lambda q, k, **kw: tpu_attention.splash_applies(
      q, k, **{'mask': None, 'is_causal': False, **kw})
  assert applies(self_attention, self_attention)
  assert applies(jnp.zeros((1, 4096, 8, 40), jnp.bfloat16), jnp.zeros((1, 4096, 8, 40),
                                                                      jnp.bfloat16))
  assert not applies(self_attention, text)  # cross-attention over the 77 text tokens
  assert not applies(text, text)
  assert not applies(jnp.zeros((2, 64, 8, 160)), jnp.zeros((2, 64, 8, 160)))  # 8x8 latents
  assert not applies(self_attention, self_attention, mask=jnp.ones((1024, 1024), bool))
  assert not applies(self_attention, self_attention, is_causal=True)
  assert not applies(self_attention.astype(jnp.float16), self_attention.astype(jnp.float16))


def _shard_map_of(batch, mesh=None):
  """The shard_map equation that splash_attention traces to on a batch of `batch` under
  `mesh` (None: none)."""
  query = jax.ShapeDtypeStruct((batch, 256, HEADS, 40), jnp.float32)
  if mesh is None:
    jaxpr = jax.make_jaxpr(tpu_attention.splash_attention)(query, query, query)
  else:
    with jax.sharding.use_abstract_mesh(mesh):
      jaxpr = jax.make_jaxpr(tpu_attention.splash_attention)(query, query, query)
  found = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == 'shard_map']
  return found[0] if found else None


def test_each_device_attends_over_its_slice_of_the_batch():
  mesh = AbstractMesh((2, 2, 2), ('data', 'fsdp', 'tensor'), axis_types=(AxisType.Auto,) * 3)
  shard_map = _shard_map_of(8, mesh)
  assert P(('data', 'fsdp')) in shard_map.params['in_specs']
  assert shard_map.params['jaxpr'].outvars[0].aval.shape[0] == 2  # 8 / (data x fsdp)
  assert _shard_map_of(6, mesh) is None  # the batch axes do not divide the batch
  tensor_only = AbstractMesh((2,), ('tensor',), axis_types=(AxisType.Auto,))
  assert _shard_map_of(8, tensor_only) is None
  assert _shard_map_of(8) is None
  assert 'pallas_call' in jaxprs.primitives(
      tpu_attention.splash_attention, *_qkv(2, 256, 40))


def _errors_on_two_devices():
  """The output and gradient errors of splash on a batch split over a 2-device data axis."""
  layout = parallel.data_parallel()
  qkv = _qkv(2, 256, 40)
  with jax.set_mesh(layout.mesh):
    split = layout.shard_batch(qkv)
    assert 'shard_map' in jaxprs.primitives(tpu_attention.splash_attention, *split)
    got = _output_and_gradients(tpu_attention.splash_attention)(*split)
  return {'devices': jax.device_count(), 'output_sharding': str(got[0].sharding.spec),
          'errors': _relative_errors(got, _output_and_gradients(_xla_attention)(*qkv))}


def test_two_devices():
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env['XLA_FLAGS'] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"
  result = subprocess.run([sys.executable, '-m', 'tests.test_tpu_attention'], cwd=runs.REPO,
                          env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  found = json.loads(result.stdout.strip().splitlines()[-1])
  print(found)
  assert found['devices'] == 2
  assert found['output_sharding'] == str(P('data'))
  assert max(found['errors']) < TOLERANCE


if __name__ == '__main__':
  jax.config.update('jax_default_matmul_precision', 'highest')  # as conftest.py sets it
  print(json.dumps(_errors_on_two_devices()))
