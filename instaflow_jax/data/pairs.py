"""Reflow pair shards: (X0 noise, X1 = teacher ODE(X0 | text), caption tokens) on disk.

Pair i lives in shard i // shard_size. A shard is an ArrayRecord file of msgpack records
{'index', 'x0', 'x1', 'input_ids'}, written to a temporary name and renamed when complete,
so a shard on disk is always whole. meta.json records what made the pairs (shapes, teacher,
solver, guidance), so that a restart or a reflow stage with a different model is refused
before any compute.
"""
import json
import os
from typing import Any, Dict, List, Mapping, Sequence

import numpy as np
from array_record.python import array_record_data_source
from array_record.python import array_record_module
from flax import serialization

from instaflow_jax.data.input import Batch
from instaflow_jax.data.input import IndexedInput

META_FILE = 'meta.json'


def shard_path(pairs_dir: str, shard: int, num_shards: int) -> str:
  return os.path.join(pairs_dir, f'pairs-{shard:05d}-of-{num_shards:05d}.array_record')


def shard_ranges(num_pairs: int, shard_size: int) -> List[range]:
  return [range(start, min(start + shard_size, num_pairs))
          for start in range(0, num_pairs, shard_size)]


def write_shard(path: str, records: Sequence[Mapping[str, Any]]) -> None:
  """Writes one complete shard atomically (temporary file, then rename)."""
  tmp = path + '.tmp'
  writer = array_record_module.ArrayRecordWriter(tmp, 'group_size:1')
  for record in records:
    writer.write(serialization.msgpack_serialize(
        {k: np.asarray(v) for k, v in record.items()}))
  writer.close()
  os.replace(tmp, path)


def write_meta(pairs_dir: str, meta: Mapping[str, Any]) -> None:
  """Writes meta.json, or checks that the one there describes the same pairs."""
  path = os.path.join(pairs_dir, META_FILE)
  if os.path.exists(path):
    existing = read_meta(pairs_dir)
    if existing != json.loads(json.dumps(meta)):
      changed = sorted(k for k in set(existing) | set(meta) if existing.get(k) != meta.get(k))
      raise ValueError(f'{pairs_dir} holds pairs made with other settings ({", ".join(changed)} '
                       'differ); delete the directory or use another workdir')
    return
  os.makedirs(pairs_dir, exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(dict(meta), f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def read_meta(pairs_dir: str) -> Dict[str, Any]:
  path = os.path.join(pairs_dir, META_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'no pairs in {pairs_dir} ({META_FILE} missing): run stage pairs first')
  with open(path) as f:
    return json.load(f)


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


def complete_shards(pairs_dir: str, num_shards: int) -> List[str]:
  paths = [shard_path(pairs_dir, j, num_shards) for j in range(num_shards)]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(f'{len(missing)} of {num_shards} pair shards are missing in '
                            f'{pairs_dir} (first: {os.path.basename(missing[0])}); finish stage '
                            'pairs first')
  return paths


class PairsInput(IndexedInput):
  """Batches {'x0', 'latents' (X1), 'input_ids'} of reflow pairs, exactly resumable."""

  def __init__(self, pairs_dir: str, **kwargs):
    meta = read_meta(pairs_dir)
    source = array_record_data_source.ArrayRecordDataSource(
        complete_shards(pairs_dir, meta['num_shards']))
    super().__init__(source, **kwargs)
    self.meta = meta

  def make_batch(self, examples, epochs, indices) -> Batch:
    records = [serialization.msgpack_restore(example) for example in examples]
    return {'x0': np.stack([r['x0'] for r in records]),
            'latents': np.stack([r['x1'] for r in records]),
            'input_ids': np.stack([r['input_ids'] for r in records]).astype(np.int32)}
