r"""Images/s of the training input pipeline (data/input.py) at 512px, by source and worker count.

Writes 640x480 JPEG photographs' stand-ins (smooth colour fields with texture and noise, so
that they encode to photograph-like sizes) in a temporary directory in each layout the
pipeline reads: a tfds dataset prepared as array_record, an image folder with
metadata.jsonl, and two webdataset tar shards. Reads each through create_input, as the rf
stage does: read, decode, convert to RGB, resize the shorter side to 512 and crop the
centre, tokenize, stack, in batches made ahead by its background thread.

  JAX_PLATFORMS=cpu .venv/bin/python -m benchmarks.input_pipeline --out /tmp/input.json

Nothing is downloaded. Rows, for each source of --sources: each worker count of
--workers (default 1, 2, this machine's default_workers() and twice that), measured in
turn --rounds times so that a change in the machine's load falls on every count alike: the
median images/s, and the CPU cores the process kept busy (its CPU time / wall time; above
1, the threads ran at once). Then, single-threaded, the milliseconds per image of reading
+ decoding (the source's __getitem__) and of resizing + cropping (model_image).
"""
import argparse
import io
import itertools
import json
import os
import platform
import statistics
import tarfile
import tempfile
import time

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from instaflow_jax.data import input as input_lib
from instaflow_jax.data.tokenizer import WordTokenizer

WIDTH, HEIGHT = 640, 480  # MS COCO's most common size
CAPTION = 'a photograph of a red kite above a green field'


def synthetic_photo(index: int) -> np.ndarray:
  """uint8 [HEIGHT, WIDTH, 3]: smooth colour gradients, a texture and pixel noise."""
  rng = np.random.default_rng(index)
  y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
  channels = []
  for _ in range(3):
    fx, fy, phase = rng.uniform(0.002, 0.03, 2).tolist() + [rng.uniform(0, 6.3)]
    channels.append(128 + 90 * np.sin(fx * x + fy * y + phase) * np.cos(fy * x - phase))
  image = np.stack(channels, axis=-1) + rng.normal(0, 8, (HEIGHT, WIDTH, 3))
  return np.clip(image, 0, 255).astype(np.uint8)


class InputBenchPhotos(tfds.core.GeneratorBasedBuilder):
  """Captioned 640x480 JPEG images, generated locally."""

  VERSION = tfds.core.Version('1.0.0')
  NUM_EXAMPLES = 256
  pkg_dir_path = epath.Path(__file__).parent  # tfds' default needs a package; run as __main__

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
            'caption': tfds.features.Text()}),
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for index in range(self.NUM_EXAMPLES):
      yield index, {'image': synthetic_photo(index), 'caption': CAPTION}


def jpeg(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  # Quality 95: tf.io.encode_jpeg's, with which tfds writes the tfds source's images.
  Image.fromarray(image).save(buffer, format='jpeg', quality=95)
  return buffer.getvalue()


def write_folder(folder: str) -> str:
  """The photographs as an image folder with metadata.jsonl."""
  os.makedirs(folder)
  with open(os.path.join(folder, 'metadata.jsonl'), 'w') as metadata:
    for index in range(InputBenchPhotos.NUM_EXAMPLES):
      name = f'{index:05d}.jpg'
      with open(os.path.join(folder, name), 'wb') as f:
        f.write(jpeg(synthetic_photo(index)))
      metadata.write(json.dumps({'file_name': name, 'text': CAPTION}) + '\n')
  return folder


def write_webdataset(folder: str, num_shards: int = 2) -> str:
  """The photographs as webdataset tar shards (KEY.jpg, KEY.txt); their glob pattern."""
  os.makedirs(folder)
  for shard in range(num_shards):
    with tarfile.open(os.path.join(folder, f'{shard:05d}.tar'), 'w') as tar:
      for index in range(shard, InputBenchPhotos.NUM_EXAMPLES, num_shards):
        for name, data in ((f'{index:09d}.jpg', jpeg(synthetic_photo(index))),
                           (f'{index:09d}.txt', CAPTION.encode())):
          info = tarfile.TarInfo(name)
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
  return os.path.join(folder, '*.tar')


def source_configs(root: str, sources, image_size: int) -> dict:
  """source -> the InputConfig that reads the photographs written in that layout."""
  configs = {}
  for source in sources:
    if source == 'tfds':
      InputBenchPhotos(data_dir=root, file_format='array_record').download_and_prepare(
          file_format='array_record')
      configs[source] = input_lib.InputConfig(name='input_bench_photos', image_size=image_size,
                                              data_dir=root)
    else:
      writer = write_folder if source == 'folder' else write_webdataset
      configs[source] = input_lib.InputConfig(source=source, image_size=image_size,
                                              path=writer(os.path.join(root, source)))
  return configs


def throughput(config, tokenizer, workers: int, batch_size: int, batches: int) -> dict:
  """Images/s over `batches` batches after the first (which starts the threads), and the
  CPU cores the process kept busy meanwhile (its CPU time / wall time)."""
  data = input_lib.create_input(config, tokenizer, global_batch_size=batch_size,
                                workers=workers)
  iterator = data.batches(0)
  next(iterator)
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in itertools.islice(iterator, batches):
    pass
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  iterator.close()
  return {'workers': workers, 'images_per_s': batches * batch_size / wall,
          'cores_used': cpu / wall}


def per_image_ms(config, count: int = 32) -> dict:
  """Single-threaded milliseconds per image of reading + decoding, and of resizing."""
  source = input_lib.open_source(config)
  start = time.perf_counter()
  images = [np.asarray(source[i]['image']) for i in range(count)]
  decoded = time.perf_counter()
  for image in images:
    input_lib.model_image(image, config.image_size)
  resized = time.perf_counter()
  return {'read_decode_ms': 1e3 * (decoded - start) / count,
          'resize_crop_ms': 1e3 * (resized - decoded) / count}


def rows_by_workers(config, tokenizer, counts, batch_size: int, batches: int,
                    rounds: int) -> list:
  """A row per worker count: the medians of `rounds` throughput measurements, taken in
  turn with the other counts'."""
  measured = {workers: [] for workers in counts}
  for _ in range(rounds):
    for workers in counts:
      measured[workers].append(throughput(config, tokenizer, workers, batch_size, batches))
      print(f"workers {workers:3d}: {measured[workers][-1]['images_per_s']:7.1f} images/s, "
            f"{measured[workers][-1]['cores_used']:.2f} cores busy", flush=True)
  return [{'workers': workers,
           **{key: statistics.median(m[key] for m in measured[workers])
              for key in ('images_per_s', 'cores_used')},
           'images_per_s_each_round': [m['images_per_s'] for m in measured[workers]]}
          for workers in counts]


def print_table(result: dict) -> None:
  print(f"\n{result['cpus']} CPUs, load {', '.join(f'{x:.1f}' for x in result['load_average'])}")
  print('| source | single thread: read + decode, resize + crop (ms/image) | workers | images/s '
        '| vs 1st | CPU cores busy |\n|---|---|---|---|---|---|')
  for source, measured in result['sources'].items():
    rows = measured['rows']
    for row in rows:
      print(f"| {source} | {measured['read_decode_ms']:.1f}, {measured['resize_crop_ms']:.1f} | "
            f"{row['workers']} | {row['images_per_s']:.1f} | "
            f"{row['images_per_s'] / rows[0]['images_per_s']:.2f}x | {row['cores_used']:.2f} |")


def load_average() -> list:
  return list(os.getloadavg()) if hasattr(os, 'getloadavg') else []


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  default = input_lib.default_workers()
  parser.add_argument('--workers', default=','.join(map(str, sorted({1, 2, default,
                                                                     2 * default}))),
                      help='comma-separated worker counts')
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--batches', type=int, default=4, help='timed batches per measurement')
  parser.add_argument('--rounds', type=int, default=3, help='measurements per worker count')
  parser.add_argument('--image_size', type=int, default=512)
  parser.add_argument('--sources', default='tfds,folder,webdataset',
                      help='comma-separated: tfds, folder, webdataset')
  parser.add_argument('--out', default=None, help='write the numbers here as JSON')
  args = parser.parse_args()

  tokenizer = WordTokenizer.from_captions([CAPTION], max_length=77)
  measured = {}
  with tempfile.TemporaryDirectory() as root:
    started = time.perf_counter()
    configs = source_configs(root, args.sources.split(','), args.image_size)
    prepare_s = time.perf_counter() - started
    for source, config in configs.items():
      print(f'source {source}:', flush=True)
      measured[source] = {
          **per_image_ms(config),
          'rows': rows_by_workers(config, tokenizer, [int(w) for w in args.workers.split(',')],
                                  args.batch_size, args.batches, args.rounds)}

  result = {
      'image': f'{WIDTH}x{HEIGHT} JPEG -> {args.image_size}x{args.image_size} uint8',
      'batch_size': args.batch_size, 'timed_batches': args.batches, 'rounds': args.rounds,
      'cpus': os.cpu_count(), 'default_workers': default,
      'machine': platform.platform(), 'processor': platform.processor(),
      'load_average': load_average(), 'prepare_s': prepare_s, 'sources': measured}
  print_table(result)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  main()
