"""The embedded model's text side: made from the training captions (or a vocabulary file),
stored once in WORKDIR/text (its encoder replaced by the trained one where stage rf trains
it), and what every later use of the run reads."""
import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import shapes as shapes_config
from instaflow_jax import checkpoint
from instaflow_jax import generate
from instaflow_jax import pipeline as pipeline_lib
from instaflow_jax import stages
from instaflow_jax import text_side
from instaflow_jax import workdir as workdir_lib
from instaflow_jax.data import input as input_lib
from instaflow_jax.data import shapes
from instaflow_jax.data.tokenizer import WordTokenizer
from instaflow_jax.models import abstract
from instaflow_jax.stages import common

pytestmark = pytest.mark.slow  # trains a run of stage rf

# Words the captioned-shapes vocabulary lacks ('handwritten', 'digit', 'seven', ...).
CAPTIONS = ('a handwritten digit seven', 'a blurry digit one on grey paper',
            'two handwritten zeros', 'a red digit nine at the top')
NEW_WORDS = {'handwritten', 'digit', 'seven', 'blurry', 'one', 'on', 'grey', 'paper', 'two',
             'zeros', 'nine'}


class TextSideDigits(tfds.core.GeneratorBasedBuilder):
  """16x16 images captioned with words outside the captioned-shapes vocabulary."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({'image': tfds.features.Image(shape=(16, 16, 3)),
                                             'caption': tfds.features.Text()}),
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(8, 0), 'validation': self._generate_examples(2, 1)}

  def _generate_examples(self, count: int, seed: int):
    rng = np.random.default_rng(seed)
    for index in range(count):
      yield index, {'image': rng.integers(0, 256, (16, 16, 3), np.uint8),
                    'caption': CAPTIONS[index % len(CAPTIONS)]}


def digits_config(data_dir: str):
  """configs/shapes.py:quick on TextSideDigits: stage rf only, two steps of batch 2, with
  the text encoder left as made (untrained)."""
  config = shapes_config.get_config('quick')
  config.stages = ('rf',)
  config.data.update(dict(name='text_side_digits', data_dir=data_dir, train_split='train',
                          eval_split='validation', image_size=16))
  config.rf.update(dict(steps=2, batch_size=2, log_every=1, checkpoint_every=2, sample_every=2,
                        num_samples=2, sample_steps=2, sample_guidance=3.0,
                        train_text_encoder=False))
  return config


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """(config, workdir, the Pipeline that stage rf built) of one run on TextSideDigits."""
  config = digits_config(str(tmp_path_factory.mktemp('tensorflow_datasets')))
  workdir = str(tmp_path_factory.mktemp('digits_run'))
  built = []
  from_config = pipeline_lib.Pipeline.from_config.__func__

  def recording(cls, *args, **kwargs):
    built.append(from_config(cls, *args, **kwargs))
    return built[-1]

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(pipeline_lib.Pipeline, 'from_config', classmethod(recording))
    stages.run_all(config, workdir)
  assert workdir_lib.is_complete(os.path.join(workdir, 'rf')) and len(built) == 1
  return config, workdir, built[0]


def stored_text_side(run):
  config, workdir, _ = run
  return text_side.load_text_side(workdir, config.model)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _final_unet(workdir, unet_params):
  return checkpoint.load_params(os.path.join(workdir, 'rf', workdir_lib.FINAL_PARAMS),
                                checkpoint.abstract_like(unet_params))


def test_training_reads_the_captions_words_as_tokens(run):
  config, workdir, trained_with = run
  stored = stored_text_side(run)
  assert NEW_WORDS <= set(stored.tokenizer.vocab)
  assert trained_with.tokenizer.vocab == stored.tokenizer.vocab
  assert_trees_equal(trained_with.text_encoder_params, stored.params)
  # The batches the stage trained on: every caption's words as their own tokens.
  data = common.training_input(config, os.path.join(workdir, 'rf'), trained_with, config.rf)
  ids = data.batch(0)['input_ids']
  assert stored.tokenizer.unk_token_id not in ids
  assert {stored.tokenizer.decode(row) for row in ids} <= set(CAPTIONS)


def test_generate_reproduces_the_training_pipelines_images(run):
  config, workdir, trained_with = run
  prompts = common.sample_prompts(config, config.rf.num_samples)
  final = _final_unet(workdir, trained_with.unet_params)
  # The stage's own sample grid function: its pipeline, prompts and noise.
  trained = common.make_sample_fn(trained_with, prompts, config.rf, config.seed)(final)
  pipe = pipeline_lib.load_pipeline(pipeline_lib.find_model(workdir))
  generated, _ = generate.generate_images(
      pipe, prompts, steps=config.rf.sample_steps, guidance=config.rf.sample_guidance,
      seed=config.seed, batch_size=len(prompts))
  assert generated.std() > 0.01, 'flat images would prove nothing'
  np.testing.assert_array_equal(generated, trained)  # tolerance 0


@pytest.fixture(scope='module')
def trained_encoder_run(tmp_path_factory):
  """(config, workdir, the Pipeline that stage rf built) of a run on TextSideDigits whose
  stage rf trains the text encoder too: four steps, checkpoints at 2 and 4, at a learning
  rate and without an EMA that move the encoder enough to change the images."""
  config = digits_config(str(tmp_path_factory.mktemp('tensorflow_datasets')))
  config.rf.update(dict(train_text_encoder=True, steps=4, checkpoint_every=2, sample_every=4,
                        ema_decay=0.0))
  config.rf.optimizer.update(dict(lr=1e-2, warmup_steps=0))
  workdir = str(tmp_path_factory.mktemp('trained_encoder_run'))
  stages.run_all(config, workdir)
  return config, workdir, pipeline_lib.Pipeline.for_training(config.model, config.seed, workdir)


def test_a_trained_text_encoder_is_what_the_run_reads_afterwards(trained_encoder_run):
  config, workdir, pipe = trained_encoder_run
  stored = text_side.load_text_side(workdir, config.model)
  untrained = abstract.init_params(stored.encoder, config.model.text_seed)
  # The stored encoder is the trained one: the embeddings of the captions' words moved.
  embeddings = lambda params: np.asarray(
      params['text_model']['embeddings']['token_embedding']['embedding'])
  words = [stored.tokenizer.vocab.index(word) for word in sorted(NEW_WORDS)]
  assert np.all(np.any(embeddings(stored.params)[words] != embeddings(untrained)[words], axis=1))
  # The stage's params are the U-Net's alone, and what generate reads, with the trained
  # encoder, draws the stage's last sample grid (its fixed prompts and noise).
  final = _final_unet(workdir, pipe.unet_params)
  prompts = common.sample_prompts(config, config.rf.num_samples)
  sample = common.make_sample_fn(pipe, prompts, config.rf, config.seed)
  loaded = pipeline_lib.load_pipeline(pipeline_lib.find_model(workdir))
  assert_trees_equal(loaded.text_encoder_params, stored.params)
  generated, _ = generate.generate_images(
      loaded, prompts, steps=config.rf.sample_steps, guidance=config.rf.sample_guidance,
      seed=config.seed, batch_size=len(prompts))
  np.testing.assert_array_equal(generated, sample(final, stored.params))  # tolerance 0
  assert np.abs(generated - sample(final, untrained)).max() > 1e-3


def test_a_killed_run_that_trains_the_text_encoder_resumes_exactly(trained_encoder_run,
                                                                   tmp_path):
  """Stage rf stopped after its checkpoint at step 2, before it stored the trained encoder,
  ends where the run that did not stop ended."""
  config, workdir, pipe = trained_encoder_run
  copy = str(tmp_path / 'resumed')
  shutil.copytree(workdir, copy)
  stage_dir = os.path.join(copy, 'rf')
  os.remove(os.path.join(stage_dir, workdir_lib.DONE_FILE))
  shutil.rmtree(os.path.join(stage_dir, workdir_lib.FINAL_PARAMS))
  shutil.rmtree(os.path.join(stage_dir, workdir_lib.CHECKPOINTS, '4'))
  encoder = text_side.load_text_side(copy, config.model).encoder
  text_side.store_trained_encoder(copy, encoder,
                                  abstract.init_params(encoder, config.model.text_seed))
  stages.run_all(config, copy)
  assert_trees_equal(_final_unet(copy, pipe.unet_params), _final_unet(workdir, pipe.unet_params))
  assert_trees_equal(text_side.load_text_side(copy, config.model).params,
                     text_side.load_text_side(workdir, config.model).params)


def test_a_run_copied_without_its_trained_text_encoder_is_refused(trained_encoder_run,
                                                                  tmp_path):
  _, workdir, _ = trained_encoder_run
  copy = str(tmp_path / 'copy')
  shutil.copytree(os.path.join(workdir, 'rf'), os.path.join(copy, 'rf'))
  with pytest.raises(ValueError, match=rf"^{copy} has no text/, which holds the text encoder "
                                       r"its stage rf trained: copy the run's text/"):
    pipeline_lib.Pipeline.from_checkpoint(workdir_lib.find_trained_params(copy))


def test_changed_defaults_change_nothing_for_a_run(run, tmp_path, monkeypatch):
  _, workdir, _ = run
  stored = stored_text_side(run)
  copy = str(tmp_path / 'run')
  shutil.copytree(workdir, copy)
  # Running the run again with other settings leaves its text side as it is (making a new
  # one would read this dataset and fail).
  changed = digits_config(str(tmp_path))
  changed.data.name = 'no_such_dataset'
  changed.model.text_seed = 999
  text_side.store_text_side(changed, copy)
  # And generate does not read the defaults of its stage's config.json.
  config_path = os.path.join(copy, 'rf', workdir_lib.CONFIG_FILE)
  with open(config_path) as f:
    stage_config = json.load(f)
  stage_config['model'].update(text_seed=999, vocabulary=str(tmp_path / 'missing.txt'))
  with open(config_path, 'w') as f:
    json.dump(stage_config, f)
  monkeypatch.setattr(shapes, 'vocabulary', lambda: ('circle',))
  loaded = pipeline_lib.Pipeline.from_checkpoint(workdir_lib.find_trained_params(copy))
  assert loaded.tokenizer.vocab == stored.tokenizer.vocab
  assert_trees_equal(loaded.text_encoder_params, stored.params)


def test_a_run_from_before_text_sides_loads_as_before(run, tmp_path, caplog):
  config, workdir, _ = run
  shutil.copytree(os.path.join(workdir, 'rf'), str(tmp_path / 'old' / 'rf'))
  with caplog.at_level(logging.WARNING):
    loaded = pipeline_lib.Pipeline.from_checkpoint(
        workdir_lib.find_trained_params(str(tmp_path / 'old')))
  assert 'has no text/: a run from before text sides were stored' in caplog.text
  assert loaded.tokenizer.vocab == WordTokenizer.for_shapes().vocab
  assert_trees_equal(loaded.text_encoder_params,
                     abstract.init_params(loaded.text_encoder, config.model.text_seed))


def test_unknown_words_are_named_once(caplog):
  tokenizer = WordTokenizer(['a red circle'])
  with caplog.at_level(logging.WARNING):
    ids = tokenizer(['a handwritten digit', 'a red digit seven']).input_ids
    tokenizer('a handwritten red seven')
  assert tokenizer.decode(ids[0]) == 'a <unk> <unk>'
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1
  assert "'handwritten', 'digit', 'seven' not in the vocabulary" in warnings[0]


@pytest.mark.parametrize('kind', ['txt', 'json'])
def test_a_vocabulary_file_gives_the_words_in_its_order(kind, tmp_path):
  words = ['zebra', 'apple', 'digit']
  path = str(tmp_path / f'vocabulary.{kind}')
  if kind == 'txt':
    with open(path, 'w') as f:
      f.write('\n'.join(words) + '\n')
  else:
    WordTokenizer(words, model_max_length=8).save_pretrained(str(tmp_path))
    path = str(tmp_path / 'word_tokenizer.json')
  config = digits_config(str(tmp_path))
  config.data.name = 'no_such_dataset'  # a vocabulary file: the captions are not read
  config.model.vocabulary = path
  tokenizer = text_side.new_tokenizer(config)
  assert tokenizer.words == words
  assert tokenizer.model_max_length == config.model.max_length


def test_a_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
  (tmp_path / 'words.txt').write_text('a\ndigit\n')
  config = digits_config(str(tmp_path))
  config.model.vocabulary = str(tmp_path / 'words.txt')

  def disk_full(*args):
    raise OSError('disk full')

  monkeypatch.setattr(pipeline_lib.diffusers_io, 'save_component', disk_full)
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  with pytest.raises(OSError, match='disk full'):
    text_side.store_text_side(config, workdir)  # after the tokenizer was written
  assert os.listdir(workdir) == []


def test_all_captions_reads_every_caption(run):
  config, _, _ = run
  input_config = input_lib.input_config(config.data, 'train')
  decoded = [input_lib.captions_of(example, 'caption')[0]
             for example in input_lib.open_source(input_config)]
  assert input_lib.all_captions(input_config, chunk_size=3) == decoded
  assert WordTokenizer.from_captions(decoded).vocab == stored_text_side(run).tokenizer.vocab
  assert WordTokenizer.from_captions(
      shapes.caption(shapes.sample_scene('train', i)) for i in range(200)).vocab == (
          WordTokenizer.for_shapes().vocab)
