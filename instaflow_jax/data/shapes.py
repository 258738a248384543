"""Captioned shapes: a synthetic text-to-image dataset generated locally, bit for bit.

Each image is a plain dark background with one or two shapes, each a (shape, colour,
size) placed in one cell of a 3x3 grid; two shapes never share a cell. The caption says
exactly what is drawn:

    one shape:   "a small red circle at the top left"   ("in the center" for the center)
    two shapes:  "a large blue square to the left of a small green triangle"

For two shapes the caption names each shape's (size, colour, shape) and how the first
stands to the second (RELATIONS); the cells themselves are kept as labels, so an
evaluator can check the relation on the cells it predicts (`relations_between`).

Example i of a split is drawn from `np.random.default_rng([split seed, i])` using only
uniform doubles, and rendered with integer arithmetic, so a split is identical on every
machine, and its attributes do not depend on the image size.

    source = shapes.load_split('train', image_size=32)   # builds once, then random access
    example = source[0]   # {'image': uint8 [32, 32, 3], 'caption': ..., 'shape_1': 2, ...}
"""
import dataclasses
import io
from typing import Mapping, Optional, Tuple

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

# Attribute vocabularies, in label order. The second shape's labels append NONE.
SHAPES = ('circle', 'square', 'triangle', 'cross')  # tell apart even at 16x16
COLOURS = ('red', 'green', 'blue', 'yellow', 'purple', 'white')
SIZES = ('small', 'large')
POSITIONS = ('top left', 'top', 'top right', 'left', 'center', 'right',
             'bottom left', 'bottom', 'bottom right')  # row-major cells of the 3x3 grid
RELATIONS = ('left of', 'right of', 'above', 'below')  # how shape 1 stands to shape 2
NONE = 'none'
ATTRIBUTES = ('shape', 'colour', 'size', 'position')  # of each shape
# The class-label features: `{attribute}_{1 or 2}` and the relation (NONE for one shape).
LABEL_KEYS = tuple(f'{a}_{k}' for k in (1, 2) for a in ATTRIBUTES) + ('relation',)

RGB = {'red': (230, 50, 50), 'green': (50, 190, 70), 'blue': (60, 100, 245),
       'yellow': (240, 215, 50), 'purple': (170, 70, 220), 'white': (235, 235, 235)}
BACKGROUND = (20, 20, 30)

# Half the extent of a shape, and how far it may move off its cell's centre, in cells.
# Their sum is 0.44: a shape stays in its cell, 0.12 cell (over a pixel from 32x32 up)
# clear of a shape in the next cell.
HALF_EXTENT = {'small': 0.26, 'large': 0.40}
MAX_OFFSET = {'small': 0.18, 'large': 0.04}
SUPERSAMPLING = 4  # each pixel is the average of 4x4 samples

SPLIT_SEEDS = {'train': 1, 'validation': 2, 'test': 3}
DEFAULT_NUM_EXAMPLES = {'train': 20000, 'validation': 1000, 'test': 1000}
IMAGE_SIZES = (16, 24, 32)

_RELATION_PHRASES = {'left of': 'to the left of', 'right of': 'to the right of',
                     'above': 'above', 'below': 'below'}
_NUM_UNIFORMS = 14  # per example, whatever its count, so the stream layout is fixed


@dataclasses.dataclass(frozen=True)
class Shape:
  """One shape; `offset` in [-1, 1]^2 moves it within its cell (a fraction of MAX_OFFSET)."""
  shape: str
  colour: str
  size: str
  position: str
  offset: Tuple[float, float] = (0.0, 0.0)

  def __post_init__(self):
    for name in ATTRIBUTES:
      vocab = label_names(f'{name}_1')
      if getattr(self, name) not in vocab:
        raise ValueError(f'shapes: {name}={getattr(self, name)!r} is not one of {vocab}')
    if max(abs(o) for o in self.offset) > 1:
      raise ValueError(f'shapes: offset={self.offset} must lie in [-1, 1]^2')


@dataclasses.dataclass(frozen=True)
class Scene:
  """The attributes of one image: one or two shapes, and the relation of the first to the second."""
  shapes: Tuple[Shape, ...]
  relation: Optional[str] = None

  def __post_init__(self):
    if len(self.shapes) not in (1, 2):
      raise ValueError(f'shapes: a scene has 1 or 2 shapes, got {len(self.shapes)}')
    if len(self.shapes) == 1:
      if self.relation is not None:
        raise ValueError('shapes: a scene with one shape has no relation')
      return
    first, second = self.shapes
    if first.position == second.position:
      raise ValueError(f'shapes: two shapes share the cell {first.position!r}')
    if self.relation not in relations_between(first.position, second.position):
      raise ValueError(f'shapes: relation {self.relation!r} does not hold between '
                       f'{first.position!r} and {second.position!r}')

  def labels(self) -> dict:
    """The feature values (strings; NONE for an absent second shape); see `Scene.from_labels`."""
    labels = {'count': len(self.shapes), 'relation': self.relation or NONE}
    for k in (1, 2):
      shape = self.shapes[k - 1] if k <= len(self.shapes) else None
      for name in ATTRIBUTES:
        labels[f'{name}_{k}'] = getattr(shape, name) if shape else NONE
    return labels

  @classmethod
  def from_labels(cls, labels: Mapping) -> 'Scene':
    """A scene from label values: strings, or class indices as the dataset stores them."""
    def value(key):
      label = labels[key]
      if isinstance(label, (str, bytes)):
        return label.decode() if isinstance(label, bytes) else label
      return label_names(key)[int(label)]

    shapes = tuple(Shape(*(value(f'{name}_{k}') for name in ATTRIBUTES))
                   for k in (1, 2) if value(f'shape_{k}') != NONE)
    relation = value('relation')
    return cls(shapes, None if relation == NONE else relation)


def label_names(key: str) -> Tuple[str, ...]:
  """The class names of the label feature `key` (one of LABEL_KEYS), in index order."""
  if key == 'relation':
    return RELATIONS + (NONE,)
  name, k = key.rsplit('_', 1)
  vocab = {'shape': SHAPES, 'colour': COLOURS, 'size': SIZES, 'position': POSITIONS}[name]
  return vocab + (NONE,) if k == '2' else vocab


def _cell(position: str) -> Tuple[int, int]:
  return divmod(POSITIONS.index(position), 3)


def relations_between(first: str, second: str) -> Tuple[str, ...]:
  """Every relation in RELATIONS that holds from the cell `first` to the cell `second`."""
  (r1, c1), (r2, c2) = _cell(first), _cell(second)
  holds = {'left of': c1 < c2, 'right of': c1 > c2, 'above': r1 < r2, 'below': r1 > r2}
  return tuple(r for r in RELATIONS if holds[r])


def _dominant_relation(first: str, second: str, tie_break: float) -> str:
  """The relation along the axis where the cells differ most; `tie_break` picks on diagonals."""
  (r1, c1), (r2, c2) = _cell(first), _cell(second)
  horizontal = 'left of' if c1 < c2 else 'right of'
  vertical = 'above' if r1 < r2 else 'below'
  if abs(c1 - c2) != abs(r1 - r2):
    return horizontal if abs(c1 - c2) > abs(r1 - r2) else vertical
  return horizontal if tie_break < 0.5 else vertical


def _pick(vocab, u: float):
  return vocab[int(u * len(vocab))]


def sample_scene(split: str, index: int) -> Scene:
  """The scene of example `index` of `split`: a pure function of (split seed, index)."""
  u = np.random.default_rng([SPLIT_SEEDS[split], index]).random(_NUM_UNIFORMS)
  count = 1 if u[0] < 0.5 else 2
  first = _pick(POSITIONS, u[1])
  second = _pick([p for p in POSITIONS if p != first], u[2])
  shapes = tuple(
      Shape(_pick(SHAPES, a), _pick(COLOURS, b), _pick(SIZES, c), position,
            (float(2 * x - 1), float(2 * y - 1)))
      for (a, b, c, x, y), position in zip(u[3:13].reshape(2, 5), (first, second)))[:count]
  relation = _dominant_relation(first, second, u[13]) if count == 2 else None
  return Scene(shapes, relation)


def caption(scene: Scene) -> str:
  """The caption that describes `scene` exactly (see the module docstring)."""
  def phrase(shape):
    return f'a {shape.size} {shape.colour} {shape.shape}'

  if len(scene.shapes) == 1:
    shape, = scene.shapes
    where = 'in the center' if shape.position == 'center' else f'at the {shape.position}'
    return f'{phrase(shape)} {where}'
  first, second = scene.shapes
  return f'{phrase(first)} {_RELATION_PHRASES[scene.relation]} {phrase(second)}'


def vocabulary() -> Tuple[str, ...]:
  """Every word any caption can use, sorted."""
  words = set('a at the in'.split())
  for phrase in SHAPES + COLOURS + SIZES + POSITIONS + tuple(_RELATION_PHRASES.values()):
    words.update(phrase.split())
  return tuple(sorted(words))


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Whether the points (u, v), in units of the half-extent about the centre, are inside."""
  au, av = np.abs(u), np.abs(v)
  if shape == 'circle':
    return u * u + v * v <= 1.0
  if shape == 'square':
    return np.maximum(au, av) <= 0.85
  if shape == 'triangle':  # apex up at v=-0.9, base at v=0.8 of width 2
    return (v <= 0.8) & (1.7 * au <= v + 0.9)
  if shape == 'cross':
    return (np.maximum(au, av) <= 0.95) & (np.minimum(au, av) <= 0.33)
  raise ValueError(f'shapes: unknown shape {shape!r}')


def _draw(image: np.ndarray, shape: Shape):
  """Blends `shape` into `image` (int32 [S, S, 3]) by its 4x4-supersampled coverage."""
  size = image.shape[0]
  cell = size / 3
  row, col = _cell(shape.position)
  jitter = MAX_OFFSET[shape.size] * cell
  centre_x = (col + 0.5) * cell + shape.offset[0] * jitter
  centre_y = (row + 0.5) * cell + shape.offset[1] * jitter
  half = HALF_EXTENT[shape.size] * cell
  # Only the pixels that the shape's bounding box touches need samples.
  x0, y0 = max(0, int(np.floor(centre_x - half))), max(0, int(np.floor(centre_y - half)))
  x1, y1 = min(size, int(np.ceil(centre_x + half))), min(size, int(np.ceil(centre_y + half)))
  samples = (np.arange(SUPERSAMPLING) + 0.5) / SUPERSAMPLING
  xs = (np.arange(x0, x1)[:, None] + samples).reshape(-1)
  ys = (np.arange(y0, y1)[:, None] + samples).reshape(-1)
  inside = _inside(shape.shape, (xs[None, :] - centre_x) / half, (ys[:, None] - centre_y) / half)
  hits = inside.reshape(y1 - y0, SUPERSAMPLING, x1 - x0, SUPERSAMPLING).sum(axis=(1, 3))[..., None]
  total = SUPERSAMPLING * SUPERSAMPLING
  region = image[y0:y1, x0:x1]
  image[y0:y1, x0:x1] = (region * (total - hits) + np.array(RGB[shape.colour]) * hits
                         + total // 2) // total


def render(scene: Scene, image_size: int) -> np.ndarray:
  """The image of `scene`: uint8 [image_size, image_size, 3]."""
  image = np.empty((image_size, image_size, 3), np.int32)
  image[...] = BACKGROUND
  for shape in scene.shapes:
    _draw(image, shape)
  return image.astype(np.uint8)


def _png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='png')
  return buffer.getvalue()


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  """The image size and the number of examples of each split."""
  image_size: int = 32
  num_train: int = DEFAULT_NUM_EXAMPLES['train']
  num_validation: int = DEFAULT_NUM_EXAMPLES['validation']
  num_test: int = DEFAULT_NUM_EXAMPLES['test']

  def num_examples(self, split: str) -> int:
    return getattr(self, f'num_{split}')


def shapes_config(image_size: int = 32, num_examples: Optional[Mapping[str, int]] = None
                  ) -> ShapesConfig:
  """A config; one with other split sizes than the default gets its own name (and folder)."""
  counts = {**DEFAULT_NUM_EXAMPLES, **(num_examples or {})}
  unknown = set(counts) - set(SPLIT_SEEDS)
  if unknown:
    raise ValueError(f'shapes: unknown splits {sorted(unknown)}; known: {sorted(SPLIT_SEEDS)}')
  name = f'size{image_size}'
  if counts != DEFAULT_NUM_EXAMPLES:
    name += '_' + '_'.join(str(counts[s]) for s in SPLIT_SEEDS)
  return ShapesConfig(name=name, image_size=image_size,
                      **{f'num_{split}': n for split, n in counts.items()},
                      description=f'{image_size}x{image_size} images; '
                                  + ', '.join(f'{n} {s}' for s, n in counts.items()))


class CaptionedShapes(tfds.core.GeneratorBasedBuilder):
  """One or two coloured shapes on a 3x3 grid, with an exact caption and attribute labels."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  BUILDER_CONFIGS = [shapes_config(size) for size in IMAGE_SIZES]
  DEFAULT_CONFIG_NAME = 'size32'

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    labels = {key: tfds.features.ClassLabel(names=label_names(key)) for key in LABEL_KEYS}
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(size, size, 3)),
            'caption': tfds.features.Text(),
            'count': tfds.features.Scalar(np.int32),
            **labels,
        }),
        supervised_keys=('image', 'caption'),
        # Keep example i at index i of its split: random access by index is by example.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is generated here
    return {split: self._generate_examples(split) for split in SPLIT_SEEDS}

  def _generate_examples(self, split: str):
    config = self.builder_config
    for index in range(config.num_examples(split)):
      scene = sample_scene(split, index)
      yield index, {'image': _png(render(scene, config.image_size)),
                    'caption': caption(scene), **scene.labels()}


def prepared_builder(image_size: int = 32, data_dir: Optional[str] = None,
                     num_examples: Optional[Mapping[str, int]] = None) -> CaptionedShapes:
  """The builder, with every split generated (as array_record, for random access) if needed."""
  config = shapes_config(image_size, num_examples)
  # tfds accepts a config named like one of BUILDER_CONFIGS only if it is that very object.
  config = {c.name: c for c in CaptionedShapes.BUILDER_CONFIGS}.get(config.name, config)
  builder = CaptionedShapes(config=config, data_dir=data_dir, file_format='array_record')
  builder.download_and_prepare(file_format='array_record')
  return builder


def load_split(split: str, image_size: int = 32, data_dir: Optional[str] = None,
               num_examples: Optional[Mapping[str, int]] = None):
  """A random-access tfds data source over `split`, building the dataset first if needed."""
  return prepared_builder(image_size, data_dir, num_examples).as_data_source(split=split)
