r"""What the SD 1.5 reflow training step keeps for its backward pass on a GPU, per remat
policy: the bytes of the saved residuals (jax's saved_residuals over the loss's gradient),
by category. Traced only: no device, nothing materialised.

  JAX_PLATFORMS=cpu .venv/bin/python -m benchmarks.residuals [--batch_size=8] [--out=r.json]

The step is configs/sd15_reflow.py's `reflow` stage (bf16 compute, float32 params,
caption dropout, the flow-matching loss on (x0, x1) pairs), traced with the GPU's
formulations (models/formulations). cuDNN's attention cannot be traced without a GPU; a
stand-in with exactly its residuals (q, k, v, the output, the float32 log-sum-exp) takes
its place wherever the rule jax applies on a Hopper GPU holds (bf16/fp16, head dim at most
256 and a multiple of 8, no mask). The params themselves (arguments, in memory anyway)
are counted apart from the residuals the step adds.
"""
import argparse
import collections
import functools
import json
import math
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax._src import ad_checkpoint  # saved_residuals: jax.ad_checkpoint.print_saved_residuals' data

from configs import sd15_reflow
from instaflow_jax import sampling
from instaflow_jax.models import formulations
from instaflow_jax.models.formulations import gpu
from instaflow_jax.models.formulations import portable
from instaflow_jax.models.unet import REMAT_POLICIES
from instaflow_jax.models.unet import UNet2DConditionModel
from instaflow_jax.models.unet import UNetConfig
from instaflow_jax.training import flow_loss

# SD 1.5's unet/config.json differs from diffusers' defaults only here.
SD15_UNET = UNetConfig(sample_size=64, cross_attention_dim=768)
GIB = 2 ** 30


def hopper_cudnn_applies(query, key, *, is_causal, mask) -> bool:
  """jax's check_is_flash_attention for bf16/fp16 on compute capability 9.0."""
  head_dim = query.shape[-1]
  return (mask is None and query.dtype in (jnp.bfloat16, jnp.float16)
          and head_dim <= 256 and head_dim % 8 == 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def cudnn_stand_in(query, key, value, is_causal=False):
  return portable.attention(query, key, value, is_causal=is_causal)


def _stand_in_forward(query, key, value, is_causal):
  out = portable.attention(query, key, value, is_causal=is_causal)
  batch, length, heads, _ = query.shape
  log_sum_exp = jnp.zeros((batch, heads, length), jnp.float32)  # its shape and dtype only
  return out, (query, key, value, out, log_sum_exp)


def _stand_in_backward(is_causal, residuals, grad):
  query, key, value = residuals[:3]
  return jax.vjp(lambda q, k, v: portable.attention(q, k, v, is_causal=is_causal),
                 query, key, value)[1](grad)


cudnn_stand_in.defvjp(_stand_in_forward, _stand_in_backward)


def abstract_step_inputs(config, batch_size: int, policy: str):
  train = config.reflow
  unet = UNet2DConditionModel(SD15_UNET, dtype=jnp.dtype(config.model.compute_dtype),
                              remat_policy=policy)
  params = nn.meta.unbox(jax.eval_shape(unet.init, jax.random.key(0),
                                        *unet.example_inputs())['params'])
  # Small concrete inputs (the params stay abstract): the gradient is the params' only.
  frozen = {'null_embeds': jnp.zeros((1, 77, 768), jnp.float32)}
  latents = jnp.zeros((batch_size, 64, 64, 4), jnp.float32)
  batch = {'x0': latents, 'latents': latents,
           'text_embeds': jnp.zeros((batch_size, 77, 768), jnp.float32)}
  loss_fn = flow_loss.flow_matching_loss(sampling.PipelineModules(unet, None, None), train)
  # A step that does not log: text_use's extra forward passes keep nothing for the gradient.
  loss = lambda params: loss_fn(params, frozen, batch, jax.random.key(0), jnp.int32(0))[0]
  return loss, params


def category(source: str) -> str:
  """A residual's kind, from what saved_residuals says made it: the primitive and the
  function it was traced in (the last parenthesised name)."""
  if source.startswith('from the argument'):
    return 'params (arguments)'
  function = source.rsplit('(', 1)[-1].rstrip(')') if '(' in source else ''
  if source.startswith('output of convert_element_type') and function in ('conv', 'linear'):
    return 'bf16 copies of the weights'
  if 'stand_in' in function or function.startswith(('Attention.', 'attention')):
    return 'attention (q, k, v, out, lse)'
  if function.endswith('normalise'):
    return 'GroupNorm / LayerNorm intermediates'
  if function in ('_geglu', 'activation.<locals>.<lambda>'):
    return 'GEGLU feed-forward'
  return 'other (block outputs, skips, convolution inputs)'


def residual_bytes(config, batch_size: int, policy: str) -> dict:
  loss, params = abstract_step_inputs(config, batch_size, policy)
  with formulations.use('gpu'), \
       mock.patch.object(gpu, 'cudnn_applies', hopper_cudnn_applies), \
       mock.patch.object(gpu, 'cudnn_attention', cudnn_stand_in):
    residuals = ad_checkpoint.saved_residuals(loss, params)
  sizes = collections.Counter()
  for aval, source in residuals:
    sizes[category(source)] += math.prod(aval.shape) * aval.dtype.itemsize
  return dict(sizes)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--policies', default=','.join(REMAT_POLICIES))
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  config = sd15_reflow.get_config('')
  print(f'SD 1.5 reflow training step, batch {args.batch_size}, '
        f'{config.model.compute_dtype} compute, GPU formulations; GiB of saved residuals')
  results = {}
  for policy in args.policies.split(','):
    sizes = residual_bytes(config, args.batch_size, policy)
    added = sum(v for k, v in sizes.items() if k != 'params (arguments)')
    results[policy] = dict(sizes, total_added=added)
    print(f'\nremat_policy={policy}: {added / GIB:.2f} GiB added to the params')
    for name, size in sorted(sizes.items(), key=lambda item: -item[1]):
      print(f'  {name:40s} {size / GIB:8.2f}')
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(dict(batch_size=args.batch_size, bytes=results), f, indent=2)


if __name__ == '__main__':
  main()
