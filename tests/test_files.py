"""Captioned images from files (data/files.py) through the input pipeline: each layout,
image modes, crops and flips, unreadable and unusable files, splits."""
import io
import itertools
import json
import logging
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from instaflow_jax.data import files
from instaflow_jax.data import input as input_lib
from instaflow_jax.data.tokenizer import WordTokenizer
from tests import own_data

COUNT = 12


@pytest.fixture(scope='module')
def tokenizer():
  return WordTokenizer.for_shapes()


def _records(kind, path, max_bad_fraction=0.0):
  return files.INDEXERS[kind](path, max_bad_fraction)


def _pipeline(kind, path, tokenizer, split='train', workers=None, **kwargs):
  config = input_lib.InputConfig(source=kind, path=path, split=split, image_size=16,
                                 **kwargs)
  return input_lib.create_input(config, tokenizer, global_batch_size=4, seed=0,
                                workers=workers)


@pytest.mark.parametrize('write', [own_data.write_metadata_folder, own_data.write_csv_folder,
                                   own_data.write_sidecar_folder])
def test_each_folder_layout_gives_every_image_with_its_caption(tmp_path, write):
  folder = write(str(tmp_path), COUNT)
  records = _records('folder', folder)
  assert [os.path.basename(r.name) for r in records] == [own_data.file_name(i)
                                                         for i in range(COUNT)]
  for index, record in enumerate(records):
    assert record.captions == (own_data.scene_caption(index),)
  source = files.RecordSource(records, 'test')
  for index in (0, 1):  # png, webp: lossless
    np.testing.assert_array_equal(source[index]['image'], own_data.scene_image(index))


def test_webdataset_of_two_shards_reads_txt_and_json_captions(tmp_path):
  pattern = own_data.write_webdataset(str(tmp_path), COUNT)
  records = _records('webdataset', pattern)
  assert [r.captions for r in records] == [(own_data.scene_caption(i),) for i in range(COUNT)]
  assert [os.path.basename(r.path) for r in records] == (
      ['00000.tar'] * (COUNT // 2) + ['00001.tar'] * (COUNT // 2))
  source = files.RecordSource(records, 'test')
  for index in (0, 1, COUNT // 2):  # png, webp, png: lossless
    np.testing.assert_array_equal(source[index]['image'], own_data.scene_image(index))
  comma_separated = ','.join(sorted(str(p) for p in tmp_path.glob('*.tar')))
  assert _records('webdataset', comma_separated) == records


@pytest.mark.parametrize('kind', ['folder', 'webdataset'])
def test_batches_resume_exactly_whatever_the_workers(tmp_path, tokenizer, kind):
  path = (own_data.write_metadata_folder(str(tmp_path), COUNT) if kind == 'folder'
          else own_data.write_webdataset(str(tmp_path), COUNT))
  kwargs = dict(crop='random', random_flip=True)
  data = _pipeline(kind, path, tokenizer, **kwargs)
  continued = list(itertools.islice(data.batches(0), 7))  # past the end of two epochs
  resumed = list(itertools.islice(_pipeline(kind, path, tokenizer, workers=1,
                                            **kwargs).batches(4), 3))
  for a, b in zip(continued[4:], resumed, strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert continued[0]['image'].shape == (4, 16, 16, 3)
  assert continued[0]['image'].dtype == np.uint8


def test_random_crops_and_flips_are_drawn_per_sample_and_repeatable(tmp_path, tokenizer):
  folder = own_data.write_sidecar_folder(str(tmp_path), 2)
  centre = _pipeline('folder', folder, tokenizer)
  random = _pipeline('folder', folder, tokenizer, crop='random', random_flip=True)
  stored = np.asarray(Image.open(os.path.join(folder, own_data.file_name(0))).convert('RGB'))
  _, image = centre.load_example(0, epoch=0)
  np.testing.assert_array_equal(image, input_lib.model_image(stored, 16))
  shown = [random.load_example(0, epoch)[1] for epoch in range(16)]
  np.testing.assert_array_equal(shown[3], random.load_example(0, 3)[1])
  assert len({image.tobytes() for image in shown}) > 2  # 4 offsets x 2 flips, 16 epochs
  # Each is a 16x16 window of the image resized to 16x19, flipped or not.
  resized = np.asarray(Image.fromarray(stored).resize((19, 16), Image.Resampling.BICUBIC))
  windows = [resized[:, left:left + 16] for left in range(4)]
  windows += [w[:, ::-1] for w in windows]
  for image in shown:
    assert any(np.array_equal(image, w) for w in windows)


def _saved(image: Image.Image, image_format: str) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format=image_format)
  return buffer.getvalue()


@pytest.mark.parametrize('mode, image_format, expected', [
    ('L', 'png', [90, 90, 90]),
    ('LA', 'png', [255, 255, 255]),          # fully transparent: white
    ('RGBA', 'png', [255, 255, 255]),
    ('CMYK', 'jpeg', None),                  # Pillow's conversion; checked for shape
    ('I;16', 'png', [90, 90, 90]),           # 16-bit: 90 * 257 -> 90
    ('P', 'png', [10, 20, 30]),
])
def test_every_mode_becomes_8_bit_rgb(mode, image_format, expected):
  if mode == 'I;16':
    image = Image.fromarray(np.full((6, 5), 90 * 257, np.uint16))
  elif mode == 'P':
    image = Image.new('RGB', (5, 6), (10, 20, 30)).convert('P', palette=Image.Palette.ADAPTIVE)
  elif mode in ('LA', 'RGBA'):
    image = Image.new(mode, (5, 6))  # transparent black
  else:
    image = Image.new(mode, (5, 6), 90 if mode == 'L' else (0, 0, 0, 0))
  pixels = files.decode_image(_saved(image, image_format), 'test')
  assert pixels.shape == (6, 5, 3) and pixels.dtype == np.uint8
  if expected is not None:
    np.testing.assert_array_equal(pixels[3, 2], expected)


def test_a_truncated_jpeg_is_skipped_with_a_count(tmp_path, tokenizer, caplog):
  folder = own_data.write_sidecar_folder(str(tmp_path), COUNT)
  own_data.truncate(os.path.join(folder, own_data.file_name(2)))  # a jpg
  data = _pipeline('folder', folder, tokenizer, max_bad_fraction=0.1)
  with caplog.at_level(logging.WARNING):
    first, _ = data.load_example(2, epoch=0)
  assert first['caption'] == [own_data.scene_caption(3)]  # the next readable example
  assert 'input: skipped an unreadable image (0002.jpg: ' in caplog.text
  assert '1 so far of 12 examples' in caplog.text
  again, _ = data.load_example(2, epoch=5)
  assert again['caption'] == first['caption']
  for step in range(6):  # every example is loaded: the run goes on
    data.batch(step)


def test_more_unreadable_images_than_allowed_stop_the_run(tmp_path, tokenizer):
  folder = own_data.write_sidecar_folder(str(tmp_path), COUNT)
  for index in (2, 5):
    own_data.truncate(os.path.join(folder, own_data.file_name(index)))
  data = _pipeline('folder', folder, tokenizer, max_bad_fraction=0.1)
  with pytest.raises(ValueError, match=r'^input: 2 images of folder .*:train \(12 examples\) '
                                       r'cannot be read, more than data.max_bad_fraction=0.1; '
                                       r'the latest: 000[25].jpg: '):
    for step in range(3):  # an epoch
      data.batch(step)


def test_metadata_naming_missing_files_skips_them_with_a_count(tmp_path, caplog):
  folder = own_data.write_metadata_folder(str(tmp_path), COUNT)
  with open(os.path.join(folder, 'metadata.jsonl'), 'a') as f:
    f.write(json.dumps({'file_name': 'images/gone.png', 'text': 'a red circle'}) + '\n')
  with caplog.at_level(logging.WARNING):
    assert len(_records('folder', folder, max_bad_fraction=0.1)) == COUNT
  assert ('1 of 13 examples skipped: 1 named in the metadata but missing (first: '
          'images/gone.png)') in caplog.text
  with pytest.raises(ValueError, match=r'image folder .*: 1 of 13 examples unusable, more than '
                                       r'data.max_bad_fraction=0: 1 named in the metadata but '
                                       r'missing \(first: images/gone.png\); fix them or raise'):
    _records('folder', folder, max_bad_fraction=0.0)


def test_a_tar_sample_without_caption_is_skipped_with_a_count(tmp_path, caplog):
  pattern = own_data.write_webdataset(str(tmp_path), COUNT)
  with tarfile.open(str(tmp_path / '00002.tar'), 'w') as tar:
    own_data.add_member(tar, 'lonely.jpg', own_data.encoded(own_data.scene_image(0), 'jpg'))
  with caplog.at_level(logging.WARNING):
    records = _records('webdataset', pattern, max_bad_fraction=0.1)
  assert len(records) == COUNT
  assert f'1 of 13 examples skipped: 1 without a caption (first: {tmp_path}/00002.tar:lonely)' in (
      caplog.text)


@pytest.mark.parametrize('write, message', [
    (lambda folder: own_data.write_images(folder, 3),
     r'^image folder {folder} has no captions: give metadata.jsonl \(file_name, text\), '
     r'metadata.csv or a .txt beside each image$'),
    (lambda folder: None, r'^image folder {folder} holds no image'),
])
def test_a_folder_without_captions_or_images_is_named(tmp_path, write, message):
  folder = str(tmp_path / 'data')
  os.makedirs(folder)
  write(folder)
  with pytest.raises(ValueError, match=message.format(folder=folder)):
    _records('folder', folder)


def test_compressed_or_missing_shards_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'webdataset shards /no/such/\*.tar: no such file'):
    _records('webdataset', '/no/such/*.tar')
  path = tmp_path / 'shard.tar'
  with tarfile.open(str(path), 'w:gz') as tar:
    own_data.add_member(tar, 'a.txt', b'a red circle')
  with pytest.raises(ValueError, match=f'webdataset shard {path} is not an uncompressed tar'):
    _records('webdataset', str(path))


def test_splits_are_slices_of_train(tmp_path):
  folder = own_data.write_sidecar_folder(str(tmp_path), COUNT)
  def names(split):
    source = files.open_file_source('folder', folder, split, 0.0, captions_only=True)
    return [r.name for r in source.records]
  assert names('train[:-4]') + names('train[-4:]') == names('train')
  assert len(names('train[50%:]')) == COUNT // 2
  with pytest.raises(ValueError, match=r"folder .*: split 'validation': Unknown split "
                                       r"'validation'.*; a folder or webdataset has one split"):
    names('validation')


def test_captions_only_reads_no_image(tmp_path):
  folder = own_data.write_sidecar_folder(str(tmp_path), 3)
  own_data.truncate(os.path.join(folder, own_data.file_name(2)))
  config = input_lib.InputConfig(source='folder', path=folder)
  assert input_lib.all_captions(config) == [own_data.scene_caption(i) for i in range(3)]
  assert input_lib.describe(config) == f'folder {folder}:train'
