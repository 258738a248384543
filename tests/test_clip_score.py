"""CLIP score: the formula, and TransformersClip on a tiny random CLIPModel saved with
save_pretrained, against CLIPModel's own normalised embeddings of inputs prepared by hand."""
import numpy as np
import pytest
import torch
from transformers import CLIPModel
from transformers import CLIPProcessor

from instaflow_jax.evaluation import clip_score
from tests import tiny_models

_IMAGE_SIZE = 32
# OpenAI CLIP's pixel normalisation, CLIPImageProcessor's default.
_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
_STD = np.array([0.26862954, 0.26130258, 0.27577711])
CAPTIONS = ['a red circle', 'two blue squares', 'green']


@pytest.fixture(scope='module')
def clip_folder(tmp_path_factory):
  return tiny_models.write_tiny_clip_model(str(tmp_path_factory.mktemp('clip')), _IMAGE_SIZE)


def _reference_similarities(folder: str, images: np.ndarray) -> np.ndarray:
  """Cosines of CLIPModel's normalised image and text embeddings, on pixels prepared by hand:
  the images are already 32x32, so the processor only quantises and normalises."""
  model = CLIPModel.from_pretrained(folder).eval()
  pixels = (np.round(images * 255) / 255 - _MEAN) / _STD
  tokens = CLIPProcessor.from_pretrained(folder).tokenizer(CAPTIONS, padding=True,
                                                           return_tensors='pt')
  with torch.no_grad():
    out = model(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)).float(), **tokens)
  return torch.sum(out.image_embeds * out.text_embeds, dim=-1).numpy()


def test_transformers_clip_matches_clip_model(clip_folder):
  images = np.random.default_rng(0).random((len(CAPTIONS), _IMAGE_SIZE, _IMAGE_SIZE, 3))
  model = clip_score.TransformersClip(clip_folder)
  ours = clip_score.cosine_similarities(images, CAPTIONS, model)
  ref = _reference_similarities(clip_folder, images)
  np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_score_clamps_the_mean_at_zero():
  assert clip_score.score(np.array([0.2, 0.4])) == pytest.approx(30.0)
  assert clip_score.score(np.array([0.3, -0.1])) == pytest.approx(10.0)  # not each pair
  assert clip_score.score(np.array([-0.2, 0.1])) == 0.0


class _FixedEmbedder:
  """Embeddings given in advance, at different scales (the score normalises them)."""

  def embed_images(self, images):
    return np.array([[3.0, 0.0], [0.0, 2.0]])

  def embed_texts(self, texts):
    return np.array([[1.0, 1.0], [0.0, 5.0]])


def test_clip_score_of_a_protocol_model():
  images = np.zeros((2, 4, 4, 3))
  similarities = clip_score.cosine_similarities(images, ['a', 'b'], _FixedEmbedder())
  np.testing.assert_allclose(similarities, [np.sqrt(0.5), 1.0])
  assert clip_score.clip_score(images, ['a', 'b'], _FixedEmbedder()) == pytest.approx(
      50 * (np.sqrt(0.5) + 1))
  with pytest.raises(ValueError, match='got 2 images and 1 captions'):
    clip_score.clip_score(images, ['a'], _FixedEmbedder())


def test_missing_folder(tmp_path):
  missing = str(tmp_path / 'clip')
  with pytest.raises(ValueError, match=f'{missing}: no such CLIP folder'):
    clip_score.TransformersClip(missing)
