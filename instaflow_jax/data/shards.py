"""Numbered shards of records that a stage computes once and later stages read: the pairs
stage's (noise, teacher solution) pairs, the encode stage's latents and text states.

Record i lives in shard i // shard_size. A shard is an ArrayRecord file of msgpack records,
written to a temporary name and renamed when complete, so a shard on disk is always whole
and a restarted stage writes only the shards missing. meta.json records what made them
(shapes, models, settings), so that a restart with other settings, or a stage that reads
them with a different model, is refused before any compute. Process p of n writes the
shards j with j % n == p.
"""
import json
import os
import time
from typing import Any, Callable, Dict, List, Mapping, Sequence

import jax
import numpy as np
from absl import logging
from array_record.python import array_record_data_source
from array_record.python import array_record_module
from flax import serialization

META_FILE = 'meta.json'


def shard_path(stage_dir: str, kind: str, shard: int, num_shards: int) -> str:
  """Shard `shard` of a stage of `kind` ('pairs', 'encode')."""
  return os.path.join(stage_dir, f'{kind}-{shard:05d}-of-{num_shards:05d}.array_record')


def shard_ranges(count: int, shard_size: int) -> List[range]:
  return [range(start, min(start + shard_size, count)) for start in range(0, count, shard_size)]


def write_shard(path: str, records: Sequence[Mapping[str, Any]]) -> None:
  """Writes one complete shard atomically (temporary file, then rename)."""
  tmp = path + '.tmp'
  writer = array_record_module.ArrayRecordWriter(tmp, 'group_size:1')
  for record in records:
    writer.write(serialization.msgpack_serialize(
        {k: np.asarray(v) for k, v in record.items()}))
  writer.close()
  os.replace(tmp, path)


def write_meta(stage_dir: str, kind: str, meta: Mapping[str, Any]) -> None:
  """Writes meta.json, or checks that the one there describes the same records."""
  path = os.path.join(stage_dir, META_FILE)
  if os.path.exists(path):
    existing = read_meta(stage_dir, kind)
    if existing != json.loads(json.dumps(meta)):
      changed = sorted(k for k in set(existing) | set(meta) if existing.get(k) != meta.get(k))
      raise ValueError(f'{stage_dir} holds {kind} shards made with other settings '
                       f'({", ".join(changed)} differ); delete the directory or use another '
                       'workdir')
    return
  os.makedirs(stage_dir, exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(dict(meta), f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def read_meta(stage_dir: str, kind: str) -> Dict[str, Any]:
  path = os.path.join(stage_dir, META_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'no {kind} shards in {stage_dir} ({META_FILE} missing): run stage '
                            f'{kind} first')
  with open(path) as f:
    return json.load(f)


def complete_shards(stage_dir: str, kind: str, num_shards: int) -> List[str]:
  paths = [shard_path(stage_dir, kind, j, num_shards) for j in range(num_shards)]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(f'{len(missing)} of {num_shards} {kind} shards are missing in '
                            f'{stage_dir} (first: {os.path.basename(missing[0])}); finish stage '
                            f'{kind} first')
  return paths


def open_shards(stage_dir: str, kind: str):
  """(meta, random access to the records of every shard, msgpack-encoded)."""
  meta = read_meta(stage_dir, kind)
  paths = complete_shards(stage_dir, kind, meta['num_shards'])
  return meta, array_record_data_source.ArrayRecordDataSource(paths)


def read_records(stage_dir: str, kind: str) -> list:
  """Every record of the shards, decoded, in order (for tests and small sets)."""
  _, source = open_shards(stage_dir, kind)
  return [serialization.msgpack_restore(source[i]) for i in range(len(source))]


def write_missing_shards(stage_dir: str, kind: str, ranges: Sequence[range], batch_size: int,
                         make_records: Callable[[np.ndarray, np.ndarray], list], unit: str,
                         status: Callable[[], str] = str) -> Dict[str, Any]:
  """Writes this process's shards that are not on disk yet, logging the rate of `unit`s
  ('pairs', 'images') a second and the ETA.

  make_records(indices, padded): the records of `indices`, computed for `padded`, the
  indices repeated at the end to `batch_size` (one compiled program for every batch).
  status(): more to say in each progress line."""
  mine = [j for j in range(len(ranges)) if j % jax.process_count() == jax.process_index()]
  todo = [j for j in mine if not os.path.exists(shard_path(stage_dir, kind, j, len(ranges)))]
  logging.info('%s: %d of %d shards to write', kind, len(todo), len(mine))
  start, done = time.time(), 0
  total = sum(len(ranges[j]) for j in todo)
  for j in todo:
    records = []
    for first in range(ranges[j].start, ranges[j].stop, batch_size):
      indices = np.arange(first, min(first + batch_size, ranges[j].stop))
      padded = np.concatenate([indices, np.full(batch_size - len(indices), indices[-1])])
      records += make_records(indices, padded)
    write_shard(shard_path(stage_dir, kind, j, len(ranges)), records)
    done += len(records)
    elapsed = time.time() - start
    logging.info('%s: shard %d/%d written, %.1f %s/s, ETA %.0f s%s', kind, j + 1,
                 len(ranges), done / elapsed, unit, (total - done) * elapsed / done, status())
  seconds = time.time() - start
  return {'written_now': done, 'seconds': round(seconds, 1),
          f'{unit}_per_s': round(done / seconds, 2) if done else None}
