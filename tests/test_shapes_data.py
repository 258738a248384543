"""The captioned-shapes dataset (determinism, captions, rendering) and its word tokenizer."""
import glob
import itertools
import os
import re

import numpy as np
import pytest

from instaflow_jax.data import shapes
from instaflow_jax.data.tokenizer import WordTokenizer

SMALL = {'train': 24, 'validation': 4, 'test': 4}
SCENES = [shapes.sample_scene(split, i) for split in ('train', 'test') for i in range(300)]


def _build_files(data_dir):
  """The bytes of every record file of a small 16x16 build, by file name."""
  shapes.prepared_builder(16, str(data_dir), SMALL)
  files = glob.glob(os.path.join(str(data_dir), '**', '*.array_record*'), recursive=True)
  assert len(files) >= 3
  return {os.path.basename(f): open(f, 'rb').read() for f in files}


def test_two_builds_are_identical(tmp_path):
  assert _build_files(tmp_path / 'a') == _build_files(tmp_path / 'b')


def test_split_holds_its_scenes(tmp_path):
  source = shapes.load_split('train', 16, str(tmp_path), SMALL)
  assert len(source) == SMALL['train']
  for index, example in enumerate(source):
    scene = shapes.sample_scene('train', index)
    assert example['caption'].decode() == shapes.caption(scene)
    np.testing.assert_array_equal(example['image'], shapes.render(scene, 16))
    assert shapes.Scene.from_labels(example).labels() == scene.labels()
    assert example['count'] == len(scene.shapes)


_ONE = re.compile(r'a (\w+) (\w+) (\w+) (?:at the (.+)|in the (center))$')
_TWO = re.compile(r'a (\w+) (\w+) (\w+) (to the left of|to the right of|above|below) '
                  r'a (\w+) (\w+) (\w+)$')
_PHRASES = {'to the left of': 'left of', 'to the right of': 'right of', 'above': 'above',
            'below': 'below'}


def _parse(caption):
  """(size, colour, shape[, position]) of each shape, and the relation, read off a caption."""
  one = _ONE.match(caption)
  if one:
    return [one.group(1, 2, 3) + (one.group(4) or one.group(5),)], None
  two = _TWO.match(caption)
  return [two.group(1, 2, 3), two.group(5, 6, 7)], _PHRASES[two.group(4)]


def test_captions_state_the_attributes():
  for scene in SCENES:
    parsed, relation = _parse(shapes.caption(scene))
    assert relation == scene.relation
    for words, shape in zip(parsed, scene.shapes, strict=True):
      expected = (shape.size, shape.colour, shape.shape, shape.position)
      assert words == expected[:len(words)]


def test_scene_statistics():
  counts = [len(s.shapes) for s in SCENES]
  assert 0.4 < counts.count(2) / len(counts) < 0.6
  drawn = {name: {getattr(shape, name) for s in SCENES for shape in s.shapes}
           for name in shapes.ATTRIBUTES}
  assert drawn == {name: set(shapes.label_names(f'{name}_1')) for name in shapes.ATTRIBUTES}
  assert {s.relation for s in SCENES if s.relation} == set(shapes.RELATIONS)
  for scene in SCENES:
    if scene.relation:
      (r1, c1), (r2, c2) = (divmod(shapes.POSITIONS.index(s.position), 3) for s in scene.shapes)
      horizontal = scene.relation in ('left of', 'right of')
      assert (abs(c1 - c2) >= abs(r1 - r2)) if horizontal else (abs(r1 - r2) >= abs(c1 - c2))


def test_invalid_scenes_are_refused():
  left, right = (shapes.Shape('circle', 'red', 'small', p) for p in ('left', 'right'))
  with pytest.raises(ValueError, match='does not hold'):
    shapes.Scene((left, right), 'right of')
  with pytest.raises(ValueError, match='share the cell'):
    shapes.Scene((left, left), 'left of')
  with pytest.raises(ValueError, match='colour'):
    shapes.Shape('circle', 'pink', 'small', 'left')


def _changed(image):
  return np.any(image != np.array(shapes.BACKGROUND, np.uint8), axis=-1)


def _coverage(image, colour):
  """Per pixel, the fraction of `colour` over the background; asserts no other colour is in."""
  background = np.array(shapes.BACKGROUND, np.float64)
  direction = np.array(shapes.RGB[colour], np.float64) - background
  alpha = (image - background) @ direction / (direction @ direction)
  np.testing.assert_allclose(image, background + alpha[..., None] * direction, atol=1.5)
  return alpha


@pytest.mark.parametrize('size', [16, 32])
def test_shape_is_drawn_in_its_colour_and_cell(size):
  cell = size / 3
  for shape, colour, scale, offset in itertools.product(
      shapes.SHAPES, shapes.COLOURS, shapes.SIZES, ((0, 0), (1, 1), (-1, 1))):
    position = shapes.POSITIONS[(shapes.SHAPES.index(shape) + 3 * shapes.SIZES.index(scale)
                                 + shapes.COLOURS.index(colour)) % 9]
    image = shapes.render(shapes.Scene((shapes.Shape(shape, colour, scale, position, offset),)),
                          size)
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    alpha = _coverage(image, colour)
    assert alpha.max() >= 0.7, (shape, colour, scale)
    rows, cols = np.nonzero(_changed(image))
    row, col = divmod(shapes.POSITIONS.index(position), 3)
    assert np.floor(row * cell) <= rows.min() and rows.max() < np.ceil((row + 1) * cell)
    assert np.floor(col * cell) <= cols.min() and cols.max() < np.ceil((col + 1) * cell)


def test_two_shapes_keep_to_their_cells():
  for scene in SCENES:
    if len(scene.shapes) < 2:
      continue
    both = shapes.render(scene, 32)
    alone = [shapes.render(shapes.Scene((shape,)), 32) for shape in scene.shapes]
    first, second = (_changed(image) for image in alone)
    assert not np.any(first & second)
    np.testing.assert_array_equal(both, np.where(first[..., None], alone[0], alone[1]))


def test_tokenizer_layout():
  tokenizer = WordTokenizer.for_shapes()
  captions = ['a small red circle at the top left', 'a large blue square above a small green cross']
  ids = tokenizer(captions, padding='max_length', max_length=16, truncation=True,
                  return_tensors='np').input_ids
  assert ids.shape == (2, 16) and ids.dtype == np.int32
  assert tokenizer.pad_token_id == tokenizer.eos_token_id == len(tokenizer) - 1
  for row, caption in zip(ids, captions):
    n = len(caption.split())
    assert row[0] == tokenizer.bos_token_id
    assert np.all(row[n + 1:] == tokenizer.eos_token_id)
    assert tokenizer.unk_token_id not in row and tokenizer.eos_token_id not in row[:n + 1]
    # Pooling at the first eos and, for legacy configs, at argmax(ids) agree.
    assert np.argmax(row) == n + 1
  assert tokenizer.decode(ids[0]) == captions[0]


def test_tokenizer_round_trips_every_caption(tmp_path):
  tokenizer = WordTokenizer.for_shapes()
  captions = [shapes.caption(s) for s in SCENES]
  ids = tokenizer(captions).input_ids
  assert ids.shape == (len(captions), tokenizer.model_max_length)
  assert [tokenizer.decode(row) for row in ids] == captions
  tokenizer.save_pretrained(str(tmp_path))
  loaded = WordTokenizer.from_pretrained(str(tmp_path))
  assert loaded.vocab == tokenizer.vocab and loaded.model_max_length == tokenizer.model_max_length
  np.testing.assert_array_equal(loaded(captions).input_ids, ids)


def test_tokenizer_normalises_and_handles_unknown_and_long_text():
  tokenizer = WordTokenizer.for_shapes(max_length=6)
  ids = tokenizer('A RED, zebra!').input_ids[0]
  assert tokenizer.decode(ids) == 'a red <unk>'
  assert ids[3] == tokenizer.unk_token_id
  long = tokenizer(['a small red circle at the top left']).input_ids[0]
  assert tokenizer.decode(long) == 'a small red circle' and long[-1] == tokenizer.eos_token_id
  with pytest.raises(ValueError, match='truncation=False'):
    tokenizer('a small red circle at the top left', truncation=False)
  longest = tokenizer(['a red', 'a red circle'], padding='longest').input_ids
  assert longest.shape == (2, 5)
