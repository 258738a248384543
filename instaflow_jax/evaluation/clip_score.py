"""CLIP score: how well images match their captions, by a CLIP model's embeddings.

    clip_score = max(100 * mean_i cos(E_image_i, E_text_i), 0)

as torchmetrics computes it (its clamp applies to the mean, not to each pair). The model
is anything with `embed_images` and `embed_texts` (ClipEmbedder); TransformersClip wraps a
transformers PyTorch CLIPModel and its CLIPProcessor from a local folder.
"""
import os
from typing import Protocol, Sequence

import numpy as np

from instaflow_jax.images import to_uint8


class ClipEmbedder(Protocol):

  def embed_images(self, images: np.ndarray) -> np.ndarray:
    """[B, H, W, 3] images in [0, 1] -> [B, D] embeddings (any scale)."""

  def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
    """B captions -> [B, D] embeddings (any scale)."""


def _unit(embeddings: np.ndarray) -> np.ndarray:
  embeddings = np.asarray(embeddings, np.float64)
  return embeddings / np.linalg.norm(embeddings, axis=-1, keepdims=True)


def cosine_similarities(images: np.ndarray, captions: Sequence[str],
                        model: ClipEmbedder) -> np.ndarray:
  """[B] cosine similarity of each image with its caption; concatenate these over batches
  and pass them to `score` for the CLIP score of a large set."""
  captions = list(captions)
  if len(images) != len(captions):
    raise ValueError(f'CLIP score pairs images with captions, got {len(images)} images and '
                     f'{len(captions)} captions')
  return np.sum(_unit(model.embed_images(images)) * _unit(model.embed_texts(captions)), axis=-1)


def score(similarities: np.ndarray) -> float:
  """The CLIP score of per-pair cosine similarities."""
  return max(100.0 * float(np.mean(similarities)), 0.0)


def clip_score(images: np.ndarray, captions: Sequence[str], model: ClipEmbedder) -> float:
  """The CLIP score of [B, H, W, 3] images in [0, 1] against their B captions."""
  return score(cosine_similarities(images, captions, model))


class TransformersClip:
  """ClipEmbedder of a transformers CLIPModel (PyTorch) and CLIPProcessor saved in `path`.

  Images go to the processor as uint8, as torchmetrics' users pass them (the processor
  rescales by 1/255 itself). Captions longer than the text model's context are truncated
  by the tokenizer, which keeps their end-of-text token.
  """

  def __init__(self, path: str, device: str = 'cpu'):
    from transformers import CLIPModel, CLIPProcessor  # PyTorch only where CLIP scores are wanted
    if not os.path.isdir(path):
      raise ValueError(f'{path}: no such CLIP folder (a CLIPModel and CLIPProcessor saved with '
                       'save_pretrained)')
    self.device = device
    self.model = CLIPModel.from_pretrained(path).eval().to(device)
    self.processor = CLIPProcessor.from_pretrained(path)

  def embed_images(self, images: np.ndarray) -> np.ndarray:
    inputs = self.processor(images=list(to_uint8(images)), return_tensors='pt')
    return self._projected(self.model.get_image_features, pixel_values=inputs['pixel_values'])

  def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
    inputs = self.processor(text=list(texts), padding=True, truncation=True, return_tensors='pt')
    return self._projected(self.model.get_text_features, input_ids=inputs['input_ids'],
                           attention_mask=inputs['attention_mask'])

  def _projected(self, get_features, **inputs) -> np.ndarray:
    import torch
    with torch.no_grad():
      output = get_features(**{k: v.to(self.device) for k, v in inputs.items()})
    # transformers 4 returns the projected embeddings; 5 returns them as pooler_output.
    embeddings = output if torch.is_tensor(output) else output.pooler_output
    return embeddings.float().cpu().numpy()
