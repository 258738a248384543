"""The C++ kernels for XLA:CPU (models/formulations/cpu_kernels.cc) against PyTorch in float64: attention
(scaled_dot_product_attention; outputs and gradients, on shapes that reach every branch: key
counts that are not whole registers, fewer keys than a register, query counts that are not
whole row blocks, head dims 4 to 40, large logits) and GroupNorm with its SiLU; that the
layers run them, except on a mesh of CPU devices or where they cannot be built; vmap; the
build cache."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from instaflow_jax.models import formulations
from instaflow_jax.models.formulations import cpu_kernels
from instaflow_jax.models import layers
from tests import jaxprs

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures('cpu_kernels_on')


def _torch_attention_and_grads(q, k, v, grad_out, dtype):
  """softmax(q k^T / sqrt(d)) v and its gradients on [b, len, heads, d] arrays."""
  q, k, v = (torch.tensor(np.asarray(t), dtype=dtype).transpose(1, 2).requires_grad_()
             for t in (q, k, v))
  out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
  out.backward(torch.tensor(np.asarray(grad_out), dtype=dtype).transpose(1, 2))
  return [t.detach().transpose(1, 2).double().numpy() for t in (out, q.grad, k.grad, v.grad)]


@pytest.mark.parametrize('batch,q_len,kv_len,heads,dim,logit_scale', [
    (2, 37, 37, 2, 8, 1.0),    # self-attention; neither length a whole block
    (2, 33, 77, 3, 16, 1.0),   # cross-attention over 77 text tokens
    (1, 5, 3, 1, 4, 1.0),      # fewer keys than a register's lanes
    (1, 20, 48, 2, 40, 1.0),   # SD 1.5's head dim; whole registers of keys
    (2, 16, 40, 2, 8, 30.0),   # logits in the hundreds: the max shift and exp's floor
])
def test_kernel_matches_torch_with_gradients(batch, q_len, kv_len, heads, dim, logit_scale):
  assert cpu_kernels.attention_applies(dim)
  rng = np.random.RandomState(0)
  q = rng.randn(batch, q_len, heads, dim).astype(np.float32) * logit_scale
  k, v = (rng.randn(batch, kv_len, heads, dim).astype(np.float32) for _ in range(2))
  grad_out = rng.randn(batch, q_len, heads, dim).astype(np.float32)
  out, vjp = jax.vjp(jax.jit(cpu_kernels.attention), q, k, v)
  got = [out, *vjp(jnp.asarray(grad_out))]
  exact = _torch_attention_and_grads(q, k, v, grad_out, torch.float64)
  torch32 = _torch_attention_and_grads(q, k, v, grad_out, torch.float32)
  for name, ours, y, reference in zip(('out', 'dq', 'dk', 'dv'), got, exact, torch32):
    # As close to float64 as PyTorch's float32 kernel is (within 2x), or 1e-6 of the
    # largest entry. Observed: under 1e-6, 2e-6 with logits in the hundreds (PyTorch 3e-6).
    reference_error = np.abs(reference - y).max()
    error = np.abs(np.asarray(ours, np.float64) - y).max()
    assert error <= max(2 * reference_error, 1e-6 * np.abs(y).max()), (name, error,
                                                                        reference_error)


def test_a_nan_in_the_inputs_comes_out_as_nan():
  """As in PyTorch: the training loop's NaN stop depends on it (an exp with a floor, or a
  max that drops NaN, would turn it into finite numbers)."""
  q = np.ones((1, 4, 1, 8), np.float32)
  q[0, 1, 0, 3] = np.nan
  kv = jnp.asarray(np.random.RandomState(2).randn(1, 20, 1, 8), jnp.float32)
  out = np.asarray(jax.jit(cpu_kernels.attention)(q, kv, kv))
  assert np.isnan(out[0, 1]).all() and np.isfinite(np.delete(out, 1, axis=1)).all()
  k_nan = np.asarray(kv).copy()
  k_nan[0, 17, 0, 0] = np.nan  # in the last, partly padded register of keys
  assert np.isnan(np.asarray(jax.jit(cpu_kernels.attention)(q, k_nan, kv))).all()


@pytest.mark.parametrize('shape,groups,with_silu,offset', [
    ((1, 128, 128, 32), 8, True, 0.0),   # the VAE decoder's last level, one image
    ((2, 7, 5, 48), 3, False, 0.0),      # pixels not a whole block, 16 channels a group
    ((3, 4, 4, 128), 32, True, 0.0),     # the U-Net's deepest level
    ((2, 300, 16), 4, True, 100.0),      # a 1-D layout over 300 positions; a mean of 100
])
def test_group_norm_kernel_matches_torch(shape, groups, with_silu, offset):
  """Within 2x of torch's own float32 error (or 1e-6 of the largest value); a mean far from
  0 checks that the variance is taken of centred values."""
  rng = np.random.RandomState(4)
  x = (rng.randn(*shape) * 3 + offset).astype(np.float32)
  scale, bias = (rng.randn(shape[-1]).astype(np.float32) for _ in range(2))

  def torch_group_norm(dtype):
    t = torch.from_numpy(np.moveaxis(x, -1, 1)).to(dtype)
    y = torch.nn.functional.group_norm(t, groups, torch.from_numpy(scale).to(dtype),
                                       torch.from_numpy(bias).to(dtype), 1e-6)
    y = torch.nn.functional.silu(y) if with_silu else y
    return np.moveaxis(y.double().numpy(), 1, -1)

  expected = torch_group_norm(torch.float64)
  torch_error = np.abs(torch_group_norm(torch.float32) - expected).max()
  got = jax.jit(cpu_kernels.group_norm, static_argnums=(3, 4, 5))(x, scale, bias, groups, 1e-6,
                                                                  with_silu)
  error = np.abs(np.asarray(got, np.float64) - expected).max()
  assert error <= max(2 * torch_error, 1e-6 * np.abs(expected).max()), (error, torch_error)


def test_group_norm_kernel_passes_nan_through_its_image_only():
  x = np.random.RandomState(5).randn(2, 3, 3, 16).astype(np.float32)
  x[1, 2, 0, 5] = np.nan
  y = np.asarray(cpu_kernels.group_norm(x, np.ones(16, np.float32), np.zeros(16, np.float32),
                                        4, 1e-6, True))
  assert np.isfinite(y[0]).all() and np.isnan(y[1, :, :, 4:8]).all()


def test_group_norm_layer_runs_the_kernel_forward_and_xla_backward(monkeypatch):
  """The forward pass is the kernel's, the gradients those of the XLA formulation, as
  before; channels not a multiple of 16 and other activations keep XLA's forward pass."""
  x = jnp.asarray(np.random.RandomState(6).randn(2, 5, 5, 32), jnp.float32)

  def norm_and_params(activation, x):  # scale and bias away from their initial 1 and 0
    module = layers.group_norm(4, 1e-5, 'norm', activation=activation)
    params = module.init(jax.random.key(0), x)['params']
    return module, jax.tree.map(lambda p: p + jnp.linspace(-0.5, 0.5, p.size), params)

  for channels, activation, uses_kernel in ((32, 'silu', True), (32, None, True),
                                            (24, 'silu', False), (32, 'gelu', False)):
    module, params = norm_and_params(activation, x[..., :channels])
    apply = lambda x, p: module.apply({'params': p}, x)
    kernels = jaxprs.ffi_targets(apply, x[..., :channels], params)
    assert kernels == ({'instaflow_group_norm'} if uses_kernel else set()), (channels, activation)
  module, params = norm_and_params('silu', x)
  loss = lambda x, p: jnp.sum(jnp.sin(module.apply({'params': p}, x)))
  got = jax.value_and_grad(loss, argnums=(0, 1))(x, params)
  monkeypatch.setenv('INSTAFLOW_JAX_CPU_KERNELS', 'xla')
  cpu_kernels._registered.cache_clear()
  try:
    assert not jaxprs.ffi_targets(jax.value_and_grad(loss, argnums=(0, 1)), x, params)
    expected = jax.value_and_grad(loss, argnums=(0, 1))(x, params)
  finally:
    monkeypatch.undo()
    cpu_kernels._registered.cache_clear()
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_layers_run_the_kernel_where_it_applies():
  x = jnp.ones((1, 8, 2, 8))
  unmasked = lambda t: formulations.attention(t, t, t)
  causal = lambda t: formulations.attention(t, t, t, is_causal=True)
  odd_dim = lambda t: formulations.attention(t[..., :6], t[..., :6], t[..., :6])
  assert jaxprs.ffi_targets(unmasked, x) == {'instaflow_attention_forward'}
  assert jaxprs.ffi_targets(jax.grad(lambda t: unmasked(t).sum()), x) == {
      'instaflow_attention_forward', 'instaflow_attention_backward'}
  for fn in (causal, odd_dim):  # the XLA formulation
    assert not jaxprs.ffi_targets(jax.grad(lambda t: fn(t).sum()), x)


def test_vmap_over_an_extra_batch_axis_equals_one_call_per_slice():
  rng = np.random.RandomState(1)
  q, k, v = (jnp.asarray(rng.randn(3, 2, 9, 2, 8), jnp.float32) for _ in range(3))
  loss = lambda q, k, v: jnp.sum(jnp.sin(cpu_kernels.attention(q, k, v)))
  batched = jax.vmap(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)
  for i in range(3):
    single = jax.value_and_grad(loss, argnums=(0, 1, 2))(q[i], k[i], v[i])
    for x, y in zip(jax.tree.leaves(single), jax.tree.leaves(batched)):
      np.testing.assert_allclose(y[i], x, rtol=1e-6, atol=1e-6)


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=_REPO,
                        env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # a subprocess with 8 CPU devices
def test_a_mesh_of_cpu_devices_keeps_the_xla_formulation():
  """XLA would gather a sharded batch around a custom call: with 8 devices the layers use
  the XLA formulation, and the gradient of a batch-sharded input stays sharded alike."""
  done = _run_python('''
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from instaflow_jax.models import formulations
      from tests import jaxprs
      mesh = Mesh(np.array(jax.devices()), ('data',))
      x = jax.device_put(jnp.ones((8, 16, 2, 8)), NamedSharding(mesh, P('data')))
      loss = lambda t: jnp.sum(jnp.sin(formulations.attention(t, t, t)))
      grad = jax.grad(loss)
      assert not jaxprs.ffi_targets(grad, x)
      assert jax.jit(grad)(x).sharding.is_equivalent_to(x.sharding, x.ndim)
      print('ok')
  ''', XLA_FLAGS='--xla_force_host_platform_device_count=8')
  assert done.returncode == 0 and done.stdout.strip().endswith('ok'), done.stderr[-3000:]


def test_without_a_compiler_it_warns_once_and_uses_the_xla_formulation(tmp_path):
  done = _run_python('''
      import warnings
      import jax, jax.numpy as jnp
      from instaflow_jax.models import formulations
      from tests import jaxprs
      x = jnp.ones((1, 8, 2, 8))
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        for _ in range(2):
          kernels = jaxprs.ffi_targets(lambda t: formulations.attention(t, t, t), x)
      assert not kernels
      print(len(caught), caught[0].message)
  ''', CXX=str(tmp_path / 'no-such-compiler'), INSTAFLOW_JAX_KERNEL_CACHE=str(tmp_path / 'k'))
  assert done.returncode == 0, done.stderr[-3000:]
  count, message = done.stdout.strip().split(' ', 1)
  assert count == '1', done.stdout
  assert 'CPU kernels unavailable' in message and 'no-such-compiler' in message
  assert 'Install a C++ compiler' in message
  assert not list((tmp_path / 'k').glob('*.so*'))  # nothing half-built left behind


@pytest.mark.slow  # compiles the C++ kernels
def test_the_build_is_cached_per_source_and_reused(tmp_path, monkeypatch):
  monkeypatch.setenv('INSTAFLOW_JAX_KERNEL_CACHE', str(tmp_path))
  first = cpu_kernels.built_library()
  stamp = first.stat().st_mtime_ns
  assert cpu_kernels.built_library() == first and first.stat().st_mtime_ns == stamp
  assert [p.name for p in tmp_path.iterdir()] == [first.name]


@pytest.mark.parametrize('setting, flags, chosen', [
    ('auto', 'fpu sse2 avx2 avx512f avx512bw', True), ('auto', 'fpu sse2 avx2 fma', False),
    ('auto', '', False), ('kernel', 'fpu avx2', True), ('xla', 'avx512f', False)])
def test_the_layers_choose_the_kernels_where_the_cpu_has_avx512(monkeypatch, setting, flags,
                                                                chosen):
  """The kernels compute on 16 float lanes: with AVX2 alone XLA's formulations are faster."""
  monkeypatch.setenv('INSTAFLOW_JAX_CPU_KERNELS', setting)
  assert cpu_kernels._chosen(flags) == chosen


def test_an_unknown_kernel_setting_is_refused(monkeypatch):
  monkeypatch.setenv('INSTAFLOW_JAX_CPU_KERNELS', 'fast')
  with pytest.raises(ValueError, match="INSTAFLOW_JAX_CPU_KERNELS='fast': use auto, kernel or xla"):
    cpu_kernels._chosen('avx512f')


def test_the_description_names_the_cpu_and_what_computes_the_layers(monkeypatch):
  model = cpu_kernels.cpu_model() or 'model unknown'
  with open('/proc/cpuinfo') as f:
    assert model in f.read() or model == 'model unknown'
  monkeypatch.setenv('INSTAFLOW_JAX_CPU_KERNELS', 'kernel')
  assert formulations.description() == f'cpu ({model}; C++ kernels)'
  monkeypatch.setenv('INSTAFLOW_JAX_CPU_KERNELS', 'xla')
  assert formulations.description() == f'cpu ({model}; XLA formulations)'
