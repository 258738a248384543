"""The evaluator of the embedded default: a small classifier of captioned-shapes images.

It reads what is in each cell of the 3x3 grid (empty, or a shape with its colour and
size), which is what the image alone determines: the caption's order of the two shapes
is not in the pixels. From the cells follow the count, the positions and the relation,
so a generated image can be checked against its prompt (`matches_prompt`). Its 64-d
penultimate features are the space of the Frechet distance between generated and real
images (the role Inception plays for photographs).

    evaluator = train_evaluator(train_images, train_labels, steps=2000, seed=0)
    features, cells = evaluator.predict(images)   # images float [B, H, W, 3] in [0, 1]
"""
import dataclasses
import time
from typing import Mapping, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from instaflow_jax.data import shapes

NUM_CELLS = len(shapes.POSITIONS)
# Per cell: the shape or empty (index len(SHAPES)), its colour and size.
CELL_CLASSES = {'shape': len(shapes.SHAPES) + 1, 'colour': len(shapes.COLOURS),
                'size': len(shapes.SIZES)}
EMPTY = len(shapes.SHAPES)
# Images are read at 24x24 (resized if need be): cells of 8x8 pixels.
EVAL_SIZE = 24
# The attributes whose accuracy on real held-out images is reported (and must be high
# for the metrics to mean anything).
ACCURACY_KEYS = ('count', 'position', 'shape', 'colour', 'size')
# Below this fraction of real held-out images read as their captions say, the evaluator
# itself caps every fidelity it reports (at 16x16 pixels it needs more steps than at 24).
MIN_REAL_FIDELITY = 0.95


class ShapesClassifier(nn.Module):
  """One small CNN applied to each of the 9 cells (a shape never leaves its cell, so a
  cell crop holds it whole): per-cell features and logits. The image's features are its
  cells' features side by side, so they keep the layout."""
  cell_features: int = 16

  @nn.compact
  def __call__(self, images: jax.Array):
    batch = images.shape[0]
    x = to_cells(jax.image.resize(images, (batch, EVAL_SIZE, EVAL_SIZE, 3), 'linear'))
    x = x * 2.0 - 1.0
    for features in (16, 32):
      x = nn.relu(nn.Conv(features, (3, 3))(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    cell_features = nn.relu(nn.Dense(self.cell_features, name='features')(
        x.reshape(x.shape[0], -1)))
    logits = nn.Dense(sum(CELL_CLASSES.values()), name='cells')(cell_features)
    logits = logits.reshape(batch, NUM_CELLS, -1)
    splits = np.cumsum(list(CELL_CLASSES.values()))[:-1]
    return (cell_features.reshape(batch, -1),
            dict(zip(CELL_CLASSES, jnp.split(logits, splits, axis=-1))))


def to_cells(images: jax.Array) -> jax.Array:
  """[B, S, S, C] -> [B*9, S/3, S/3, C], the cells in row-major order (as POSITIONS)."""
  batch, size, _, channels = images.shape
  cell = size // 3
  x = images.reshape(batch, 3, cell, 3, cell, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(batch * NUM_CELLS, cell, cell, channels)


def cell_targets(labels: Mapping[str, np.ndarray]) -> dict:
  """Per-cell class targets [B, 9] from the dataset's label indices (EMPTY where no shape;
  colour and size are 0 there and masked out of the loss)."""
  count = len(labels['shape_1'])
  targets = {'shape': np.full((count, NUM_CELLS), EMPTY, np.int32),
             'colour': np.zeros((count, NUM_CELLS), np.int32),
             'size': np.zeros((count, NUM_CELLS), np.int32)}
  rows = np.arange(count)
  for k in (1, 2):
    present = labels[f'shape_{k}'] < len(shapes.SHAPES)  # NONE is the last index of _2
    cells = labels[f'position_{k}'][present]
    for name in CELL_CLASSES:
      targets[name][rows[present], cells] = labels[f'{name}_{k}'][present]
  return targets


def classifier_loss(logits: dict, targets: dict) -> jax.Array:
  occupied = (targets['shape'] != EMPTY).astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits['shape'], targets['shape']).mean()
  for name in ('colour', 'size'):
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[name], targets[name])
    loss += jnp.sum(ce * occupied) / jnp.maximum(jnp.sum(occupied), 1.0)
  return loss


@dataclasses.dataclass
class Evaluator:
  params: dict
  batch_size: int = 256

  def predict(self, images: np.ndarray) -> Tuple[np.ndarray, dict]:
    """(features [B, 144], per-cell class predictions {'shape','colour','size'} [B, 9])."""
    features, cells = [], []
    for start in range(0, len(images), self.batch_size):
      batch = np.asarray(images[start:start + self.batch_size], np.float32)
      f, c = _predict(self.params, _pad(batch, self.batch_size))
      features.append(np.asarray(f)[:len(batch)])
      cells.append({k: np.asarray(v)[:len(batch)] for k, v in c.items()})
    return (np.concatenate(features),
            {k: np.concatenate([c[k] for c in cells]) for k in CELL_CLASSES})


def _pad(batch: np.ndarray, size: int) -> np.ndarray:
  """Pads the last batch to the full size: one compiled program for every batch."""
  missing = size - len(batch)
  return np.concatenate([batch, np.repeat(batch[-1:], missing, 0)]) if missing else batch


@jax.jit
def _predict(params, images):
  features, logits = ShapesClassifier().apply({'params': params}, images)
  return features, {k: jnp.argmax(v, -1) for k, v in logits.items()}


def train_evaluator(images: np.ndarray, labels: Mapping[str, np.ndarray], *, steps: int,
                    seed: int, batch_size: int = 64, lr: float = 2e-3) -> Evaluator:
  """Trains the classifier on real images (float [N, H, W, 3] in [0, 1]) and their labels."""
  targets = cell_targets(labels)
  model = ShapesClassifier()
  rng = jax.random.key(seed)
  params = jax.jit(model.init)(rng, jnp.zeros((1,) + images.shape[1:]))['params']
  optimizer = optax.adam(optax.cosine_decay_schedule(lr, steps))
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, batch_images, batch_targets):
    def loss_fn(p):
      return classifier_loss(model.apply({'params': p}, batch_images)[1], batch_targets)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  order = np.random.default_rng(seed)
  start = time.time()
  for i in range(steps):
    pick = order.integers(0, len(images), batch_size)
    params, opt_state, loss = step(params, opt_state, with_noise(images[pick], order),
                                   {k: v[pick] for k, v in targets.items()})
    if (i + 1) % max(steps // 5, 1) == 0:
      logging.info('eval: evaluator step %d/%d, loss %.4f, %.1f steps/s', i + 1, steps,
                   float(loss), (i + 1) / (time.time() - start))
  return Evaluator(params)


def with_noise(images: np.ndarray, rng: np.random.Generator, max_std: float = 0.05):
  """Real images plus Gaussian noise of a random strength per image: generated images
  carry faint noise that a classifier of clean renders alone would read as shapes."""
  std = rng.uniform(0.0, max_std, (len(images), 1, 1, 1))
  return (images + std * rng.standard_normal(images.shape)).astype(np.float32)


def misreading_warning(real_fidelity: float, steps: int):
  """The line to log when the evaluator misreads real images (None when it reads them)."""
  if real_fidelity >= MIN_REAL_FIDELITY:
    return None
  return (f'eval: the shapes evaluator reads only {real_fidelity:.1%} of the real held-out '
          "images as their captions say, and the models' fidelities are read as low: train it "
          f'longer (eval.evaluator_steps, now {steps}) and delete WORKDIR/eval/evaluator')


def attribute_accuracy(cells: dict, labels: Mapping[str, np.ndarray]) -> dict:
  """Per attribute, the fraction of real images (or real shapes) read correctly:
  count and position (the set of occupied cells) per image; shape, colour and size at
  each true shape's cell."""
  targets = cell_targets(labels)
  occupied_true = targets['shape'] != EMPTY
  occupied_pred = cells['shape'] != EMPTY
  accuracy = {'count': np.mean(occupied_true.sum(1) == occupied_pred.sum(1)),
              'position': np.mean(np.all(occupied_true == occupied_pred, axis=1))}
  for name in CELL_CLASSES:
    accuracy[name] = np.mean((cells[name] == targets[name])[occupied_true])
  return {k: float(v) for k, v in accuracy.items()}


def scene_of_cells(cells: dict, index: int) -> dict:
  """{cell index: (shape, colour, size) names} of the occupied cells of image `index`."""
  return {c: (shapes.SHAPES[cells['shape'][index, c]], shapes.COLOURS[cells['colour'][index, c]],
              shapes.SIZES[cells['size'][index, c]])
          for c in range(NUM_CELLS) if cells['shape'][index, c] != EMPTY}


def matches_prompt(scene: shapes.Scene, seen: Mapping[int, tuple]) -> bool:
  """Whether the cells read from an image show what the caption of `scene` says.

  One shape: that shape alone, in the named cell. Two shapes: exactly two, with the
  named attributes, standing in the named relation (the caption fixes no cells)."""
  wanted = [(s.shape, s.colour, s.size) for s in scene.shapes]
  if len(seen) != len(wanted):
    return False
  if len(wanted) == 1:
    return seen == {shapes.POSITIONS.index(scene.shapes[0].position): wanted[0]}
  (cell_a, a), (cell_b, b) = seen.items()
  for (first_cell, first), (second_cell, second) in (((cell_a, a), (cell_b, b)),
                                                     ((cell_b, b), (cell_a, a))):
    if (first, second) == tuple(wanted) and scene.relation in shapes.relations_between(
        shapes.POSITIONS[first_cell], shapes.POSITIONS[second_cell]):
      return True
  return False


# What prompt fidelity is also reported per: each attribute's own match (attribute_matches).
FIDELITY_ATTRIBUTES = ('colour', 'shape', 'size', 'count', 'position')
_SHAPE_ATTRIBUTES = ('shape', 'colour', 'size')  # the order of scene_of_cells' tuples


def attribute_matches(scene: shapes.Scene, seen: Mapping[int, tuple]) -> dict:
  """Per attribute of FIDELITY_ATTRIBUTES, whether the image shows what the caption says.

  colour, shape, size: the values the image shows are those the caption names (as
  multisets, so a missing or extra shape fails them too). count: the number of shapes.
  position: one shape in the named cell; for two, exactly two shapes standing in the named
  relation, the first being the one that agrees with the caption's first in most of its
  other attributes (either, on a tie)."""
  wanted = [tuple(getattr(s, name) for name in _SHAPE_ATTRIBUTES) for s in scene.shapes]
  matches = {name: sorted(v[i] for v in seen.values()) == sorted(w[i] for w in wanted)
             for i, name in enumerate(_SHAPE_ATTRIBUTES)}
  matches['count'] = len(seen) == len(wanted)
  matches['position'] = _position_matches(scene, seen, wanted)
  return matches


def _position_matches(scene: shapes.Scene, seen: Mapping[int, tuple], wanted: list) -> bool:
  if len(seen) != len(wanted):
    return False
  if len(wanted) == 1:
    return set(seen) == {shapes.POSITIONS.index(scene.shapes[0].position)}
  agreement = lambda a, b: sum(x == y for x, y in zip(a, b))
  (cell_a, a), (cell_b, b) = seen.items()
  orders = {((cell_a, cell_b)): agreement(a, wanted[0]) + agreement(b, wanted[1]),
            ((cell_b, cell_a)): agreement(b, wanted[0]) + agreement(a, wanted[1])}
  best = max(orders.values())
  return any(scene.relation in shapes.relations_between(shapes.POSITIONS[first],
                                                        shapes.POSITIONS[second])
             for (first, second), score in orders.items() if score == best)


# Fidelity is also reported among the prompts that name one shape and among those that
# name two, which are far harder (a relation, and two attributes to bind to each shape).
FIDELITY_BY_COUNT = {1: 'one_shape', 2: 'two_shapes'}


def prompt_fidelity(scenes: Sequence[shapes.Scene], cells: dict) -> dict:
  """The fraction of images that show their prompt (`fidelity`), of those that show each
  attribute of FIDELITY_ATTRIBUTES as it says (`fidelity_<attribute>`), and `fidelity`
  among the prompts of each count of FIDELITY_BY_COUNT that occurs (`fidelity_one_shape`,
  `fidelity_two_shapes`)."""
  seen = [scene_of_cells(cells, i) for i in range(len(scenes))]
  matched = np.array([matches_prompt(scene, s) for scene, s in zip(scenes, seen)])
  per_attribute = [attribute_matches(scene, s) for scene, s in zip(scenes, seen)]
  counts = np.array([len(scene.shapes) for scene in scenes])
  return {'fidelity': float(np.mean(matched)),
          **{f'fidelity_{name}': float(np.mean([m[name] for m in per_attribute]))
             for name in FIDELITY_ATTRIBUTES},
          **{f'fidelity_{name}': float(np.mean(matched[counts == count]))
             for count, name in FIDELITY_BY_COUNT.items() if np.any(counts == count)}}
