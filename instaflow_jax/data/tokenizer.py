"""A word-level tokenizer for a closed vocabulary, laid out like CLIP's tokenizer.

It stands in for transformers' CLIPTokenizer where captions come from a small known
vocabulary (the words of a dataset's captions): the same call, the same `.input_ids` layout

    [bos, word, ..., word, eos, pad, ..., pad]      with pad == eos,

and eos the largest id, so a CLIP text model pools the right position whether it looks
for the first eos or (legacy configs) the argmax of the ids.

    tokenizer = WordTokenizer.from_captions(captions)
    ids = tokenizer(['a small red circle at the top'], return_tensors='np').input_ids

A word outside the vocabulary becomes <unk>, with a warning that names it (once per word).
"""
import dataclasses
import json
import os
import re
from typing import Iterable, Optional, Sequence, Union

import numpy as np
from absl import logging

FILENAME = 'word_tokenizer.json'
UNK, BOS, EOS = '<unk>', '<|startoftext|>', '<|endoftext|>'
_PUNCTUATION = re.compile(r'[^\w\s]')


@dataclasses.dataclass
class Encoding:
  """What a tokenizer call returns, as transformers' BatchEncoding does (by attribute or key)."""
  input_ids: np.ndarray
  attention_mask: np.ndarray

  def __getitem__(self, key: str) -> np.ndarray:
    return getattr(self, key)


def words_of(text: str) -> list:
  """Lowercased words, punctuation replaced by spaces."""
  return _PUNCTUATION.sub(' ', text.lower()).split()


class WordTokenizer:
  """Words to ids: <unk> is 0, the words follow in the given order, then bos, then eos."""

  def __init__(self, words: Sequence[str], model_max_length: int = 16):
    words = list(dict.fromkeys(w for word in words for w in words_of(word)))
    self.vocab = [UNK] + words + [BOS, EOS]
    self._ids = {token: i for i, token in enumerate(self.vocab)}
    self.model_max_length = model_max_length
    self.unk_token_id = 0
    self.bos_token_id = len(self.vocab) - 2
    self.eos_token_id = len(self.vocab) - 1
    self.pad_token_id = self.eos_token_id
    self._warned = set()  # unknown words already named in a warning

  @classmethod
  def for_shapes(cls, max_length: int = 16) -> 'WordTokenizer':
    """The vocabulary of every captioned-shapes caption."""
    from instaflow_jax.data import shapes  # imports tensorflow_datasets: only when asked
    return cls(shapes.vocabulary(), model_max_length=max_length)

  @classmethod
  def from_captions(cls, captions: Iterable[str], max_length: int = 16) -> 'WordTokenizer':
    """Every word of `captions`, sorted: the same ids whatever the order of the captions
    (for the captioned shapes, those of `for_shapes`)."""
    words = sorted({w for caption in captions for w in words_of(caption)})
    if not words:
      raise ValueError('WordTokenizer: the captions have no words to make a vocabulary of')
    return cls(words, model_max_length=max_length)

  @classmethod
  def from_vocabulary_file(cls, path: str, max_length: int = 16) -> 'WordTokenizer':
    """The words of a text file, one a line, in id order; or of a word_tokenizer.json."""
    if not os.path.isfile(path):
      raise OSError(f'vocabulary file {path} not found')
    with open(path, encoding='utf-8') as f:
      if not path.endswith('.json'):
        return cls(f.read().splitlines(), model_max_length=max_length)
      try:
        words = json.load(f)['words']
      except (ValueError, KeyError, TypeError):
        raise ValueError(f'{path}: not a {FILENAME} (a JSON object with a "words" list)') from None
    return cls(words, model_max_length=max_length)

  def __len__(self) -> int:
    return len(self.vocab)

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  @property
  def words(self) -> list:
    """The vocabulary without the special tokens, in id order."""
    return self.vocab[1:-2]

  def encode(self, text: str) -> list:
    """bos, the ids of the words (<unk> for unknown ones), eos; no padding or truncation."""
    return self._encode_all([text])[0]

  def _encode_all(self, texts: Sequence[str]) -> list:
    """encode of each text, with one warning for the unknown words of them all."""
    words = [words_of(text) for text in texts]
    self._warn_unknown([w for text_words in words for w in text_words])
    return [[self.bos_token_id] + [self._ids.get(w, self.unk_token_id) for w in text_words]
            + [self.eos_token_id] for text_words in words]

  def _warn_unknown(self, words: Sequence[str]) -> None:
    """Names the words outside the vocabulary that no warning has named yet: an <unk>
    would otherwise go unnoticed (the model reads every such word the same)."""
    unknown = [w for w in dict.fromkeys(words) if w not in self._ids and w not in self._warned]
    if unknown:
      self._warned.update(unknown)
      logging.warning('WordTokenizer: %s not in the vocabulary of %d words; read as %s',
                      ', '.join(map(repr, unknown)), len(self.words), UNK)

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    """The words of `ids`, space separated; bos/eos/padding are dropped unless asked for."""
    special = {self.bos_token_id, self.eos_token_id}
    return ' '.join(self.vocab[int(i)] for i in ids
                    if not (skip_special_tokens and int(i) in special))

  def __call__(self, texts: Union[str, Sequence[str]], padding: Union[bool, str] = 'max_length',
               max_length: Optional[int] = None, truncation: bool = True,
               return_tensors: str = 'np') -> Encoding:
    """Token ids int32 [B, L] (one string is a batch of one): L is max_length (default
    model_max_length) with padding='max_length', the longest sequence with 'longest' or True."""
    if return_tensors != 'np':
      raise ValueError(f'WordTokenizer: return_tensors={return_tensors!r} is not supported '
                       "(only 'np')")
    if padding not in ('max_length', 'longest', True):
      raise ValueError(f'WordTokenizer: padding={padding!r} is not supported '
                       "('max_length', 'longest' or True)")
    texts = [texts] if isinstance(texts, str) else list(texts)
    max_length = max_length or self.model_max_length
    sequences = [self._truncate(ids, max_length, truncation) for ids in self._encode_all(texts)]
    length = max_length if padding == 'max_length' else max(map(len, sequences), default=0)
    input_ids = np.full((len(sequences), length), self.pad_token_id, np.int32)
    attention_mask = np.zeros((len(sequences), length), np.int32)
    for row, ids in enumerate(sequences):
      input_ids[row, :len(ids)] = ids
      attention_mask[row, :len(ids)] = 1
    return Encoding(input_ids, attention_mask)

  def _truncate(self, ids: list, max_length: int, truncation: bool) -> list:
    """Keeps bos, the first words and eos, as CLIP does, when `ids` is longer than max_length."""
    if len(ids) <= max_length:
      return ids
    if not truncation:
      raise ValueError(f'WordTokenizer: {len(ids)} tokens exceed max_length={max_length} '
                       'and truncation=False')
    return ids[:max_length - 1] + [self.eos_token_id]

  def save_pretrained(self, path: str) -> None:
    """Writes the vocabulary and max length to `path`/word_tokenizer.json."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, FILENAME), 'w') as f:
      json.dump({'words': self.words, 'model_max_length': self.model_max_length}, f,
                indent=1)

  @classmethod
  def from_pretrained(cls, path: str) -> 'WordTokenizer':
    """The tokenizer that `save_pretrained(path)` wrote."""
    with open(os.path.join(path, FILENAME)) as f:
      saved = json.load(f)
    return cls(saved['words'], model_max_length=saved['model_max_length'])


def tokenize(tokenizer, captions: Sequence[str]) -> np.ndarray:
  """Token ids padded (and truncated) to the tokenizer's max length, as SD pipelines do."""
  return np.asarray(tokenizer(
      list(captions), padding='max_length', max_length=tokenizer.model_max_length,
      truncation=True, return_tensors='np').input_ids, np.int32)
