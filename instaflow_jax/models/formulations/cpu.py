"""The formulations XLA:CPU runs faster or in less memory than the plain ones
(benchmarks/README.md, "What the CPU path does"): the C++ kernels, small convolutions as one
matmul, the 2x up-sampling folded into the convolution after it, and custom backward passes
that order or recompute what XLA:CPU would otherwise keep.

XLA:CPU drops optimization barriers before scheduling, so jax.checkpoint saves nothing
there; the backward passes below use a data dependency instead (`_after`).
"""
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp

from instaflow_jax.models.formulations import cpu_kernels
from instaflow_jax.models.formulations import portable

# XLA:CPU compiles convolutions through YNNPACK by default; its own (Eigen) convolutions run
# the U-Net and the VAE decoder faster on an x86 CPU. The models' jits pass this option
# (formulations.jit), so nothing else in the process changes. Its value is XLA's default
# set of YNNPACK fusions without the convolutions (what XLA_FLAGS's
# --xla_cpu_experimental_ynn_fusion_type=-individual_convolution gives).
COMPILER_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type':
                    'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE'}

# At or below this many output pixels per image, XLA's CPU convolution is many times slower
# than one matmul on the gathered patches, forward and backward; from 4x4 up the library
# convolution wins.
_MATMUL_CONV_MAX_PIXELS = 4

Padding = portable.Padding


def _after(x: jax.Array, grad: jax.Array) -> jax.Array:
  """x, made to depend on `grad` (plus 0 times one of its elements: exact for a finite
  gradient), so that XLA computes nothing from it before the gradient exists."""
  return x + (0 * grad[(0,) * grad.ndim]).astype(x.dtype)


def recomputed_in_backward(fn: Callable, forward_fn: Optional[Callable] = None) -> Callable:
  """fn(x, *params), with a backward pass that keeps only the inputs and recomputes fn's
  intermediates from them, starting once the incoming gradient exists (`_after`): for the
  cheap elementwise chains (norms, activations) whose every intermediate autodiff would
  otherwise keep. `forward_fn`, if given, computes the same values faster (a kernel with
  no gradient of its own)."""
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


def kernel_grad_after_input_grad(op: Callable) -> Callable:
  """op(x, kernel), the kernel cast to x's dtype inside, whose backward pass computes the
  kernel's gradient after the input's.

  The optimizer writes a donated kernel's update over the kernel once its gradient exists.
  XLA orders that write after the backward pass's read of the kernel (for the input's
  gradient) only where the one depends on the other; elsewhere it copies the kernel at the
  start of the step and keeps the copy to the end (a second copy of every weight). The
  inputs are tied to the incoming gradient too: XLA otherwise prepares their layouts for
  the backward convolutions (flipped kernels, transposed activations) in the forward pass
  and keeps them. The cast is redone in the backward pass rather than kept."""
  cast_op = lambda x, kernel: op(x, kernel.astype(x.dtype))

  @jax.custom_vjp
  def apply(x, kernel):
    return cast_op(x, kernel)

  def forward(x, kernel):
    return cast_op(x, kernel), (x, kernel)

  def backward(inputs, grad):
    inputs = tuple(_after(t, grad) for t in inputs)
    grad_x, grad_kernel = jax.vjp(cast_op, *inputs)[1](grad)
    return grad_x, _after(grad_kernel, grad_x)

  apply.defvjp(forward, backward)
  return apply


def linear(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return kernel_grad_after_input_grad(jnp.matmul)(x, kernel)


def _conv_output_size(size: int, kernel: int, stride: int, padding: Tuple[int, int]) -> int:
  return (size + sum(padding) - kernel) // stride + 1


def _conv_as_matmul(x: jax.Array, kernel: jax.Array, strides: Tuple[int, int],
                    padding: Padding) -> jax.Array:
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


def conv2d(x: jax.Array, kernel: jax.Array, strides: Tuple[int, int], padding: Padding):
  """XLA's convolution; over a few output pixels, one matmul."""
  out_pixels = (_conv_output_size(x.shape[1], kernel.shape[0], strides[0], padding[0])
                * _conv_output_size(x.shape[2], kernel.shape[1], strides[1], padding[1]))
  if out_pixels <= _MATMUL_CONV_MAX_PIXELS:
    return _conv_as_matmul(x, kernel, strides, padding)
  return portable.conv2d(x, kernel, strides, padding)


def _nearest_2x_taps(kernel: jax.Array, axis: int) -> Tuple[jax.Array, jax.Array]:
  """A 3-tap kernel axis seen from the input of a 2x nearest up-sampling: even outputs take
  input pixels (i - 1, i) with taps (k0, k1 + k2), odd outputs (i, i + 1) with (k0 + k1, k2)."""
  k0, k1, k2 = jnp.split(kernel, 3, axis=axis)
  return jnp.concatenate([k0, k1 + k2], axis), jnp.concatenate([k0 + k1, k2], axis)


def _conv_of_nearest_2x(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """The 3x3 'same' convolution of upsample_nearest_2x(x), without making the up-sampled
  input: each of the four output phases (row and column parity) is a 2x2 convolution of x
  with the taps that fall on the same input pixel added (4 taps where there were 9)."""
  batch, height, width, _ = x.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  rows = []
  for a, row_kernel in enumerate(_nearest_2x_taps(kernel, 0)):
    phases = [conv2d(padded[:, a:a + height + 1, b:b + width + 1], phase_kernel, (1, 1),
                     ((0, 0), (0, 0)))
              for b, phase_kernel in enumerate(_nearest_2x_taps(row_kernel, 1))]
    rows.append(jnp.stack(phases, axis=3))  # [batch, height, width, column parity, out]
  interleaved = jnp.stack(rows, axis=2)  # [batch, height, row parity, width, col parity, out]
  return interleaved.reshape(batch, 2 * height, 2 * width, kernel.shape[-1])


def conv(x: jax.Array, kernel: jax.Array, strides: Tuple[int, int], padding: Padding,
         upsampled_2x: bool = False) -> jax.Array:
  same_3x3 = kernel.shape[:2] == (3, 3) and strides == (1, 1) and padding == ((1, 1), (1, 1))
  if upsampled_2x and same_3x3:
    convolve = _conv_of_nearest_2x
  elif upsampled_2x:
    convolve = lambda x, kernel: conv2d(portable.upsample_nearest_2x(x), kernel, strides, padding)
  else:
    convolve = lambda x, kernel: conv2d(x, kernel, strides, padding)
  return kernel_grad_after_input_grad(convolve)(x, kernel)


def group_norm(normalise: Callable, x: jax.Array, scale: jax.Array, bias: jax.Array,
               num_groups: int, epsilon: float, activation: Optional[str]) -> jax.Array:
  """normalise(x, scale, bias) recomputed in the backward pass; the forward pass is the C++
  kernel where it applies (float32 throughout, channels a multiple of 16, no activation or
  SiLU)."""
  kernel = None
  out_dtype = jax.eval_shape(normalise, x, scale, bias).dtype
  if (x.dtype == scale.dtype == out_dtype == jnp.float32
      and cpu_kernels.group_norm_applies(x.shape[-1], activation)):
    kernel = lambda x, scale, bias: cpu_kernels.group_norm(
        x, scale, bias, num_groups, epsilon, activation is not None)
  return recomputed_in_backward(normalise, kernel)(x, scale, bias)


def attention(query: jax.Array, key: jax.Array, value: jax.Array, is_causal: bool,
              mask: Optional[jax.Array]) -> jax.Array:
  """The C++ kernel where it applies (no mask, a head dim that is a multiple of 4, one
  device, a machine that can build it); otherwise xla_attention."""
  if mask is None and not is_causal and cpu_kernels.attention_applies(query.shape[-1]):
    q, k, v = (t.astype(jnp.float32) for t in (query, key, value))
    return cpu_kernels.attention(q, k, v).astype(query.dtype)
  return xla_attention(query, key, value, is_causal, mask)


def xla_attention(query: jax.Array, key: jax.Array, value: jax.Array, is_causal: bool,
                  mask: Optional[jax.Array]) -> jax.Array:
  """Heads-major matmuls in float32, the softmax normalised after the value matmul, and a
  backward pass that recomputes the [q, kv] weights (see _attention_backward) instead of
  keeping them: faster than jax.nn.dot_product_attention under XLA:CPU, and the training
  step keeps no [batch, heads, q, kv] tensor per layer."""
  if is_causal:
    causal = jnp.tril(jnp.ones((query.shape[1], key.shape[1]), bool))
    mask = causal if mask is None else jnp.logical_and(mask, causal)
  q, k, v = (portable.heads_major(t.astype(jnp.float32)) for t in (query, key, value))
  return portable.heads_major(_attention(q, k, v, mask)).astype(query.dtype)


def _masked(scores: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
  return scores if mask is None else jnp.where(mask, scores, jnp.finfo(scores.dtype).min)


@jax.custom_vjp
def _attention(q, k, v, mask):
  """[batch, heads, length, dim] float32 in and out."""
  return _attention_forward(q, k, v, mask)[0]


def _attention_forward(q, k, v, mask):
  # The scale goes into q ([q, dim]), not into the [q, kv] scores: XLA:CPU materialises a
  # broadcast scale for a fused matmul.
  q = q * (q.shape[-1] ** -0.5)
  scores = _masked(jnp.matmul(q, jnp.swapaxes(k, -1, -2)), mask)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  weights = jnp.exp(scores - row_max)
  row_sum = jnp.sum(weights, axis=-1, keepdims=True)
  out = jnp.matmul(weights, v) / row_sum
  return out, (q, k, v, out, row_max + jnp.log(row_sum), mask)


def _attention_backward(residuals, g):
  """Flash attention's backward without the blocking: the weights are recomputed from the
  scaled q, k and the saved log-sum-exp.

  q is tied to the incoming gradient (`_after`): otherwise XLA:CPU merges the recomputed
  q k^T with the forward's and keeps every layer's [q, kv] weights from the forward pass to
  the end of the backward. The barrier on dk^T, dv^T does hold against the algebraic
  simplifier: it keeps their transposes out of the matmuls, which then run several times
  slower (a contraction over the weights' major axis)."""
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


_attention.defvjp(_attention_forward, _attention_backward)
