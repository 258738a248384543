"""The resumable image-text input pipeline: determinism, resumption, process slices, errors."""
import dataclasses
import itertools
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instaflow_jax import images as image_io
from instaflow_jax.data import input as input_lib
from instaflow_jax.data import shapes
from instaflow_jax.data.tokenizer import WordTokenizer

SMALL = {'train': 20, 'validation': 4, 'test': 4}
GLOBAL_BATCH = 12  # does not divide 20: batches straddle epochs
LABELS = ('shape_1', 'colour_2', 'relation')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('shapes'))
  shapes.prepared_builder(16, path, SMALL)
  return path


@pytest.fixture(scope='module')
def config(data_dir):
  return input_lib.InputConfig(name='captioned_shapes', image_size=16, label_keys=LABELS,
                               data_dir=data_dir,
                               builder_kwargs={'config': shapes.shapes_config(16, SMALL)})


@pytest.fixture(scope='module')
def tokenizer():
  return WordTokenizer.for_shapes()


def _input(config, tokenizer, seed=0, process_index=0, process_count=1, **kwargs):
  return input_lib.create_input(config, tokenizer, global_batch_size=GLOBAL_BATCH, seed=seed,
                                process_index=process_index, process_count=process_count,
                                **kwargs)


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_batch_contents(config, tokenizer):
  data = _input(config, tokenizer)
  batch = data.batch(3)
  assert batch['image'].shape == (GLOBAL_BATCH, 16, 16, 3) and batch['image'].dtype == np.uint8
  assert batch['input_ids'].shape == (GLOBAL_BATCH, tokenizer.model_max_length)
  assert batch['input_ids'].dtype == np.int32
  _, indices = data.sample_ids(3)
  for row, index in enumerate(indices):
    scene = shapes.sample_scene('train', int(index))
    np.testing.assert_array_equal(batch['image'][row], shapes.render(scene, 16))
    assert tokenizer.decode(batch['input_ids'][row]) == shapes.caption(scene)
    for key in LABELS:
      assert shapes.label_names(key)[batch[key][row]] == scene.labels()[key]


def test_images_stay_uint8_until_the_step_makes_the_model_range():
  pixels = jnp.array([0, 51, 255], jnp.uint8)
  np.testing.assert_allclose(jax.jit(image_io.to_model_range)(pixels), [-1.0, -0.6, 1.0],
                             rtol=1e-6)


def test_each_epoch_visits_every_example_once(config, tokenizer):
  data = _input(config, tokenizer)
  steps = 3 * SMALL['train'] // GLOBAL_BATCH  # 3 epochs of 20 in batches of 12
  epochs, indices = map(np.concatenate, zip(*(data.sample_ids(k) for k in range(steps))))
  orders = [indices[epochs == e] for e in range(3)]
  for order in orders:
    assert sorted(order) == list(range(SMALL['train']))
  assert not np.array_equal(orders[0], orders[1])


def test_same_seed_and_step_give_the_same_batch(config, tokenizer):
  first, second = _input(config, tokenizer), _input(config, tokenizer)
  for step in (0, 1, 7):
    _assert_batches_equal(first.batch(step), second.batch(step))
  other_seed = _input(config, tokenizer, seed=1).batch(0)
  assert not np.array_equal(other_seed['input_ids'], first.batch(0)['input_ids'])


def test_resuming_equals_continuing(config, tokenizer):
  data = _input(config, tokenizer)
  continued = list(itertools.islice(data.batches(0), 7))
  resumed = list(itertools.islice(_input(config, tokenizer).batches(4), 3))
  for a, b in zip(continued[4:], resumed, strict=True):
    _assert_batches_equal(a, b)
  for step, batch in enumerate(continued):
    _assert_batches_equal(batch, data.batch(step))


def test_batches_are_the_same_whatever_the_number_of_workers(config, tokenizer):
  """Over an epoch's end, with the images as stored and resized, from the tfds source."""
  source = input_lib.open_source(config)
  def batches(workers, size):
    data = input_lib.ImageTextInput(source, tokenizer, global_batch_size=GLOBAL_BATCH,
                                    image_size=size, label_keys=LABELS, workers=workers)
    return list(itertools.islice(data.batches(2), 3)), data
  for size in (16, 11):  # as stored; resized
    one, data = batches(1, size)
    four, _ = batches(4, size)
    for step, (a, b) in enumerate(zip(one, four, strict=True), start=2):
      _assert_batches_equal(a, b)
      _assert_batches_equal(a, data.batch(step))
  assert not any(t.name.startswith('input-worker') for t in threading.enumerate())


def test_workers_below_one_are_refused(tokenizer):
  with pytest.raises(ValueError, match=r'input: workers=0; give at least 1 \(or None: \d+ on '
                                       r'this machine\)'):
    input_lib.ImageTextInput(_captions_source(), tokenizer, global_batch_size=2, image_size=8,
                             workers=0)


@pytest.mark.parametrize('process_count', [2, 3, 4])
def test_process_slices_make_the_global_batch(config, tokenizer, process_count):
  step = 2
  whole = _input(config, tokenizer)
  parts = [_input(config, tokenizer, process_index=i, process_count=process_count)
           for i in range(process_count)]
  merged = {key: np.concatenate([p.batch(step)[key] for p in parts]) for key in whole.batch(0)}
  _assert_batches_equal(merged, whole.batch(step))
  positions = [set(zip(*map(list, p.sample_ids(step)))) for p in parts]
  assert sum(map(len, positions)) == GLOBAL_BATCH
  assert set().union(*positions) == set(zip(*map(list, whole.sample_ids(step))))


def test_batch_size_must_split_over_processes(config, tokenizer):
  with pytest.raises(ValueError, match='not divisible by process_count=5'):
    _input(config, tokenizer, process_count=5)


def test_unknown_dataset_is_named():
  with pytest.raises(ValueError, match="tfds dataset 'no_such_dataset_xyz' not found"):
    input_lib.open_source(input_lib.InputConfig(name='no_such_dataset_xyz'))


@pytest.mark.parametrize('keys, missing', [({'image_key': 'picture'}, 'picture'),
                                           ({'caption_key': 'text'}, 'text'),
                                           ({'label_keys': ('shape_3',)}, 'shape_3')])
def test_missing_feature_is_named(config, keys, missing):
  message = f"tfds dataset 'captioned_shapes/.*' has no feature '{missing}'"
  with pytest.raises(ValueError, match=message):
    input_lib.open_source(dataclasses.replace(config, **keys))


def _captions_source(count=6):
  """coco_captions-like examples: non-square images and several captions each."""
  rng = np.random.default_rng(0)
  return [{'image': rng.integers(0, 256, (20, 30, 3), np.uint8),
           'captions': {'text': [f'a red circle {w}'.encode() for w in ('at', 'in', 'above')]}}
          for _ in range(count)]


def test_caption_lists_and_resizing():
  data = input_lib.ImageTextInput(_captions_source(), WordTokenizer(['a red circle at in above']),
                                  global_batch_size=6, image_size=8, caption_key='captions/text')
  batches = [data.batch(step) for step in range(8)]  # a batch is an epoch here
  assert batches[0]['image'].shape == (6, 8, 8, 3) and batches[0]['image'].dtype == np.uint8
  # Example 0 is shown with more than one of its captions over 8 epochs, the same each run.
  rows = [list(data.sample_ids(step)[1]).index(0) for step in range(8)]
  captions = [tuple(b['input_ids'][row]) for b, row in zip(batches, rows)]
  assert len(set(captions)) > 1
  _assert_batches_equal(batches[5], data.batch(5))


def test_prefetch_errors_surface_and_threads_stop():
  source = [{'image': np.zeros((8, 8, 3), np.uint8)}] * 4  # no caption feature
  data = input_lib.ImageTextInput(source, WordTokenizer(['a']), global_batch_size=2, image_size=8)
  with pytest.raises(KeyError, match='caption'):
    next(data.batches(0))
  good = input_lib.ImageTextInput(_captions_source(), WordTokenizer(['a']), global_batch_size=2,
                                  image_size=8, caption_key='captions/text')
  iterator = good.batches(0)
  next(iterator)
  iterator.close()
  assert not any(t.name == 'input-prefetch' for t in threading.enumerate())


def test_prompts_file_lines_stripped_empty_skipped_duplicates_kept(tmp_path):
  path = tmp_path / 'prompts.txt'
  path.write_bytes('  a red cat \r\n\n\t\na café\na red cat\n   \nlast without newline'.encode())
  assert input_lib.read_prompts(str(path)) == ['a red cat', 'a café', 'a red cat',
                                               'last without newline']
  assert input_lib.example_captions(None, 'train', str(path))[2] == ['a red cat']


@pytest.mark.parametrize('content, message', [
    (None, r'^prompts file {path}: No such file or directory; give a text file'),
    (b'\n \n', r'^prompts file {path} holds no prompt \(every line is empty\)'),
    (b'a cat\n\xff\xfe\n', r'^prompts file {path} is not UTF-8 text \(invalid start byte at '
                           r'byte 6\); save it as UTF-8$')])
def test_bad_prompts_file_is_named(tmp_path, content, message):
  path = tmp_path / 'prompts.txt'
  if content is not None:
    path.write_bytes(content)
  with pytest.raises((OSError, ValueError), match=message.format(path=path)):
    input_lib.read_prompts(str(path))


def test_prompts_input_tokenizes_prompts_resumably(tokenizer):
  data = input_lib.PromptsInput(['a', 'b', 'c', 'd', 'e'], tokenizer, global_batch_size=2,
                                seed=3)
  batch = data.batch(4)
  assert set(batch) == {'input_ids'} and batch['input_ids'].shape[0] == 2
  np.testing.assert_array_equal(batch['input_ids'], data.batch(4)['input_ids'])
