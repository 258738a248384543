"""Each backend's formulations (models/formulations): the GPU and TPU paths, traced on the
CPU, contain none of the CPU formulations and compute what the CPU path computes; cuDNN's
attention is chosen where it applies; the CPU's compiler option reaches the models' jits
only on a CPU. And the accelerators' memory option of the optimizer (a bf16 first moment)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from instaflow_jax.models import abstract
from instaflow_jax.models import formulations
from instaflow_jax.models.formulations import gpu
from instaflow_jax.models.formulations import portable
from instaflow_jax.models.unet import UNet2DConditionModel
from instaflow_jax.models.unet import UNetConfig
from instaflow_jax.training import state as state_lib
from tests import jaxprs
from tests import tiny_models

# What only the CPU formulations trace to: the C++ kernels and the custom backward passes.
CPU_ONLY_PRIMITIVES = {'ffi_call', 'custom_vjp_call', 'custom_vjp_call_jaxpr'}


@pytest.fixture(scope='module')
def unet():
  """A tiny U-Net whose CPU path takes every CPU formulation: both C++ kernels (head dims
  of 8 and 16, GroupNorm over 32 and 64 channels), a convolution as a matmul (2x2 pixels
  at the second level) and the up-sampling folded into its convolution."""
  model = UNet2DConditionModel(UNetConfig.from_diffusers_config(tiny_models.tiny_unet_config()))
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(2, 4, 4, 4), jnp.float32)
  context = jnp.asarray(rng.randn(2, 5, 32), jnp.float32)
  return model, {'params': abstract.init_params(model, 0)}, x, context


def _forward_and_gradient(unet):
  model, params, x, context = unet
  timesteps = jnp.asarray([999.0, 250.0])

  def loss(params, x):
    return jnp.sum(jnp.sin(model.apply(params, x, timesteps, context)))

  forward = lambda params, x: model.apply(params, x, timesteps, context)
  gradient = jax.grad(loss, argnums=(0, 1))
  return forward, gradient, (params, x)


def _relative_error(got, expected) -> float:
  return max(float(np.abs(np.asarray(g) - np.asarray(e)).max() / np.abs(np.asarray(e)).max())
             for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)))


@pytest.mark.parametrize('backend', ['gpu', 'tpu'])
@pytest.mark.usefixtures('cpu_kernels_on')
def test_accelerator_paths_use_no_cpu_formulation_and_agree_with_the_cpu_path(unet, backend):
  forward, gradient, args = _forward_and_gradient(unet)
  cpu_traced = jaxprs.primitives(forward, *args) | jaxprs.primitives(gradient, *args)
  assert {'ffi_call', 'custom_vjp_call'} <= cpu_traced  # the check below can fail
  cpu_values = jax.jit(forward)(*args), jax.jit(gradient)(*args)
  with formulations.use(backend):
    forward, gradient, _ = _forward_and_gradient(unet)  # traced afresh: JAX caches traces
    traced = jaxprs.primitives(forward, *args) | jaxprs.primitives(gradient, *args)
    values = jax.jit(forward)(*args), jax.jit(gradient)(*args)
  assert not traced & CPU_ONLY_PRIMITIVES, traced & CPU_ONLY_PRIMITIVES
  assert _relative_error(values[0], cpu_values[0]) <= 1e-5
  assert _relative_error(values[1], cpu_values[1]) <= 1e-5


def test_cudnn_attention_serves_every_attention_it_applies_to(unet, monkeypatch):
  """On a GPU, each call site asks cudnn_applies; here a stand-in says yes to bf16 and
  records the calls that would run cuDNN's kernel."""
  model, params, x, context = unet
  model = model.clone(dtype=jnp.bfloat16)
  calls = []

  def recorded(query, key, value, *, is_causal=False):
    calls.append((query.shape, key.shape))
    return portable.attention(query, key, value, is_causal=is_causal)

  monkeypatch.setattr(gpu, 'cudnn_applies',
                      lambda q, k, *, is_causal, mask: q.dtype == jnp.bfloat16 and mask is None)
  monkeypatch.setattr(gpu, 'cudnn_attention', recorded)
  with formulations.use('gpu'):
    jax.eval_shape(model.apply, params, x, jnp.asarray(999.0), context)
  # Self-attention over the keys of its level (16 pixels; the mid block's 4) and
  # cross-attention to the 5 text states, in each transformer: 1 down, 1 mid, 2 up.
  assert sorted(k[1] for _, k in calls) == [4, 5, 5, 5, 5, 16, 16, 16]


def test_cudnn_applies_only_to_half_precision_without_a_mask_on_a_gpu():
  q = jnp.zeros((1, 64, 2, 64), jnp.bfloat16)
  assert not gpu.cudnn_applies(q.astype(jnp.float32), q, is_causal=False, mask=None)
  assert not gpu.cudnn_applies(q, q, is_causal=False, mask=jnp.ones((1, 1, 64, 64), bool))
  assert not gpu.cudnn_applies(q, q, is_causal=False, mask=None)  # this machine has no GPU


def test_the_cpu_compiler_option_applies_on_a_cpu_only(monkeypatch):
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  assert formulations.compiler_options() == formulations.cpu.COMPILER_OPTIONS
  with formulations.use('gpu'):
    assert formulations.compiler_options() == {}
  name = next(iter(formulations.cpu.COMPILER_OPTIONS))
  monkeypatch.setenv('XLA_FLAGS', f'--{name}=default')  # the user's choice stands
  assert formulations.compiler_options() == {}


def test_jit_compiles_with_the_options_and_lowers(monkeypatch):
  seen = []
  real_jit = jax.jit
  monkeypatch.setattr(formulations.jax, 'jit', lambda fn, **kw: seen.append(kw) or real_jit(fn, **kw))
  double = formulations.jit(lambda x, n: x * n, static_argnums=1)
  assert not seen  # nothing decided at definition (import) time
  np.testing.assert_array_equal(double(jnp.ones(3), 2), 2 * np.ones(3))
  assert double.lower(jnp.ones(3), 3).compile()(jnp.ones(3)).tolist() == [3.0] * 3
  assert seen == [dict(compiler_options=formulations.compiler_options(), static_argnums=1)]
  # Inside another jit's trace (which compiles with its own options): a plain jit.
  assert jax.jit(lambda x: double(x, 4))(jnp.ones(3)).tolist() == [4.0] * 3
  assert seen[-1] == dict(compiler_options=None, static_argnums=1)


def test_an_unknown_backend_is_refused():
  with pytest.raises(ValueError, match="formulations for 'cuda'"):
    with formulations.use('cuda'):
      pass


def test_adamw_keeps_its_first_moment_in_the_dtype_the_config_names():
  config = ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=0, schedule='constant',
                                          grad_clip=1.0, b1=0.9, b2=0.999, eps=1e-8,
                                          weight_decay=0.0, mu_dtype='bfloat16'))
  params = {'w': jnp.ones((4, 4))}
  state = state_lib.make_optimizer(config, 10).init(params)
  has_moments = lambda s: hasattr(s, 'mu')
  adam = next(filter(has_moments, jax.tree.leaves(state, is_leaf=has_moments)))
  assert adam.mu["w"].dtype == jnp.bfloat16 and adam.nu['w'].dtype == jnp.float32
