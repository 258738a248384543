r"""What the custom backward passes of the CPU formulations (models/formulations/cpu.py) save in XLA:CPU's buffers: the
temporary memory of compiled gradients and training steps, with and without each one,
from the compiled executable's memory analysis. Nothing large is run.

  JAX_PLATFORMS=cpu .venv/bin/python -m benchmarks.remat_memory

Rows: a chain of `--depth` residual layers x -> x + layer(x) differentiated (attention:
jax.nn.dot_product_attention's autodiff, our XLA formulation, the C++ kernel; GroupNorm +
SiLU: autodiff, recomputed_in_backward), and a donated SGD step of 4 dense or conv layers
(flax's nn.Dense / nn.Conv against ours, whose kernel gradient waits for the input's).
The tests check the values and what each backward pass keeps (tests/test_layers.py).
"""
import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp

from instaflow_jax.models import layers
from instaflow_jax.models.formulations import cpu

KIB = 2 ** 10


def memory(fn, *args, donate=()) -> dict:
  """Temporaries and the peak estimate (arguments + outputs - donated + temporaries)."""
  stats = jax.jit(fn, donate_argnums=donate).lower(*args).compile().memory_analysis()
  peak = (stats.argument_size_in_bytes + stats.output_size_in_bytes
          - stats.alias_size_in_bytes + stats.temp_size_in_bytes)
  return {'temp': stats.temp_size_in_bytes, 'peak': peak}


def chain_grad(layer, depth: int):
  """The gradient of `depth` layers x -> x + layer(x)."""
  def loss(x):
    for _ in range(depth):
      x = x + layer(x)
    return jnp.sum(jnp.sin(x))
  return jax.grad(loss)


def group_norm_silu(x, scale, bias):
  g = x.reshape(x.shape[0], -1, 8, x.shape[-1] // 8)
  g = (g - g.mean(axis=(1, 3), keepdims=True)) / jnp.sqrt(g.var(axis=(1, 3), keepdims=True) + 1e-5)
  return jax.nn.silu(g.reshape(x.shape) * scale + bias)


def attention_rows(depth: int, tokens: int) -> dict:
  x = jnp.ones((4, tokens, 4, 8))
  paths = {'autodiff (jax.nn.dot_product_attention)': lambda t: jax.nn.dot_product_attention(t, t, t),
           'XLA formulation, recomputing backward': lambda t: cpu.xla_attention(
               t, t, t, False, None),
           'C++ kernel': lambda t: cpu.attention(t, t, t, False, None)}
  return {name: memory(chain_grad(f, depth), x) for name, f in paths.items()}


def group_norm_rows(depth: int, size: int) -> dict:
  x = jnp.ones((4, size, size, 64))
  scale, bias = jnp.ones(64), jnp.zeros(64)
  paths = {'autodiff': group_norm_silu,
           'recomputed_in_backward': cpu.recomputed_in_backward(group_norm_silu)}
  return {name: memory(chain_grad(lambda t: f(t, scale, bias), depth), x)
          for name, f in paths.items()}


def donated_step_rows(make_layers: dict) -> dict:
  x = jnp.ones((4, 8, 8, 64))
  rows = {}
  for name, make_layer in make_layers.items():
    model = nn.Sequential([make_layer() for _ in range(4)])
    params = nn.meta.unbox(model.init(jax.random.key(0), x))

    def step(params):
      grads = jax.grad(lambda p: jnp.sum(jnp.sin(model.apply(p, x))))(params)
      return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

    rows[name] = memory(step, params, donate=(0,))
  return rows


def print_table(title: str, rows: dict) -> None:
  baseline = next(iter(rows.values()))
  print(f'\n{title}\n| variant | temporaries | peak estimate | temporaries vs first row |\n|---|---|---|---|')
  for name, row in rows.items():
    print(f'| {name} | {row["temp"] / KIB:,.0f} KiB | {row["peak"] / KIB:,.0f} KiB | '
          f'{row["temp"] / baseline["temp"]:.2f}x |')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--depth', type=int, default=6, help='layers in each differentiated chain')
  parser.add_argument('--tokens', type=int, default=256, help='attention sequence length')
  parser.add_argument('--size', type=int, default=32, help='GroupNorm input height and width')
  args = parser.parse_args()
  print(f'jax {jax.__version__}, backend {jax.default_backend()}')
  print_table(f'Attention, gradient of {args.depth} layers, batch 4, {args.tokens} tokens, '
              '4 heads of 8', attention_rows(args.depth, args.tokens))
  print_table(f'GroupNorm + SiLU, gradient of {args.depth} layers, 4x{args.size}x{args.size}x64',
              group_norm_rows(args.depth, args.size))
  print_table('Donated SGD step, 4 dense layers 64 -> 64 on 4x8x8x64',
              donated_step_rows({'flax nn.Dense': lambda: nn.Dense(64),
                                 'layers.dense': lambda: layers.dense(64, None)}))
  print_table('Donated SGD step, 4 3x3 conv layers 64 -> 64 on 4x8x8x64',
              donated_step_rows({'flax nn.Conv': lambda: nn.Conv(64, (3, 3)),
                                 'layers.conv': lambda: layers.conv(64, None)}))


if __name__ == '__main__':
  main()
