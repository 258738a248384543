"""TPU attention: Pallas splash attention for the long self-attentions, exactly.

`splash_attention` computes what formulations.attention computes without a mask,
softmax(q k^T / sqrt(head_dim)) v on [batch, length, heads, head_dim] tensors, with the
splash kernel (jax.experimental.pallas.ops.tpu.splash_attention): the [q, kv] weights are
never stored, forward or backward. `splash_applies` says where it serves: Stable
Diffusion's self-attentions over 64x64, 32x32 and 16x16 latents (4096, 1024 and 256
tokens); the 8x8 level (64 tokens) and the cross-attention over the 77 text tokens stay on
XLA, where the weights are small.

Why the result is the XLA formulation's, up to rounding:
- The head dimension is zero-padded to a multiple of 128 (the kernel's lane width): a zero
  column adds 0 to every q.k, and the padded columns of v give output columns that are
  dropped. The gradients of the pad and the slice are exact too.
- The kernel does not scale its logits: q is multiplied by 1/sqrt(head_dim) of the
  unpadded head dimension first (one rounding in q's dtype, as q.k itself rounds).
- The kernel accumulates its softmax and output in float32, like the XLA formulation.
- Block sizes change the order of the float32 sums, not what is summed.

Off a TPU the kernel runs in Pallas interpret mode, the same code path, which is how the
tests check it on the CPU.
"""
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask
from jax.sharding import PartitionSpec as P

from instaflow_jax import parallel
from instaflow_jax.models.formulations import portable

LANES = splash_attention_kernel.NUM_LANES  # 128: lengths and head dims come in these
# Largest first: bigger blocks mean fewer passes over k and v; each divides 4096, 1024, 256.
_BLOCK_CANDIDATES = (512, 256, LANES)
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def splash_applies(query: jax.Array, key: jax.Array, *, mask: Optional[jax.Array],
                   is_causal: bool) -> bool:
  """Whether splash_attention computes this attention ([batch, length, heads, head_dim]):
  no mask and not causal, q and kv lengths multiples of 128 (the kernel's blocks tile
  them), float32 or bfloat16."""
  return (mask is None and not is_causal
          and query.shape[1] % LANES == 0 and key.shape[1] % LANES == 0
          and jnp.dtype(query.dtype) in _DTYPES and query.dtype == key.dtype)


def splash_attention(query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(head_dim)) v on [batch, length, heads, head_dim] tensors, where
  splash_applies. Under a mesh in context (jax.set_mesh) whose batch axes (the 'batch'
  rule of parallel.AXIS_RULES) divide the batch, each device computes its slice of the
  batch (shard_map); otherwise the whole batch here."""
  head_dim = query.shape[-1]
  q = _pad_head_dim(query * jnp.asarray(1 / math.sqrt(head_dim), query.dtype))
  k, v = _pad_head_dim(key), _pad_head_dim(value)
  attend = _batch_sharded(_attend_heads_major, _batch_axes(query.shape[0]))
  out = attend(*(portable.heads_major(t) for t in (q, k, v)))
  return portable.heads_major(out)[..., :head_dim]


def _attend_heads_major(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """The splash kernel over [batch, heads, length, head_dim] (head_dim a multiple of 128),
  vmapped over the batch."""
  _, heads, q_length, _ = q.shape
  kv_length = k.shape[2]
  full = splash_attention_mask.FullMask((q_length, kv_length))
  kernel = splash_attention_kernel.make_splash_mha(
      splash_attention_mask.MultiHeadMask((full,) * heads),
      block_sizes=_block_sizes(q_length, kv_length), head_shards=1, q_seq_shards=1,
      interpret=jax.default_backend() != 'tpu')
  return jax.vmap(kernel)(q, k, v)


def _block_sizes(q_length: int, kv_length: int) -> splash_attention_kernel.BlockSizes:
  """The largest candidate block that divides each length, forward and backward alike."""
  block_q, block_kv = _block(q_length), _block(kv_length)
  return splash_attention_kernel.BlockSizes(
      block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
      block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
      block_q_dq=block_q, block_kv_dq=block_kv)


def _block(length: int) -> int:
  return next(block for block in _BLOCK_CANDIDATES if length % block == 0)


def _pad_head_dim(t: jax.Array) -> jax.Array:
  """Zeros appended to the last axis, up to a multiple of 128."""
  missing = -t.shape[-1] % LANES
  return jnp.pad(t, [(0, 0)] * (t.ndim - 1) + [(0, missing)]) if missing else t


def _batch_axes(batch_size: int) -> Tuple[str, ...]:
  """The axes of the mesh in context that split a batch of `batch_size` evenly: those of
  parallel.AXIS_RULES' batch rule that the mesh has, of size above 1; none without a mesh
  or when they do not divide the batch."""
  mesh = jax.sharding.get_abstract_mesh()
  rule = dict(parallel.AXIS_RULES)[parallel.BATCH]
  axes = tuple(axis for axis in rule if axis in mesh.axis_names and mesh.shape[axis] > 1)
  ways = math.prod(mesh.shape[axis] for axis in axes)
  return axes if axes and batch_size % ways == 0 else ()


def _batch_sharded(fn, batch_axes: Tuple[str, ...]):
  """fn on each device's slice of the leading (batch) axis of its arguments and result,
  over the mesh in context; fn itself without batch axes."""
  if not batch_axes:
    return fn
  spec = P(batch_axes)
  # check_vma=False: the splash kernel's pallas_calls do not declare how their outputs vary
  # over the mesh axes, which the check requires.
  return jax.shard_map(fn, in_specs=spec, out_specs=spec, check_vma=False)
