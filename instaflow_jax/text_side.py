"""The embedded model's text side: a word tokenizer and a small CLIP text encoder.

The embedded model has no pretrained text encoder: its tokenizer knows the words of the
training captions (or of model.vocabulary) and its text encoder starts from random weights
from model.text_seed. Both are made once per run and stored in WORKDIR/text
(store_text_side); every stage, generate and eval read them from there (load_text_side),
so that later changes to the data, the config or this code's defaults cannot change what
a run's model reads. Where stage rf trains the text encoder with the U-Net
(rf.train_text_encoder), it then stores the trained weights there (store_trained_encoder),
frozen for every later stage; otherwise the random encoder stays, never trained.
"""
import dataclasses
import os
import shutil
import tempfile
from typing import Any

import jax
import ml_collections
from absl import logging

from instaflow_jax import parallel
from instaflow_jax import workdir as workdir_lib
from instaflow_jax.convert import diffusers as diffusers_io
from instaflow_jax.data.tokenizer import WordTokenizer
from instaflow_jax.models import abstract
from instaflow_jax.models.clip_text import CLIPTextConfig
from instaflow_jax.models.clip_text import CLIPTextModel


@dataclasses.dataclass(frozen=True)
class TextSide:
  """The embedded model's word tokenizer and frozen CLIP text encoder (module, params)."""
  tokenizer: WordTokenizer
  encoder: CLIPTextModel
  params: Any


def store_text_side(config: ml_collections.ConfigDict, workdir: str) -> bool:
  """Makes the embedded model's text side (make_text_side) and stores it in WORKDIR/text,
  once, before a run's first stage, so that every later use reads what training used
  whatever the data, the config or this code's defaults become.

  Nothing to do for a diffusers model (its folder holds its text side), for a workdir that
  has one, or for a run begun before text sides were stored (it keeps legacy_text_side).
  Returns whether it stored one.
  """
  if config.model.source != 'embedded':
    return False
  path = os.path.join(workdir, workdir_lib.TEXT_DIR)
  missing = not os.path.isdir(path) and not workdir_lib.has_begun_stages(workdir)
  parallel.sync('text side: looked')  # by every process, before process 0 writes it
  if not missing:
    return False
  # Made by every process (the same): reading the data is a step they take together.
  text = make_text_side(config)
  if jax.process_index() == 0:
    _write_text_side(path, text)
    logging.info('text side: %d words and a text encoder from model.text_seed=%d, stored in '
                 '%s', len(text.tokenizer.words), config.model.text_seed, path)
  parallel.sync('text side: stored')
  return True


def store_trained_encoder(workdir: str, encoder: CLIPTextModel, params) -> None:
  """Replaces the stored text encoder's weights by those stage rf trained with the U-Net
  (rf.train_text_encoder), which every later stage, generate and eval then read. The
  weights file is replaced by a rename: a crash leaves the old or the new one whole."""
  if jax.process_index() == 0:
    diffusers_io.save_component(os.path.join(workdir, workdir_lib.TEXT_DIR), 'text_encoder',
                                encoder.config, params)
    logging.info('text side: the trained text encoder stored in %s',
                 os.path.join(workdir, workdir_lib.TEXT_DIR))
  parallel.sync('text side: trained encoder stored')


def remove_text_side(workdir: str) -> None:
  if jax.process_index() == 0:
    shutil.rmtree(os.path.join(workdir, workdir_lib.TEXT_DIR))


def _write_text_side(path: str, text: TextSide) -> None:
  """Writes beside `path`, then renames: a crash leaves no half-written text side for a
  later run to trust."""
  staging = tempfile.mkdtemp(prefix=f'.{workdir_lib.TEXT_DIR}.tmp-', dir=os.path.dirname(path))
  try:
    text.tokenizer.save_pretrained(os.path.join(staging, workdir_lib.TEXT_DIR, 'tokenizer'))
    diffusers_io.save_component(os.path.join(staging, workdir_lib.TEXT_DIR), 'text_encoder',
                                text.encoder.config, text.params)
    os.rename(os.path.join(staging, workdir_lib.TEXT_DIR), path)
  finally:
    shutil.rmtree(staging)


def load_text_side(workdir: str, model_config: ml_collections.ConfigDict) -> TextSide:
  """The text side that the run in `workdir` stored (store_text_side); legacy_text_side
  for a run begun before text sides were stored."""
  if not workdir:
    raise ValueError("model.source='embedded': its text side is stored with its run; give "
                     'the workdir')
  path = os.path.join(workdir, workdir_lib.TEXT_DIR)
  if not os.path.isdir(path) and _trained_text_encoder(workdir):
    raise ValueError(f'{workdir} has no {workdir_lib.TEXT_DIR}/, which holds the text encoder '
                     f'its stage rf trained: copy the run\'s {workdir_lib.TEXT_DIR}/ with its '
                     'stages')
  if not os.path.isdir(path):
    logging.warning('%s has no %s/: a run from before text sides were stored; using the '
                    'captioned-shapes vocabulary and a text encoder from model.text_seed=%d, '
                    'as it did', workdir, workdir_lib.TEXT_DIR, model_config.text_seed)
    return legacy_text_side(model_config)
  _, encoder, params = diffusers_io.load_component(path, 'text_encoder')
  return TextSide(WordTokenizer.from_pretrained(os.path.join(path, 'tokenizer')), encoder,
                  params)


def _trained_text_encoder(workdir: str) -> bool:
  """Whether the run in `workdir` trains its text encoder, as the config.json that any of
  its stages wrote says (a stage of config.stages with train_text_encoder)."""
  def trains_it(run_config) -> bool:
    return any(run_config.get(stage, {}).get('train_text_encoder', False)
               for stage in run_config.get('stages', ()))

  return os.path.isdir(workdir) and any(
      trains_it(workdir_lib.read_stage_config(os.path.join(workdir, name)) or {})
      for name in os.listdir(workdir))


def make_text_side(config: ml_collections.ConfigDict) -> TextSide:
  """A new text side: the tokenizer of new_tokenizer and a text encoder with random
  weights from model.text_seed."""
  return _with_random_encoder(new_tokenizer(config), config.model)


def new_tokenizer(config: ml_collections.ConfigDict) -> WordTokenizer:
  """The words of the file model.vocabulary (one a line, or a word_tokenizer.json) or, when
  it is '', every word of the training captions (config.data's train_split), sorted."""
  model = config.model
  if model.get('vocabulary'):
    return WordTokenizer.from_vocabulary_file(model.vocabulary, model.max_length)
  from instaflow_jax.data import input as input_lib  # imports tfds and TensorFlow
  captions = input_lib.all_captions(input_lib.input_config(config.data, config.data.train_split))
  return WordTokenizer.from_captions(captions, model.max_length)


def legacy_text_side(model_config: ml_collections.ConfigDict) -> TextSide:
  """The text side of a run begun before text sides were stored, rebuilt as it was then
  at every use: the captioned-shapes vocabulary and model.text_seed's random encoder."""
  return _with_random_encoder(WordTokenizer.for_shapes(model_config.max_length), model_config)


def _with_random_encoder(tokenizer: WordTokenizer, model_config) -> TextSide:
  encoder = CLIPTextModel(CLIPTextConfig(
      vocab_size=len(tokenizer), max_position_embeddings=model_config.max_length,
      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id, projection_dim=None, **model_config.text_encoder))
  return TextSide(tokenizer, encoder, abstract.init_params(encoder, model_config.text_seed))
