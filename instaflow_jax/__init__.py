"""InstaFlow in JAX/Flax: rectified flow, reflow, one-step distillation, sampling, conversion."""
import os

# XLA:CPU compiles convolutions through YNNPACK by default; its own (Eigen) convolutions run
# this project's U-Net and VAE decoder faster on an x86 CPU (benchmarks/README.md). The flag names xla_cpu_ only, so GPU/TPU code is unchanged. It takes
# effect when this package is imported before JAX's first computation; a value the user
# gives in XLA_FLAGS wins.
_CPU_XLA_FLAGS = {'xla_cpu_experimental_ynn_fusion_type': '-individual_convolution'}


def _add_default_xla_flags() -> None:
  flags = os.environ.get('XLA_FLAGS', '')
  extra = [f'--{name}={value}' for name, value in _CPU_XLA_FLAGS.items()
           if f'--{name}=' not in flags]
  if extra:
    os.environ['XLA_FLAGS'] = ' '.join(filter(None, [flags] + extra))


_add_default_xla_flags()
