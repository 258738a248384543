"""Pieces of the flow-matching loss: cached inputs and caption dropout."""
import jax
import jax.numpy as jnp
import numpy as np

from instaflow_jax import sampling
from instaflow_jax.training import flow_loss


def test_cached_latents_and_embeddings_skip_the_frozen_networks():
  batch = {'latents': jnp.ones((2, 4, 4, 3)), 'text_embeds': jnp.full((2, 5, 8), 2.0)}
  # No modules and no frozen params: anything but the cached arrays would fail.
  x1, embeds = sampling.model_inputs(None, None, batch, jax.random.key(0))
  assert x1 is batch['latents'] and embeds is batch['text_embeds']


def test_caption_dropout_replaces_whole_captions_at_its_rate():
  embeds = jnp.ones((4000, 3, 2))
  null = jnp.zeros((1, 3, 2))
  dropped = flow_loss.drop_captions(embeds, null, 0.25, jax.random.key(0))
  per_example = np.asarray(dropped).reshape(4000, -1)
  assert set(np.unique(per_example.mean(axis=1))) == {0.0, 1.0}  # all or nothing
  assert abs((per_example.mean(axis=1) == 0).mean() - 0.25) < 0.03
  np.testing.assert_array_equal(flow_loss.drop_captions(embeds, null, 0.0, jax.random.key(1)),
                                embeds)


def test_text_use_compares_matched_with_shifted_captions():
  # A "model" whose loss is the distance of each example's text to its own target: zero
  # with the right captions, positive with captions shifted by one example.
  targets = jnp.arange(4.0)[:, None, None] * jnp.ones((4, 2, 3))
  loss_of = lambda embeds: jnp.mean(jnp.square(embeds - targets))
  metrics = flow_loss.text_use(loss_of, targets)
  assert set(metrics) == set(flow_loss.TEXT_USE_METRICS)
  assert metrics['text_loss_matched'] == 0.0
  np.testing.assert_allclose(metrics['text_loss_shuffled'], (1 + 1 + 1 + 9) / 4)
  assert metrics['text_use'] == 1.0
  ignored = flow_loss.text_use(lambda embeds: jnp.float32(0.5), targets)
  assert ignored['text_use'] == 0.0
