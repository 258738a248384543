"""Building blocks shared by every network: layers with logical axis names, norms, attention,
and the convolutional blocks (resnet, down/up-samplers) that the U-Net and the VAE share.

Every parameter is created through `nn.with_logical_partitioning`, so a model can be
sharded later by mapping logical names (below) to mesh axes, without touching the model.
Module names mirror the diffusers/transformers module tree, which is what makes
conversion a rename rule (see instaflow_jax/convert/torch_names.py).

Logical parameter axes used across the package:
  embed      the model width entering a dense layer
  mlp        the width leaving a dense layer
  conv_in    input channels of a convolution
  conv_out   output channels of a convolution
  norm       the channel axis of a norm's scale/bias
  vocab      rows of an embedding table
"""
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from instaflow_jax.models import cpu_kernels

Dtype = Any
# Padding given as torch's symmetric integer padding, or explicit (low, high) pairs per spatial dim.
Padding = Any


def _with_axes(init, axes: Tuple[Optional[str], ...]):
  return nn.with_logical_partitioning(init, axes)


def dense(features: int, name: str, *, use_bias: bool = True, dtype: Dtype = jnp.float32,
          param_dtype: Dtype = jnp.float32,
          axes: Tuple[Optional[str], Optional[str]] = ('embed', 'mlp')) -> 'Dense':
  """A linear layer (torch nn.Linear); `axes` names the (in, out) kernel dimensions."""
  return Dense(features, use_bias, axes, dtype, param_dtype, name=name)


class Dense(nn.Module):
  """nn.Dense's parameters (kernel [in, out], bias) and result, the kernel's gradient
  computed after the input's (kernel_grad_after_input_grad)."""
  features: int
  use_bias: bool = True
  axes: Tuple[Optional[str], Optional[str]] = ('embed', 'mlp')
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', _with_axes(nn.initializers.lecun_normal(), self.axes),
                        (x.shape[-1], self.features), self.param_dtype)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    y = kernel_grad_after_input_grad(jnp.matmul)(x, kernel)
    if self.use_bias:
      bias = self.param('bias', _with_axes(nn.initializers.zeros_init(), (self.axes[1],)),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


def conv(features: int, name: str, *, kernel_size: int = 3, strides: int = 1,
         padding: Padding = None, use_bias: bool = True, upsampled_2x: bool = False,
         dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> 'Conv':
  """A 2-D convolution on NHWC input (torch nn.Conv2d); padding defaults to 'same' for odd
  kernels. With upsampled_2x, of the input up-sampled 2x (nearest) first."""
  if padding is None:
    padding = kernel_size // 2
  if isinstance(padding, int):
    padding = ((padding, padding), (padding, padding))
  return Conv(features, kernel_size, strides, tuple(map(tuple, padding)), use_bias,
              upsampled_2x, dtype, param_dtype, name=name)


def _on_cpu() -> bool:
  """Some formulations below are chosen per backend: XLA's CPU kernels are not cuDNN's."""
  return jax.default_backend() == 'cpu'


def recomputed_in_backward(fn, forward_fn=None):
  """fn(x, *params), with a backward pass that keeps only the inputs and recomputes fn's
  intermediates from them: for the cheap elementwise chains (norms, activations) whose
  every intermediate autodiff would otherwise keep until the backward pass. `forward_fn`,
  if given, computes the same values faster (a kernel with no gradient of its own).

  Not jax.checkpoint: XLA:CPU drops its optimization barriers before scheduling, merges
  the recomputation with the forward pass and keeps the intermediates after all. Here the
  recomputation starts from x tied to the incoming gradient (`_after`)."""
  forward_fn = forward_fn or fn

  @jax.custom_vjp
  def apply(*args):
    return forward_fn(*args)

  def forward(*args):
    return forward_fn(*args), args

  def backward(args, grad):
    return jax.vjp(fn, _after(args[0], grad), *args[1:])[1](grad)

  apply.defvjp(forward, backward)
  return apply


def kernel_grad_after_input_grad(op):
  """op(x, kernel), whose backward pass computes the kernel's gradient after the input's.

  The optimizer writes a donated kernel's update over the kernel once its gradient exists.
  XLA orders that write after the backward pass's read of the kernel (for the input's
  gradient) only where the one depends on the other; elsewhere it copies the kernel at the
  start of the step and keeps the copy to the end (a second copy of every weight). The
  inputs are tied to the incoming gradient too: XLA otherwise prepares their layouts for
  the backward convolutions (flipped kernels, transposed activations) in the forward pass
  and keeps them."""
  @jax.custom_vjp
  def apply(x, kernel):
    return op(x, kernel)

  def forward(x, kernel):
    return op(x, kernel), (x, kernel)

  def backward(inputs, grad):
    inputs = tuple(_after(t, grad) for t in inputs)
    grad_x, grad_kernel = jax.vjp(op, *inputs)[1](grad)
    return grad_x, _after(grad_kernel, grad_x)

  apply.defvjp(forward, backward)
  return apply


def _after(x: jax.Array, grad: jax.Array) -> jax.Array:
  """x, made to depend on `grad` (plus 0 times one of its elements: exact for a finite
  gradient), so that XLA computes nothing from it before the gradient exists."""
  return x + (0 * grad[(0,) * grad.ndim]).astype(x.dtype)


# At or below this many output pixels per image, XLA's CPU convolution is many times slower
# than one matmul on the gathered patches, forward and backward; from 4x4 up the library
# convolution wins (benchmarks/README.md).
_CPU_MATMUL_CONV_MAX_PIXELS = 4


def _conv_output_size(size: int, kernel: int, stride: int, padding: Tuple[int, int]) -> int:
  return (size + sum(padding) - kernel) // stride + 1


def _conv_as_matmul(x: jax.Array, kernel: jax.Array, strides: Tuple[int, int],
                    padding: Tuple[Tuple[int, int], Tuple[int, int]]) -> jax.Array:
  """The convolution as one matmul: the kh*kw shifted (strided) views of the padded input,
  concatenated on channels in the kernel's HWIO order."""
  kh, kw, cin, cout = kernel.shape
  out_h = _conv_output_size(x.shape[1], kh, strides[0], padding[0])
  out_w = _conv_output_size(x.shape[2], kw, strides[1], padding[1])
  x = jnp.pad(x, ((0, 0),) + padding + ((0, 0),))
  views = [jax.lax.slice(x, (0, i, j, 0),
                         (x.shape[0], i + strides[0] * (out_h - 1) + 1,
                          j + strides[1] * (out_w - 1) + 1, cin), (1,) + strides + (1,))
           for i in range(kh) for j in range(kw)]
  return jnp.dot(jnp.concatenate(views, axis=-1), kernel.reshape(kh * kw * cin, cout))


def _conv2d(x: jax.Array, kernel: jax.Array, strides: Tuple[int, int],
            padding: Tuple[Tuple[int, int], Tuple[int, int]]) -> jax.Array:
  """XLA's convolution (NHWC, HWIO); on a CPU over a few output pixels, one matmul."""
  out_pixels = (_conv_output_size(x.shape[1], kernel.shape[0], strides[0], padding[0])
                * _conv_output_size(x.shape[2], kernel.shape[1], strides[1], padding[1]))
  if _on_cpu() and out_pixels <= _CPU_MATMUL_CONV_MAX_PIXELS:
    return _conv_as_matmul(x, kernel, strides, padding)
  return jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _nearest_2x_taps(kernel: jax.Array, axis: int) -> Tuple[jax.Array, jax.Array]:
  """A 3-tap kernel axis seen from the input of a 2x nearest up-sampling: even outputs take
  input pixels (i - 1, i) with taps (k0, k1 + k2), odd outputs (i, i + 1) with (k0 + k1, k2)."""
  k0, k1, k2 = jnp.split(kernel, 3, axis=axis)
  return jnp.concatenate([k0, k1 + k2], axis), jnp.concatenate([k0 + k1, k2], axis)


def _conv_of_nearest_2x(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """The 3x3 'same' convolution of upsample_nearest_2x(x), without making the up-sampled
  input: each of the four output phases (row and column parity) is a 2x2 convolution of x
  with the taps that fall on the same input pixel added (4 taps where there were 9: faster
  on a CPU, with and without the gradients, at the VAE's and U-Net's shapes)."""
  batch, height, width, _ = x.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  rows = []
  for a, row_kernel in enumerate(_nearest_2x_taps(kernel, 0)):
    phases = [_conv2d(padded[:, a:a + height + 1, b:b + width + 1], phase_kernel, (1, 1),
                      ((0, 0), (0, 0)))
              for b, phase_kernel in enumerate(_nearest_2x_taps(row_kernel, 1))]
    rows.append(jnp.stack(phases, axis=3))  # [batch, height, width, column parity, out]
  interleaved = jnp.stack(rows, axis=2)  # [batch, height, row parity, width, col parity, out]
  return interleaved.reshape(batch, 2 * height, 2 * width, kernel.shape[-1])


class Conv(nn.Module):
  """nn.Conv's parameters (kernel HWIO, bias) and result; on a CPU, convolutions over a few
  pixels run as a matmul (see _CPU_MATMUL_CONV_MAX_PIXELS), and those of a 2x nearest
  up-sampled input as four smaller ones on the input (_conv_of_nearest_2x)."""
  features: int
  kernel_size: int
  strides: int
  padding: Tuple[Tuple[int, int], Tuple[int, int]]
  use_bias: bool = True
  upsampled_2x: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = self.param(
        'kernel', _with_axes(nn.initializers.lecun_normal(), (None, None, 'conv_in', 'conv_out')),
        (k, k, x.shape[-1], self.features), self.param_dtype)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    strides = (self.strides, self.strides)
    same_3x3 = k == 3 and strides == (1, 1) and self.padding == ((1, 1), (1, 1))
    if self.upsampled_2x and _on_cpu() and same_3x3:
      convolve = _conv_of_nearest_2x
    elif self.upsampled_2x:
      convolve = lambda x, kernel: _conv2d(upsample_nearest_2x(x), kernel, strides, self.padding)
    else:
      convolve = lambda x, kernel: _conv2d(x, kernel, strides, self.padding)
    y = kernel_grad_after_input_grad(convolve)(x, kernel)
    if self.use_bias:
      bias = self.param('bias', _with_axes(nn.initializers.zeros_init(), ('conv_out',)),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


def group_norm(num_groups: int, epsilon: float, name: str, *, activation: Optional[str] = None,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> 'GroupNorm':
  """torch nn.GroupNorm over the channel (last) axis, then `activation` if given."""
  return GroupNorm(num_groups, epsilon, activation, dtype, param_dtype, name=name)


class GroupNorm(nn.Module):
  """nn.GroupNorm's parameters (scale, bias) and torch's result: statistics in float32 with
  the two-pass variance (the fast variance loses parity), then `activation` if given. The
  backward pass recomputes it from the input (recomputed_in_backward), keeping one tensor
  where autodiff kept four.

  The sums run over the pixels first, then over each group's channels: XLA on a CPU runs
  nn.GroupNorm's one reduction over the (pixels, group channels) axes slower than these
  two, forward and backward. On a CPU the forward pass is the C++ kernel where it applies
  (float32, channels a multiple of 16, no activation or SiLU), faster than XLA's five
  passes (benchmarks/README.md).
  """
  num_groups: int
  epsilon: float
  activation: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    if channels % self.num_groups:
      raise ValueError(f'{self.name}: {channels} channels do not divide into '
                       f'{self.num_groups} groups')
    scale = self.param('scale', _with_axes(nn.initializers.ones_init(), ('norm',)),
                       (channels,), self.param_dtype)
    bias = self.param('bias', _with_axes(nn.initializers.zeros_init(), ('norm',)),
                      (channels,), self.param_dtype)
    per_group = channels // self.num_groups
    act = activation(self.activation) if self.activation else (lambda y: y)

    def normalise(x, scale, bias):
      flat = x.astype(jnp.float32).reshape(x.shape[0], -1, channels)
      count = flat.shape[1] * per_group

      def group_mean(values):  # [batch, pixels, channels] -> [batch, 1, channels]
        sums = jnp.sum(values, axis=1).reshape(x.shape[0], self.num_groups, per_group)
        return jnp.repeat(jnp.sum(sums, axis=-1) / count, per_group, axis=-1)[:, None, :]

      centred = flat - group_mean(flat)
      inv_std = jax.lax.rsqrt(group_mean(jnp.square(centred)) + self.epsilon)
      y = centred * (inv_std * scale.astype(jnp.float32)) + bias.astype(jnp.float32)
      return act(y.reshape(x.shape).astype(self.dtype))

    kernel = None
    if (_on_cpu() and x.dtype == self.dtype == scale.dtype == jnp.float32
        and cpu_kernels.group_norm_applies(channels, self.activation)):
      kernel = lambda x, scale, bias: cpu_kernels.group_norm(
          x, scale, bias, self.num_groups, self.epsilon, self.activation is not None)
    return recomputed_in_backward(normalise, kernel)(x, scale, bias)


def layer_norm(epsilon: float, name: str, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32) -> 'LayerNorm':
  """torch nn.LayerNorm over the last axis."""
  return LayerNorm(epsilon, dtype, param_dtype, name=name)


class LayerNorm(nn.Module):
  """nn.LayerNorm's parameters (scale, bias) and torch's result: float32 statistics, the
  two-pass variance. The backward pass recomputes it from the input
  (recomputed_in_backward)."""
  epsilon: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param('scale', _with_axes(nn.initializers.ones_init(), ('norm',)),
                       (features,), self.param_dtype)
    bias = self.param('bias', _with_axes(nn.initializers.zeros_init(), ('norm',)),
                      (features,), self.param_dtype)

    def normalise(x, scale, bias):
      x = x.astype(jnp.float32)
      centred = x - jnp.mean(x, axis=-1, keepdims=True)
      inv_std = jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
                              + self.epsilon)
      y = centred * inv_std * scale.astype(jnp.float32) + bias.astype(jnp.float32)
      return y.astype(self.dtype)

    return recomputed_in_backward(normalise)(x, scale, bias)


def embedding(num_embeddings: int, features: int, name: str, *, dtype: Dtype = jnp.float32,
              param_dtype: Dtype = jnp.float32) -> nn.Embed:
  """torch nn.Embedding."""
  return nn.Embed(
      num_embeddings, features, dtype=dtype, param_dtype=param_dtype,
      embedding_init=_with_axes(nn.initializers.normal(stddev=0.02), ('vocab', 'embed')),
      name=name)


def activation(name: str):
  """The activation functions that diffusers/transformers configs name."""
  fns = {
      'silu': nn.silu,
      'swish': nn.silu,
      'gelu': lambda x: nn.gelu(x, approximate=False),
      'gelu_pytorch_tanh': lambda x: nn.gelu(x, approximate=True),
      'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),
      'relu': nn.relu,
  }
  if name not in fns:
    raise ValueError(f'activation {name!r} is not supported; use one of {sorted(fns)}')
  return fns[name]


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                          is_causal: bool = False, mask: Optional[jax.Array] = None) -> jax.Array:
  """Multi-head attention on [batch, length, heads, head_dim] tensors, softmax in float32.

  On GPU/TPU, jax.nn.dot_product_attention (the fused cuDNN kernel where it applies); on a
  CPU, _attention_on_cpu. `mask` (boolean, broadcastable to [batch, heads, q_length,
  kv_length]) marks the keys that may be seen.
  """
  if _on_cpu():
    return _attention_on_cpu(query, key, value, is_causal, mask)
  return jax.nn.dot_product_attention(query, key, value, mask=mask, is_causal=is_causal)


def _attention_on_cpu(query: jax.Array, key: jax.Array, value: jax.Array, is_causal: bool,
                      mask: Optional[jax.Array]) -> jax.Array:
  """The C++ kernel (cpu_kernels) where it applies: no mask, a head dim that is a multiple
  of 4, and a machine that can build it. Otherwise _xla_attention_on_cpu."""
  if mask is None and not is_causal and cpu_kernels.attention_applies(query.shape[-1]):
    q, k, v = (t.astype(jnp.float32) for t in (query, key, value))
    return cpu_kernels.attention(q, k, v).astype(query.dtype)
  return _xla_attention_on_cpu(query, key, value, is_causal, mask)


def _xla_attention_on_cpu(query: jax.Array, key: jax.Array, value: jax.Array, is_causal: bool,
                          mask: Optional[jax.Array]) -> jax.Array:
  """Heads-major matmuls in float32, the softmax normalised after the value matmul, and a
  backward pass that recomputes the [q, kv] weights (see _cpu_attention_backward) instead
  of keeping them. Under XLA on a CPU it is faster than jax.nn.dot_product_attention,
  forward and backward, and the training step keeps no [batch, heads, q, kv] tensor per
  layer (benchmarks/README.md)."""
  if is_causal:
    causal = jnp.tril(jnp.ones((query.shape[1], key.shape[1]), bool))
    mask = causal if mask is None else jnp.logical_and(mask, causal)
  q, k, v = (_heads_major(t.astype(jnp.float32)) for t in (query, key, value))
  return _heads_major(_cpu_attention(q, k, v, mask)).astype(query.dtype)


def _heads_major(t: jax.Array) -> jax.Array:
  """[batch, length, heads, dim] <-> [batch, heads, length, dim]."""
  return jnp.swapaxes(t, 1, 2)


def _masked(scores: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
  return scores if mask is None else jnp.where(mask, scores, jnp.finfo(scores.dtype).min)


@jax.custom_vjp
def _cpu_attention(q, k, v, mask):
  """[batch, heads, length, dim] float32 in and out."""
  return _cpu_attention_forward(q, k, v, mask)[0]


def _cpu_attention_forward(q, k, v, mask):
  # The scale goes into q ([q, dim]), not into the [q, kv] scores: XLA:CPU materialises a
  # broadcast scale for a fused matmul.
  q = q * (q.shape[-1] ** -0.5)
  scores = _masked(jnp.matmul(q, jnp.swapaxes(k, -1, -2)), mask)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  weights = jnp.exp(scores - row_max)
  row_sum = jnp.sum(weights, axis=-1, keepdims=True)
  out = jnp.matmul(weights, v) / row_sum
  return out, (q, k, v, out, row_max + jnp.log(row_sum), mask)


def _cpu_attention_backward(residuals, g):
  """Flash attention's backward without the blocking: the weights are recomputed from the
  scaled q, k and the saved log-sum-exp.

  q is tied to the incoming gradient (`_after`): XLA:CPU drops optimization barriers before
  scheduling, and would otherwise merge the recomputed q k^T with the forward's and keep
  every layer's [q, kv] weights from the forward pass to the end of the backward. The
  barrier on dk^T, dv^T does hold against the algebraic simplifier: it keeps their
  transposes out of the matmuls, which then run several times slower (a contraction over
  the weights' major axis)."""
  q, k, v, out, log_sum, mask = residuals
  q = _after(q, g)
  weights = jnp.exp(_masked(jnp.matmul(q, jnp.swapaxes(k, -1, -2)), mask) - log_sum)
  grad_weights = jnp.matmul(g, jnp.swapaxes(v, -1, -2))
  grad_scores = weights * (grad_weights - jnp.sum(g * out, axis=-1, keepdims=True))
  grad_q = jnp.matmul(grad_scores, k) * (q.shape[-1] ** -0.5)
  grad_k_t = jnp.einsum('bhqd,bhqk->bhdk', q, grad_scores)
  grad_v_t = jnp.einsum('bhqd,bhqk->bhdk', g, weights)
  grad_k_t, grad_v_t = jax.lax.optimization_barrier((grad_k_t, grad_v_t))
  return grad_q, jnp.swapaxes(grad_k_t, -1, -2), jnp.swapaxes(grad_v_t, -1, -2), None


_cpu_attention.defvjp(_cpu_attention_forward, _cpu_attention_backward)


class Attention(nn.Module):
  """diffusers' `Attention` (to_q, to_k, to_v, to_out.0) on [batch, tokens, channels].

  Self-attention when `context` is None, cross-attention otherwise.
  """
  heads: int
  head_dim: int
  out_features: int
  qkv_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: Optional[jax.Array] = None) -> jax.Array:
    context = x if context is None else context
    inner = self.heads * self.head_dim
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q = dense(inner, 'to_q', use_bias=self.qkv_bias, **kw)(x)
    k = dense(inner, 'to_k', use_bias=self.qkv_bias, **kw)(context)
    v = dense(inner, 'to_v', use_bias=self.qkv_bias, **kw)(context)
    split = lambda t: t.reshape(t.shape[:-1] + (self.heads, self.head_dim))
    out = dot_product_attention(split(q), split(k), split(v))
    out = out.reshape(out.shape[:-2] + (inner,))
    return dense(self.out_features, 'to_out_0', axes=('mlp', 'embed'), **kw)(out)


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
  """torch F.interpolate(scale_factor=2, mode='nearest') on NHWC."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source rows of torch's nearest interpolation to an explicit size (float32 scale)."""
  scale = np.float32(in_size) / np.float32(out_size)
  index = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int32)
  return np.minimum(index, in_size - 1)


def upsample_nearest(x: jax.Array, size: Tuple[int, int]) -> jax.Array:
  """torch F.interpolate(mode='nearest') of NHWC `x` to spatial `size`.

  diffusers' U-Net forces the size of its skip connection when the input size is not a
  multiple of the total down-sampling factor; otherwise it is exactly 2x.
  """
  if tuple(size) == (2 * x.shape[1], 2 * x.shape[2]):
    return upsample_nearest_2x(x)
  for axis, out_size in zip((1, 2), size):
    x = jnp.take(x, _nearest_indices(x.shape[axis], out_size), axis=axis)
  return x


class ResnetBlock2D(nn.Module):
  """diffusers' ResnetBlock2D (no dropout): norm1, act, conv1, [+ time_emb_proj(act(temb))],
  norm2, act, conv2; a 1x1 conv_shortcut when the width changes; (shortcut + h) /
  output_scale_factor.

  Called without `temb`, it has no time_emb_proj (diffusers' temb_channels=None), as in the VAE.
  """
  out_channels: int
  groups: int
  eps: float
  act_fn: str
  output_scale_factor: float = 1.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: Optional[jax.Array] = None) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name: group_norm(self.groups, self.eps, name, activation=self.act_fn, **kw)
    h = conv(self.out_channels, 'conv1', **kw)(norm('norm1')(x))
    if temb is not None:
      temb = activation(self.act_fn)(temb)
      h = h + dense(self.out_channels, 'time_emb_proj', **kw)(temb)[:, None, None, :]
    h = norm('norm2')(h)
    h = conv(self.out_channels, 'conv2', **kw)(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 'conv_shortcut', kernel_size=1, **kw)(x)
    return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
  """A stride-2 3x3 conv; torch padding 0 means diffusers' explicit (0, 1) bottom/right pad."""
  out_channels: int
  padding: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    padding = self.padding if self.padding else ((0, 1), (0, 1))
    return conv(self.out_channels, 'conv', strides=2, padding=padding, dtype=self.dtype,
                param_dtype=self.param_dtype)(x)


class Upsample2D(nn.Module):
  """Nearest up-sampling to `size` (exactly 2x when None, like diffusers' output_size), then a
  3x3 conv."""
  out_channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, size: Optional[Tuple[int, int]] = None) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if size is None or tuple(size) == (2 * x.shape[1], 2 * x.shape[2]):
      return conv(self.out_channels, 'conv', upsampled_2x=True, **kw)(x)
    return conv(self.out_channels, 'conv', **kw)(upsample_nearest(x, size))


def tuple_of(value: Any, length: int) -> Tuple[Any, ...]:
  """A per-block setting given as one value or a sequence, as a tuple of `length`."""
  if isinstance(value, Sequence) and not isinstance(value, str):
    if len(value) != length:
      raise ValueError(f'expected {length} per-block values, got {len(value)}: {value}')
    return tuple(value)
  return (value,) * length
