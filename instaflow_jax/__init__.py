"""InstaFlow in JAX/Flax: rectified flow, reflow, one-step distillation, sampling, conversion."""
