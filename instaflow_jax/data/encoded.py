"""The encode stage's shards: each example's VAE latent distribution and text states.

Shards of the encode stage (data/shards.py): msgpack records {'index', 'latent_mean',
'latent_std', 'text_embeds'}, the autoencoder's Gaussian (unscaled, so that a training
step samples a new latent from it each time, as it does from images) and the text
encoder's last hidden state of the example's caption. meta.json records the source, the
image preparation and the shapes.
"""
from typing import Any, Mapping, Sequence

import numpy as np
from flax import serialization

from instaflow_jax.data import shards
from instaflow_jax.data.input import Batch
from instaflow_jax.data.input import IndexedInput

KIND = 'encode'
FIELDS = ('latent_mean', 'latent_std', 'text_embeds')
DTYPES = ('float32', 'float16')  # how the records store them


def check_compatible(meta: Mapping[str, Any], latent_shape: Sequence[int],
                     text_shape: Sequence[int], encoded_dir: str) -> None:
  """Refuses encoded data whose latents or text states do not fit the model being trained."""
  for what, stored, expected in (('latents', meta['latent_shape'], latent_shape),
                                 ('text states', meta['text_shape'], text_shape)):
    if list(stored) != list(expected):
      raise ValueError(f'encoded data in {encoded_dir} has {what} of shape {tuple(stored)} but '
                       f'the model takes {tuple(expected)}: it was encoded for another model; '
                       'run stage encode again in another workdir')


class EncodedInput(IndexedInput):
  """Batches {'latent_mean', 'latent_std', 'text_embeds'} (float32) of encoded examples,
  in the order an ImageTextInput of the same length and seed gives the images."""

  def __init__(self, encoded_dir: str, **kwargs):
    meta, source = shards.open_shards(encoded_dir, KIND)
    super().__init__(source, **kwargs)
    self.meta = meta

  def make_batch(self, examples, epochs, indices) -> Batch:
    records = [serialization.msgpack_restore(example) for example in examples]
    return {key: np.stack([r[key] for r in records]).astype(np.float32) for key in FIELDS}
