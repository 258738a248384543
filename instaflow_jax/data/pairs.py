"""Reflow pair shards: (X0 noise, X1 = teacher ODE(X0 | text), caption tokens) on disk.

Shards of the pairs stage (data/shards.py): msgpack records {'index', 'x0', 'x1',
'input_ids'}; meta.json records what made the pairs (shapes, teacher, solver, guidance).
"""
from typing import Any, Mapping, Sequence

import numpy as np
from flax import serialization

from instaflow_jax.data import shards
from instaflow_jax.data.input import Batch
from instaflow_jax.data.input import IndexedInput

KIND = 'pairs'


def check_compatible(meta: Mapping[str, Any], latent_shape: Sequence[int], max_length: int,
                     pairs_dir: str) -> None:
  """Refuses pairs whose latents or token length do not fit the model being trained."""
  if list(meta['latent_shape']) != list(latent_shape):
    raise ValueError(f'pairs in {pairs_dir} have latents of shape {tuple(meta["latent_shape"])} '
                     f'but the model takes {tuple(latent_shape)}: they come from a different '
                     'teacher; regenerate them with stage pairs')
  if meta['max_length'] != max_length:
    raise ValueError(f'pairs in {pairs_dir} hold captions of {meta["max_length"]} tokens but the '
                     f'tokenizer makes {max_length}; regenerate them with stage pairs')


class PairsInput(IndexedInput):
  """Batches {'x0', 'latents' (X1), 'input_ids'} of reflow pairs, exactly resumable."""

  def __init__(self, pairs_dir: str, **kwargs):
    meta, source = shards.open_shards(pairs_dir, KIND)
    super().__init__(source, **kwargs)
    self.meta = meta

  def make_batch(self, examples, epochs, indices) -> Batch:
    records = [serialization.msgpack_restore(example) for example in examples]
    return {'x0': np.stack([r['x0'] for r in records]),
            'latents': np.stack([r['x1'] for r in records]),
            'input_ids': np.stack([r['input_ids'] for r in records]).astype(np.int32)}
