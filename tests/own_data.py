"""A user's own data on disk, generated: captioned-shapes scenes written as image files in
each layout the input pipeline reads (an image folder with metadata.jsonl, metadata.csv or
.txt sidecars, webdataset tar shards, a prompts file)."""
import csv
import io
import json
import os
import tarfile

import numpy as np
from PIL import Image

from instaflow_jax.data import shapes

# Formats in turn: lossless ones first, so that most images read back exactly.
FORMATS = ('png', 'webp', 'jpg')
SIZE = (20, 24)  # (height, width) on disk: the pipeline resizes and crops them


def scene_image(index: int) -> np.ndarray:
  """uint8 [20, 24, 3]: scene `index` of the training split, drawn wider than tall."""
  square = shapes.render(shapes.sample_scene('train', index), 24)
  return square[2:22]


def scene_caption(index: int) -> str:
  return shapes.caption(shapes.sample_scene('train', index))


def encoded(image: np.ndarray, image_format: str) -> bytes:
  buffer = io.BytesIO()
  options = {'lossless': True} if image_format == 'webp' else {}
  Image.fromarray(image).save(buffer, format='jpeg' if image_format == 'jpg' else image_format,
                              **options)
  return buffer.getvalue()


def file_name(index: int, image_format: str = '') -> str:
  return f'{index:04d}.{image_format or FORMATS[index % len(FORMATS)]}'


def write_images(folder: str, count: int, subfolder: str = '') -> list:
  """Writes `count` images into folder/subfolder; their names relative to `folder`."""
  os.makedirs(os.path.join(folder, subfolder), exist_ok=True)
  names = []
  for index in range(count):
    name = os.path.join(subfolder, file_name(index))
    with open(os.path.join(folder, name), 'wb') as f:
      f.write(encoded(scene_image(index), name.rsplit('.', 1)[1]))
    names.append(name)
  return names


def write_metadata_folder(folder: str, count: int) -> str:
  """An image folder as diffusers' training scripts read it: metadata.jsonl."""
  names = write_images(folder, count, 'images')
  with open(os.path.join(folder, 'metadata.jsonl'), 'w') as f:
    for index, name in enumerate(names):
      f.write(json.dumps({'file_name': name, 'text': scene_caption(index)}) + '\n')
  return folder


def write_csv_folder(folder: str, count: int) -> str:
  names = write_images(folder, count)
  with open(os.path.join(folder, 'metadata.csv'), 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['file_name', 'text'])
    writer.writerows((name, scene_caption(i)) for i, name in enumerate(names))
  return folder


def write_sidecar_folder(folder: str, count: int) -> str:
  """Images with a .txt caption beside each."""
  for index, name in enumerate(write_images(folder, count)):
    with open(os.path.join(folder, os.path.splitext(name)[0] + '.txt'), 'w') as f:
      f.write(scene_caption(index) + '\n')
  return folder


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_webdataset(folder: str, count: int, num_shards: int = 2) -> str:
  """`num_shards` tars as img2dataset writes them (KEY.jpg, KEY.txt, KEY.json), the images
  in the order of an image folder's; the glob pattern of their paths. Captions alternate
  between .txt and .json."""
  os.makedirs(folder, exist_ok=True)
  per_shard = -(-count // num_shards)
  for shard in range(num_shards):
    with tarfile.open(os.path.join(folder, f'{shard:05d}.tar'), 'w') as tar:
      for index in range(shard * per_shard, min(count, (shard + 1) * per_shard)):
        key = f'{index:09d}'
        image_format = FORMATS[index % len(FORMATS)]
        add_member(tar, f'{key}.{image_format}', encoded(scene_image(index), image_format))
        if index % 2:
          add_member(tar, f'{key}.json', json.dumps({'caption': scene_caption(index),
                                                     'key': key}).encode())
        else:
          add_member(tar, f'{key}.txt', scene_caption(index).encode())
  return os.path.join(folder, '*.tar')


def write_prompts(path: str, count: int) -> str:
  with open(path, 'w') as f:
    f.write('\n'.join(scene_caption(i) for i in range(count)) + '\n')
  return path


def truncate(path: str) -> None:
  """Cuts a file to half its size, as an interrupted download leaves it."""
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 2])
