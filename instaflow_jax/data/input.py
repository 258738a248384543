"""An exactly resumable image-text input pipeline over a random-access source.

The source is a tfds dataset with an image and a caption feature (the embedded captioned
shapes, coco_captions, a user's own builder), prepared as array_record, or files that need
no builder: an image folder with captions or webdataset tar shards (data/files.py).

    config = InputConfig(name='captioned_shapes/size32', label_keys=('shape_1', 'colour_1'))
    data = create_input(config, tokenizer, global_batch_size=64, seed=0,
                        process_index=jax.process_index(), process_count=jax.process_count())
    for batch in data.batches(start_step):   # {'image', 'input_ids', 'shape_1', 'colour_1'}
      ...

Sample j of the global batch at step k is position p = k * global_batch_size + j of an
endless stream that visits every example once per epoch, epoch e in the order of a
permutation seeded by (seed, e). So a batch is a pure function of (seed, k): resuming at
step k continues exactly, and process i of n takes the i-th of n equal slices of every
global batch, which stays the same whatever n. Where a caption feature holds several
captions, one is chosen by a key seeded by (seed, epoch, example index).
Caption dropout (for classifier-free guidance) is the trainer's business, not done here.

batches() loads the examples of a batch (reading, decoding, resizing) with several worker
threads (PIL and numpy release the GIL), each example by itself, so a batch is the same
whatever their number. An image is prepared as Stable Diffusion's training scripts do:
shorter side resized, centre or random crop, optional horizontal flip, the random choices
drawn from (seed, epoch, example index). An image that cannot be decoded is skipped with a
warning that counts them: the next readable example in index order takes its place, the
same one every time, so a batch stays a function of (seed, step); more than
max_bad_fraction of the source unreadable stops the run with an error. Images stay uint8
up to the device: the model's float range is made inside the jitted step
(images.to_model_range).

The stages that need prompts only may read them from a plain text file instead
(read_prompts, example_captions, PromptsInput).
"""
import concurrent.futures
import contextlib
import dataclasses
import functools
import os
import queue
import threading
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import numpy as np
from absl import logging
from PIL import Image
import tensorflow_datasets as tfds

from instaflow_jax import config_checks
from instaflow_jax import parallel
from instaflow_jax.data import files
from instaflow_jax.data import shapes  # noqa: F401  (registers 'captioned_shapes' with tfds)
from instaflow_jax.data.tokenizer import tokenize

Batch = Dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class InputConfig:
  """Which source and features to read, and how to prepare the images."""
  name: str = ''                  # tfds name, with an optional config: 'captioned_shapes/size16'
  split: str = 'train'
  image_key: str = 'image'        # feature paths; '/' goes into nested features
  caption_key: str = 'caption'    # a Text feature, or a sequence of them ('captions/text')
  image_size: int = 32
  label_keys: Tuple[str, ...] = ()  # integer features to pass through, e.g. class labels
  data_dir: Optional[str] = None
  builder_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  source: str = 'tfds'            # or 'folder', 'webdataset' (config_checks.DATA_SOURCES)
  path: str = ''                  # the folder, or the tars (comma-separated paths, globs)
  crop: str = 'center'            # or 'random'
  random_flip: bool = False
  max_bad_fraction: float = 0.01  # unreadable images (or unusable entries) tolerated


def input_config(data_config, split: str) -> InputConfig:
  """The InputConfig of `split` of a config's `data` section (its source, path, crop,
  random_flip and max_bad_fraction fields: the defaults where a config has none)."""
  defaults = InputConfig()
  optional = {field: data_config.get(field, getattr(defaults, field))
              for field in ('source', 'path', 'crop', 'random_flip', 'max_bad_fraction')}
  keys = dict(image_key=data_config.image_key, caption_key=data_config.caption_key)
  if optional['source'] != 'tfds':  # a file source's examples have fixed keys
    keys = dict(image_key=files.IMAGE_KEY, caption_key=files.CAPTION_KEY)
  return InputConfig(name=data_config.name, split=split, image_size=data_config.image_size,
                     data_dir=data_config.data_dir or None, **keys, **optional)


def describe(config: InputConfig) -> str:
  """The source and split, in a line: 'coco_captions:train', 'folder /data/x:train'."""
  if config.source == 'tfds':
    return f'{config.name}:{config.split}'
  return f'{config.source} {config.path}:{config.split}'


def open_source(config: InputConfig, captions_only: bool = False):
  """The random-access source of `config.split`: a tfds dataset (prepared as array_record
  if needed), an image folder or webdataset shards.

  captions_only: images are not decoded (tfds: every feature but the caption's is left
  encoded), which reads the captions of a split several times faster (all_captions)."""
  if config.source != 'tfds':
    return files.open_file_source(config.source, config.path, config.split,
                                  config.max_bad_fraction, captions_only)
  try:
    builder = tfds.builder(config.name, data_dir=config.data_dir, file_format='array_record',
                           **config.builder_kwargs)
  except tfds.core.registered.DatasetNotFoundError as error:
    first_line = str(error).strip().splitlines()[0]
    raise ValueError(f"tfds dataset '{config.name}' not found; is its builder imported and its "
                     f'name spelled right? ({first_line})') from None
  check_features(builder.info, (config.image_key, config.caption_key) + tuple(config.label_keys))
  # Process 0 prepares a shared data_dir alone; the others then find the dataset there.
  parallel.process_0_first(f'prepare {config.name}',
                           lambda: builder.download_and_prepare(file_format='array_record'))
  decoders = None
  if captions_only:
    caption_feature = config.caption_key.split('/')[0]
    decoders = {name: tfds.decode.SkipDecoding() for name in builder.info.features.keys()
                if name != caption_feature}
  return builder.as_data_source(split=config.split, decoders=decoders)


def _feature_paths(feature, prefix: str = '') -> list:
  """Every '/'-joined path to a leaf feature."""
  if isinstance(feature, tfds.features.Sequence):
    return _feature_paths(feature.feature, prefix)
  if isinstance(feature, tfds.features.FeaturesDict):
    return [path for key in feature.keys()
            for path in _feature_paths(feature[key], f'{prefix}{key}/')]
  return [prefix.rstrip('/')]


def check_features(info, keys: Sequence[str]) -> None:
  """Raises a ValueError naming the dataset if one of `keys` is not a feature path of it."""
  paths = _feature_paths(info.features)
  missing = [key for key in keys if key not in paths]
  if missing:
    raise ValueError(f"tfds dataset '{info.full_name}' has no feature "
                     f"{', '.join(map(repr, missing))} (its features: {', '.join(paths)})")


def _lookup(example: Mapping, key: str):
  for part in key.split('/'):
    example = example[part]
  return example


def _text(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def captions_of(example: Mapping, caption_key: str) -> list:
  """Every caption of an example, whether the feature holds one or several."""
  value = _lookup(example, caption_key)
  if isinstance(value, (str, bytes)) or np.ndim(value) == 0:
    return [_text(value)]
  return [_text(v) for v in value]


def all_captions(config: InputConfig, chunk_size: int = 4096) -> list:
  """Every caption of every example of `config.split`, in order. Read in chunks: a large
  split's encoded images would not fit in memory at once."""
  source = open_source(config, captions_only=True)
  captions = []
  for start in range(0, len(source), chunk_size):
    for example in source.__getitems__(list(range(start, min(start + chunk_size, len(source))))):
      captions += captions_of(example, config.caption_key)
  return captions


def read_prompts(path: str) -> list:
  """The prompts of a UTF-8 text file, one a line, in order: surrounding whitespace
  stripped, empty lines skipped. Duplicates are kept as separate prompts: a file of
  captions repeats a caption as often as the data does, and pair i takes prompt i, so
  dropping one would weigh the rest differently and shift every pair after it. A file
  that is missing, not UTF-8 or without a prompt is an error naming it."""
  try:
    with open(path, encoding='utf-8') as f:
      lines = f.read().split('\n')
  except OSError as e:
    raise OSError(f'prompts file {path}: {e.strerror}; give a text file with one prompt a '
                  'line') from None
  except UnicodeDecodeError as e:
    raise ValueError(f'prompts file {path} is not UTF-8 text ({e.reason} at byte {e.start}); '
                     'save it as UTF-8') from None
  prompts = [line.strip() for line in lines if line.strip()]
  if not prompts:
    raise ValueError(f'prompts file {path} holds no prompt (every line is empty); give one '
                     'prompt a line')
  return prompts


class _SplitCaptions:
  """The captions of each example of a tfds split, read when asked for (images undecoded)."""

  def __init__(self, config: InputConfig):
    self._source = open_source(config, captions_only=True)
    self._caption_key = config.caption_key

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> list:
    return captions_of(self._source[index], self._caption_key)


def example_captions(data_config, split: str, prompts_file: str = '') -> Sequence[list]:
  """Random access to each example's captions: the lines of `prompts_file` (one caption an
  example) when given, else the captions of `split` of the config's tfds dataset."""
  if prompts_file:
    return [[prompt] for prompt in read_prompts(prompts_file)]
  return _SplitCaptions(input_config(data_config, split))


def model_image(image: np.ndarray, size: int,
                crop_rng: Optional[np.random.Generator] = None) -> np.ndarray:
  """uint8 [H, W, C] -> uint8 [size, size, 3]: shorter side resized, then the centre crop,
  or with `crop_rng` a crop at a random position."""
  if image.ndim == 2 or image.shape[-1] == 1:
    image = np.repeat(image.reshape(image.shape[:2] + (1,)), 3, axis=-1)
  image = image[..., :3]
  height, width = image.shape[:2]
  if (height, width) != (size, size):
    scale = size / min(height, width)
    resized = (max(size, round(width * scale)), max(size, round(height * scale)))
    image = np.asarray(Image.fromarray(image).resize(resized, Image.Resampling.BICUBIC))
    slack = (image.shape[0] - size, image.shape[1] - size)
    if crop_rng is None:
      top, left = slack[0] // 2, slack[1] // 2
    else:
      top, left = (int(crop_rng.integers(0, s + 1)) for s in slack)
    image = image[top:top + size, left:left + size]
  return image


# The random crop and flip of a sample: a stream of its own beside the caption's choice.
_AUGMENTATION_STREAM = 0x63726f70  # 'crop'

# More threads than this would add little (the Python parts of loading an example hold the
# GIL) and crowd the host's other processes (one per accelerator on many GPU hosts).
_MAX_DEFAULT_WORKERS = 16


def default_workers() -> int:
  """The worker threads of an input pipeline by default: one per CPU this process may run
  on, at most _MAX_DEFAULT_WORKERS."""
  cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  return max(1, min(_MAX_DEFAULT_WORKERS, cpus or 1))


@contextlib.contextmanager
def worker_map(workers: int) -> Iterator[Callable]:
  """A map() that runs its calls on `workers` threads, results in order; the threads stop
  at the end of the block."""
  if workers == 1:
    yield map
    return
  with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix='input-worker') as pool:
    yield pool.map


class IndexedInput:
  """Exactly resumable batches over a random-access source of examples.

  Sample j of the global batch at step k is position k * global_batch_size + j of an
  endless stream that visits every example once per epoch, in the order of a permutation
  seeded by (seed, epoch); process i of n takes the i-th of n equal slices. Subclasses
  may prepare each example as it is loaded (`load_example`, run by `workers` threads) and
  turn the examples of a step into arrays (`make_batch`).
  """

  def __init__(self, source, *, global_batch_size: int, seed: int = 0, process_index: int = 0,
               process_count: int = 1, prefetch: int = 2, workers: Optional[int] = None):
    if global_batch_size % process_count:
      raise ValueError(f'global_batch_size={global_batch_size} is not divisible by '
                       f'process_count={process_count}')
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index={process_index} not in [0, {process_count})')
    if len(source) == 0:
      raise ValueError(f'input: the source {source!r} is empty')
    if workers is not None and workers < 1:
      raise ValueError(f'input: workers={workers}; give at least 1 (or None: '
                       f'{default_workers()} on this machine)')
    self.source = source
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.seed = seed
    self.process_index = process_index
    self.prefetch = prefetch
    self.workers = default_workers() if workers is None else workers
    # A batch spans at most two epochs; keep both orders.
    self._permutation = functools.lru_cache(maxsize=2)(self._make_permutation)

  def __len__(self) -> int:
    """The number of examples in one epoch."""
    return len(self.source)

  def _make_permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.source))

  def sample_ids(self, step: int) -> Tuple[np.ndarray, np.ndarray]:
    """(epoch, example index) of each of this process's samples at `step`."""
    start = step * self.global_batch_size + self.process_index * self.local_batch_size
    positions = np.arange(start, start + self.local_batch_size)
    epochs, offsets = np.divmod(positions, len(self.source))
    indices = np.array([self._permutation(int(e))[o] for e, o in zip(epochs, offsets)], np.int64)
    return epochs, indices

  def load_example(self, index: int, epoch: int) -> Any:
    """Example `index` of the source as shown in `epoch`, as make_batch takes it."""
    del epoch
    return self.source[index]

  def make_batch(self, examples: Sequence[Any], epochs: np.ndarray, indices: np.ndarray) -> Batch:
    raise NotImplementedError

  def batch(self, step: int, map_fn: Callable = map) -> Batch:
    """This process's part of the global batch at `step`, its examples loaded through
    `map_fn` (by default in this thread; batches() passes its workers')."""
    return self.batch_of(*self.sample_ids(step), map_fn)

  def batch_of(self, epochs: np.ndarray, indices: np.ndarray, map_fn: Callable = map) -> Batch:
    """The batch of examples `indices`, each as shown in its epoch of `epochs`."""
    examples = list(map_fn(self.load_example, indices.tolist(), epochs.tolist()))
    return self.make_batch(examples, epochs, indices)

  def batches(self, start_step: int = 0) -> Iterator[Batch]:
    """Batches of steps start_step, start_step + 1, ..., made ahead by a background thread
    that loads their examples on `workers` threads."""
    ready = queue.Queue(maxsize=self.prefetch)
    stop = threading.Event()

    def put(item):
      while not stop.is_set():
        try:
          ready.put(item, timeout=0.1)
          return
        except queue.Full:
          pass

    def produce():
      step = start_step
      try:
        with worker_map(self.workers) as map_fn:
          while not stop.is_set():
            put(self.batch(step, map_fn))
            step += 1
      except Exception as error:  # handed to the consumer, raised there
        put(error)

    thread = threading.Thread(target=produce, daemon=True, name='input-prefetch')
    thread.start()
    try:
      while True:
        item = ready.get()
        if isinstance(item, Exception):
          raise item
        yield item
    finally:
      stop.set()
      thread.join()


class ImageTextInput(IndexedInput):
  """Batches {'image': uint8 [b, H, W, 3], 'input_ids': int32 [b, T], labels: int32 [b]}.

  `source` is any random-access sequence of examples (a tfds data source, a
  files.RecordSource); b is this process's share of `global_batch_size`. `tokenizer` is
  called as a CLIPTokenizer is. crop ('center' or 'random') and random_flip prepare the
  images; a source that raises files.UnreadableImage for an example has it skipped, up to
  max_bad_fraction of its examples.
  """

  def __init__(self, source, tokenizer, *, global_batch_size: int, image_size: int,
               image_key: str = 'image', caption_key: str = 'caption',
               label_keys: Sequence[str] = (), crop: str = 'center', random_flip: bool = False,
               max_bad_fraction: float = 0.01, seed: int = 0, process_index: int = 0,
               process_count: int = 1, prefetch: int = 2, workers: Optional[int] = None):
    super().__init__(source, global_batch_size=global_batch_size, seed=seed,
                     process_index=process_index, process_count=process_count, prefetch=prefetch,
                     workers=workers)
    info = getattr(source, 'dataset_info', None)
    if info is not None:
      check_features(info, (image_key, caption_key) + tuple(label_keys))
    if crop not in config_checks.CROPS:
      raise ValueError(f'input: crop={crop!r}; use one of {", ".join(config_checks.CROPS)}')
    self.tokenizer = tokenizer
    self.image_size = image_size
    self.image_key, self.caption_key, self.label_keys = image_key, caption_key, tuple(label_keys)
    self.crop, self.random_flip, self.max_bad_fraction = crop, random_flip, max_bad_fraction
    self._unreadable = set()
    self._latest_unreadable = ''  # why the latest of them could not be read
    self._unreadable_lock = threading.Lock()

  def _caption(self, value, epoch: int, index: int) -> str:
    """One of the captions, picked by the sample's key (seed, epoch, index)."""
    if not value:
      raise ValueError(f'input: example {index} has no caption in {self.caption_key!r}')
    if len(value) == 1:
      return value[0]
    key = np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0]
    return value[int(key) % len(value)]

  def load_example(self, index: int, epoch: int) -> Tuple[Mapping, np.ndarray]:
    """(example `index`, or its substitute where unreadable, and its image at the model's
    size, cropped and flipped as drawn for (seed, epoch, index))."""
    example = self._readable_example(index)
    rng = np.random.default_rng([self.seed, epoch, index, _AUGMENTATION_STREAM])
    image = model_image(np.asarray(_lookup(example, self.image_key)), self.image_size,
                        rng if self.crop == 'random' else None)
    if self.random_flip and rng.random() < 0.5:
      image = image[:, ::-1]
    return example, image

  def _readable_example(self, index: int) -> Mapping:
    """Example `index`, or where its image cannot be decoded the next readable one in
    index order (wrapping round): the same substitute whatever the thread or the run."""
    for offset in range(len(self.source)):
      candidate = (index + offset) % len(self.source)
      if candidate in self._unreadable:
        self._check_unreadable()
        continue
      try:
        return self.source[candidate]
      except files.UnreadableImage as error:
        self._skip(candidate, error)
    raise ValueError(f'input: no image of {self.source!r} can be read')

  def _skip(self, index: int, error: files.UnreadableImage) -> None:
    """Counts an unreadable example, with a warning."""
    with self._unreadable_lock:
      self._unreadable.add(index)
      self._latest_unreadable = str(error)
      count = len(self._unreadable)
    self._check_unreadable()
    logging.warning('input: skipped an unreadable image (%s); %d so far of %d examples', error,
                    count, len(self.source))

  def _check_unreadable(self) -> None:
    """A ValueError while the unreadable examples are more than max_bad_fraction."""
    count = len(self._unreadable)
    if count > self.max_bad_fraction * len(self.source):
      raise ValueError(f'input: {count} images of {self.source!r} ({len(self.source)} examples) '
                       f'cannot be read, more than data.max_bad_fraction='
                       f'{self.max_bad_fraction:g}; the latest: {self._latest_unreadable}')

  def make_batch(self, examples, epochs, indices) -> Batch:
    examples, images = zip(*examples)
    captions = [self._caption(captions_of(ex, self.caption_key), int(e), int(i))
                for ex, e, i in zip(examples, epochs, indices)]
    batch = {'image': np.stack(images), 'input_ids': tokenize(self.tokenizer, captions)}
    for key in self.label_keys:
      batch[key] = np.array([_lookup(ex, key) for ex in examples], np.int32)
    return batch


def create_input(config: InputConfig, tokenizer, *, global_batch_size: int, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, prefetch: int = 2,
                 workers: Optional[int] = None) -> ImageTextInput:
  """The pipeline over the source of `config` (a tfds dataset is prepared as array_record
  if needed)."""
  return ImageTextInput(
      open_source(config), tokenizer, global_batch_size=global_batch_size,
      image_size=config.image_size, image_key=config.image_key, caption_key=config.caption_key,
      label_keys=config.label_keys, crop=config.crop, random_flip=config.random_flip,
      max_bad_fraction=config.max_bad_fraction, seed=seed, process_index=process_index,
      process_count=process_count, prefetch=prefetch, workers=workers)


class PromptsInput(IndexedInput):
  """Batches {'input_ids': int32 [b, T]} of prompts, for the stages that need no images."""

  def __init__(self, prompts: Sequence[str], tokenizer, **kwargs):
    super().__init__(list(prompts), **kwargs)
    self.tokenizer = tokenizer

  def make_batch(self, examples, epochs, indices) -> Batch:
    return {'input_ids': tokenize(self.tokenizer, examples)}
