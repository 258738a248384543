"""Captioned images from files, without a dataset builder: an image folder or webdataset tars.

- An image folder, the layout diffusers' training scripts read: image files (any format
  Pillow reads) with their captions in `metadata.jsonl` (one JSON object a line,
  {"file_name": "a/b.jpg", "text": "a caption"}), in `metadata.csv` (columns file_name and
  text), or, without either, in a `.txt` file beside each image (`b.jpg` and `b.txt`).
  A caption may also be a list of captions; "caption" is read where "text" is absent.
- Webdataset tar shards, as img2dataset writes them: in each (uncompressed) tar, `KEY.jpg`
  (or .jpeg, .png, .webp) with `KEY.txt` or `KEY.json` ({"caption": ...}) beside it. Given
  as paths or glob patterns, comma-separated: '/data/laion/*.tar'.

Both are indexed once when opened (file names, tar member offsets, captions, in a sorted
order that does not depend on the file system) and read at random: example i is a fixed
(file, offset, size). An entry without an image or without a caption is left out of the
index with a warning that counts them; more than `max_bad_fraction` of them is an error.
Images are decoded when read (UnreadableImage for a corrupt file: the input pipeline skips
it) and converted to 8-bit RGB whatever their mode: grey, palette, CMYK, 16-bit; an alpha
channel is composited over white; EXIF orientation is applied.
"""
import collections
import csv
import dataclasses
import glob
import io
import json
import os
import tarfile
import time
import types
from typing import Dict, List, Sequence, Tuple

import numpy as np
from absl import logging
from PIL import Image
from PIL import ImageOps
import tensorflow_datasets as tfds

IMAGE_KEY, CAPTION_KEY = 'image', 'caption'  # the features of an example of a file source
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif', '.tif', '.tiff')
CAPTION_FIELDS = ('text', 'caption')  # the caption's field in metadata and .json, in order
METADATA_FILES = ('metadata.jsonl', 'metadata.csv')
SPLIT = 'train'  # a file source's one split, sliced as tfds slices: 'train[:-100]'


class UnreadableImage(ValueError):
  """An image file that cannot be decoded (truncated, corrupt, not an image)."""


@dataclasses.dataclass(frozen=True)
class ImageRecord:
  """Where one example's image lies (bytes [offset, offset + size) of `path`; size -1: the
  whole file) and its captions."""
  name: str
  path: str
  captions: Tuple[str, ...]
  offset: int = 0
  size: int = -1

  def read(self) -> bytes:
    with open(self.path, 'rb') as f:
      f.seek(self.offset)
      return f.read(self.size)


def _captions(value, where: str) -> Tuple[str, ...]:
  """A caption field's captions: a string, or a list of strings."""
  values = [value] if isinstance(value, str) else value
  if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
    raise ValueError(f'{where}: a caption must be a string or a list of strings, not '
                     f'{value!r}')
  return tuple(v.strip() for v in values if v.strip())


def _caption_field(entry: dict, where: str) -> Tuple[str, ...]:
  for field in CAPTION_FIELDS:
    if field in entry:
      return _captions(entry[field], where)
  return ()


def to_rgb(image: Image.Image) -> np.ndarray:
  """uint8 [H, W, 3] of any Pillow image: EXIF orientation applied, 16-bit values scaled to
  8 bits, transparency composited over white, grey/palette/CMYK converted."""
  image = ImageOps.exif_transpose(image)
  if image.mode in ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N'):  # 16-bit grey
    grey = np.asarray(image, np.float64) / 257.0
    return np.repeat(np.clip(np.rint(grey), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
  if image.mode in ('RGBA', 'LA', 'PA') or 'transparency' in image.info:
    rgba = image.convert('RGBA')
    image = Image.alpha_composite(Image.new('RGBA', rgba.size, (255, 255, 255, 255)), rgba)
  return np.asarray(image.convert('RGB'))


def decode_image(data: bytes, name: str) -> np.ndarray:
  """The RGB pixels of an encoded image; UnreadableImage naming it where they cannot be."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      return to_rgb(image)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
    raise UnreadableImage(f'{name}: {error}') from None


class RecordSource:
  """Random access to the examples {'image': uint8 [H, W, 3], 'caption': [str, ...]} of
  `records`; captions_only: {'caption'} alone, no image read."""

  def __init__(self, records: Sequence[ImageRecord], description: str,
               captions_only: bool = False):
    self.records = list(records)
    self.description = description
    self.captions_only = captions_only

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> dict:
    record = self.records[index]
    if self.captions_only:
      return {CAPTION_KEY: list(record.captions)}
    return {IMAGE_KEY: decode_image(record.read(), record.name),
            CAPTION_KEY: list(record.captions)}

  def __getitems__(self, indices: Sequence[int]) -> list:
    return [self[i] for i in indices]

  def __repr__(self) -> str:
    return self.description


def check_skipped(skipped: Dict[str, List[str]], total: int, max_bad_fraction: float,
                  where: str) -> None:
  """Warns of the entries left out of an index, by reason, or raises a ValueError where
  they are more than `max_bad_fraction` of `total`."""
  count = sum(map(len, skipped.values()))
  if not count:
    return
  reasons = '; '.join(f'{len(names)} {reason} (first: {names[0]})'
                      for reason, names in skipped.items())
  if count > max_bad_fraction * total:
    raise ValueError(f'{where}: {count} of {total} examples unusable, more than '
                     f'data.max_bad_fraction={max_bad_fraction:g}: {reasons}; fix them or raise '
                     'data.max_bad_fraction')
  logging.warning('%s: %d of %d examples skipped: %s', where, count, total, reasons)


def _is_image(name: str) -> bool:
  return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _folder_images(folder: str) -> List[str]:
  """Every image file under `folder`, as sorted paths relative to it."""
  found = []
  for root, _, files in os.walk(folder):
    found += [os.path.relpath(os.path.join(root, f), folder) for f in files if _is_image(f)]
  return sorted(found)


def _metadata_entries(path: str) -> List[dict]:
  """The rows of metadata.jsonl or metadata.csv, as dicts."""
  with open(path, encoding='utf-8', newline='') as f:
    if path.endswith('.csv'):
      return list(csv.DictReader(f))
    entries = []
    for number, line in enumerate(f, start=1):
      if line.strip():
        try:
          entries.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f'{path} line {number} is not JSON ({e.msg}); write one JSON object '
                           'a line') from None
    return entries


def _records_from_metadata(folder: str, path: str, skipped: dict) -> List[ImageRecord]:
  records = []
  for number, entry in enumerate(_metadata_entries(path), start=1):
    where = f'{path} entry {number}'
    if not isinstance(entry, dict) or not isinstance(entry.get('file_name'), str):
      raise ValueError(f'{where} has no file_name; each entry names its image file in '
                       '"file_name" and its caption in "text"')
    name = entry['file_name']
    file_path = os.path.join(folder, name)
    captions = _caption_field(entry, where)
    if not os.path.isfile(file_path):
      skipped['named in the metadata but missing'].append(name)
    elif not captions:
      skipped['without a caption'].append(name)
    else:
      records.append(ImageRecord(name, file_path, captions))
  return sorted(records, key=lambda r: r.name)


def _records_from_sidecars(folder: str, images: Sequence[str], skipped: dict
                           ) -> List[ImageRecord]:
  records = []
  for name in images:
    sidecar = os.path.join(folder, os.path.splitext(name)[0] + '.txt')
    captions = ()
    if os.path.isfile(sidecar):
      with open(sidecar, encoding='utf-8') as f:
        captions = _captions(f.read(), sidecar)
    if captions:
      records.append(ImageRecord(name, os.path.join(folder, name), captions))
    else:
      skipped['without a caption (.txt)'].append(name)
  return records


def index_folder(folder: str, max_bad_fraction: float) -> List[ImageRecord]:
  """The examples of an image folder, sorted by file name."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'image folder {folder} not found; set data.path to a folder of '
                            'images with captions')
  skipped = collections.defaultdict(list)  # reason -> names
  metadata = [os.path.join(folder, m) for m in METADATA_FILES
              if os.path.isfile(os.path.join(folder, m))]
  if metadata:
    records = _records_from_metadata(folder, metadata[0], skipped)
  else:
    images = _folder_images(folder)
    if not images:
      raise ValueError(f'image folder {folder} holds no image ({", ".join(IMAGE_EXTENSIONS)})')
    records = _records_from_sidecars(folder, images, skipped)
    if not records:
      raise ValueError(f'image folder {folder} has no captions: give metadata.jsonl '
                       '(file_name, text), metadata.csv or a .txt beside each image')
  total = len(records) + sum(map(len, skipped.values()))
  check_skipped(skipped, total, max_bad_fraction, f'image folder {folder}')
  if not records:
    raise ValueError(f'image folder {folder}: no image with a caption')
  return records


def shard_paths(patterns: str) -> List[str]:
  """The tar files that comma-separated paths or glob patterns name, sorted."""
  paths = set()
  for pattern in filter(None, (p.strip() for p in patterns.split(','))):
    matched = glob.glob(pattern)
    if not matched:
      raise FileNotFoundError(f'webdataset shards {pattern}: no such file; set data.path to tar '
                              "files or a pattern, e.g. '/data/laion/*.tar'")
    paths.update(matched)
  if not paths:
    raise ValueError('data.path is empty; give the webdataset tar files or a glob pattern')
  return sorted(paths)


def _webdataset_key(member_name: str) -> Tuple[str, str]:
  """(key, extension) as webdataset splits a member name: at the basename's first dot."""
  folder, base = os.path.split(member_name)
  stem, _, extension = base.partition('.')
  return os.path.join(folder, stem), '.' + extension.lower()


def _tar_samples(path: str) -> Dict[str, dict]:
  """{key: {'image': (name, offset, size), 'captions': (...)}} of one tar shard."""
  samples = {}
  try:
    with tarfile.open(path, 'r:') as tar:
      for member in tar:
        if not member.isfile():
          continue
        key, extension = _webdataset_key(member.name)
        sample = samples.setdefault(key, {})
        if extension in IMAGE_EXTENSIONS:
          sample['image'] = (member.name, member.offset_data, member.size)
        elif extension in ('.txt', '.json'):
          text = tar.extractfile(member).read().decode('utf-8')
          where = f'{path}:{member.name}'
          if extension == '.txt':
            sample['captions'] = _captions(text, where)
          else:
            sample['captions'] = _caption_field(json.loads(text), where)
  except tarfile.ReadError as error:
    raise ValueError(f'webdataset shard {path} is not an uncompressed tar file ({error}); '
                     'write shards as plain .tar, as img2dataset does') from None
  return samples


def index_webdataset(patterns: str, max_bad_fraction: float) -> List[ImageRecord]:
  """The examples of webdataset tar shards, in the order of the shards and their keys."""
  records, total = [], 0
  skipped = collections.defaultdict(list)  # reason -> names
  for path in shard_paths(patterns):
    for key, sample in sorted(_tar_samples(path).items()):
      total += 1
      if 'image' not in sample:
        skipped['without an image'].append(f'{path}:{key}')
      elif not sample.get('captions'):
        skipped['without a caption'].append(f'{path}:{key}')
      else:
        name, offset, size = sample['image']
        records.append(ImageRecord(f'{path}:{name}', path, sample['captions'], offset, size))
  check_skipped(skipped, total, max_bad_fraction, f'webdataset {patterns}')
  if not records:
    raise ValueError(f'webdataset {patterns}: no image with a caption')
  return records


INDEXERS = {'folder': index_folder, 'webdataset': index_webdataset}


def split_records(records: Sequence[ImageRecord], split: str, where: str) -> List[ImageRecord]:
  """The records of `split`: 'train' (all of them), or a tfds slice of it ('train[:-100]',
  'train[90%:]')."""
  try:
    instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(
        {SPLIT: types.SimpleNamespace(num_examples=len(records))})
  except (ValueError, AssertionError) as error:
    raise ValueError(f"{where}: split {split!r}: {str(error).splitlines()[0]}; a folder or "
                     "webdataset has one split, 'train', which slices hold out from: "
                     "train_split='train[:-100]', eval_split='train[-100:]'") from None
  return [r for i in instructions for r in records[i.from_:i.to]]


def open_file_source(kind: str, path: str, split: str, max_bad_fraction: float,
                     captions_only: bool = False) -> RecordSource:
  """The examples of `split` of the image folder or webdataset at `path`."""
  where = f'{kind} {path}'
  started = time.time()
  indexed = INDEXERS[kind](path, max_bad_fraction)
  logging.info('%s: %d examples indexed in %.1f s', where, len(indexed), time.time() - started)
  records = split_records(indexed, split, where)
  if not records:
    raise ValueError(f'{where}: split {split!r} is empty')
  return RecordSource(records, f'{where}:{split}', captions_only)
