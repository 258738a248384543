"""cuDNN's fused flash attention on NVIDIA GPUs, where it applies.

jax.nn.dot_product_attention runs XLA's formulation unless asked for cuDNN's; XLA's keeps
the [batch, heads, q, kv] weights for the backward pass (SD 1.5's 64x64 self-attentions:
4096 x 4096 per head), cuDNN's keeps q, k, v, the output and the log-sum-exp.
"""
import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

_HALF_DTYPES = (jnp.bfloat16, jnp.float16)


def cudnn_applies(query: jax.Array, key: jax.Array, *, is_causal: bool,
                  mask: Optional[jax.Array]) -> bool:
  """Whether cuDNN's kernel computes this attention, forward and backward: half-precision
  inputs, no mask other than causal, and shapes that the installed jax and cuDNN accept on
  this GPU (head dims and lengths: their limits depend on the cuDNN version and the compute
  capability, so jax's own checks decide)."""
  if mask is not None or query.dtype not in _HALF_DTYPES:
    return False
  return _cudnn_accepts(query.shape, key.shape, jnp.dtype(query.dtype), is_causal)


@functools.lru_cache(maxsize=None)
def _cudnn_accepts(query_shape: Tuple[int, ...], key_shape: Tuple[int, ...], dtype,
                   is_causal: bool) -> bool:
  q = jax.ShapeDtypeStruct(query_shape, dtype)
  kv = jax.ShapeDtypeStruct(key_shape[:-1] + query_shape[-1:], dtype)

  def forward_and_backward(q, k, v):
    out, vjp = jax.vjp(functools.partial(cudnn_attention, is_causal=is_causal), q, k, v)
    return vjp(out)

  try:
    jax.eval_shape(forward_and_backward, q, kv, kv)
  except (NotImplementedError, RuntimeError, ValueError, TypeError):
    return False  # no GPU, no cuDNN, or a shape or version it does not serve
  return True


def cudnn_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                    is_causal: bool = False) -> jax.Array:
  """[batch, length, heads, head_dim] in and out; softmax in float32 inside the kernel."""
  return jax.nn.dot_product_attention(query, key, value, is_causal=is_causal,
                                      implementation='cudnn')
