"""The FID Inception against pytorch-fid's InceptionV3 (use_fid_inception=True), with random
weights (the real file cannot be downloaded here) saved as a state dict file and loaded by
both: our loader, and pytorch-fid's own loading in place of its download.

Pool features are compared relative to their largest magnitude, with a tolerance of 1e-4.
"""
import re

import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from pytorch_fid import inception as fid_inception

from instaflow_jax.convert import inception_weights
from instaflow_jax.convert.torch_names import ConversionError
from instaflow_jax.convert.torch_names import read_torch_file
from instaflow_jax.models import inception

_TOLERANCE = 1e-4
# Not 299x299, so that the resize is exercised (an upsampling).
_HEIGHT, _WIDTH = 64, 80


def _randomize_(network: torch.nn.Module, seed: int = 0) -> None:
  """Variance-preserving conv weights, so activations keep their scale through the network,
  and random BatchNorm statistics and affine terms, so that each of them matters."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in network.modules():
      if isinstance(module, torch.nn.Conv2d):
        torch.nn.init.kaiming_normal_(module.weight, nonlinearity='relu', generator=generator)
      elif isinstance(module, torch.nn.BatchNorm2d):
        module.running_mean.normal_(0.0, 0.5, generator=generator)
        module.running_var.uniform_(0.5, 2.0, generator=generator)
        module.weight.uniform_(0.5, 1.5, generator=generator)
        module.bias.normal_(0.0, 0.2, generator=generator)


def _random_fid_network() -> torch.nn.Module:
  """pytorch-fid's fid_inception_v3() without its download: the network it builds, with the
  loading of the downloaded weights skipped."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(fid_inception, 'load_state_dict_from_url', lambda *args, **kwargs: None)
    patch.setattr(torchvision.models.inception.Inception3, 'load_state_dict',
                  lambda self, state_dict: None)
    network = fid_inception.fid_inception_v3()
  _randomize_(network)
  return network


@pytest.fixture(scope='module')
def weights_file(tmp_path_factory) -> str:
  path = str(tmp_path_factory.mktemp('fid') / inception_weights.WEIGHTS_FILE)
  torch.save(_random_fid_network().state_dict(), path)
  return path


@pytest.fixture(scope='module')
def pytorch_fid_model(weights_file) -> fid_inception.InceptionV3:
  """pytorch-fid's InceptionV3 that loads `weights_file` where it would download the weights."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(fid_inception, 'load_state_dict_from_url',
                  lambda url, **kwargs: torch.load(weights_file, weights_only=True))
    return fid_inception.InceptionV3([fid_inception.InceptionV3.DEFAULT_BLOCK_INDEX]).eval()


@pytest.fixture(scope='module')
def features_fn(weights_file):
  """Our loaded network, compiled once for the module."""
  module, variables = inception_weights.load_fid_inception(weights_file)
  apply = jax.jit(module.apply)
  return lambda images: np.asarray(apply(variables, jnp.asarray(images)))


def _images() -> torch.Tensor:
  """Two [3, 64, 80] images in [0, 1] of different structure (two noise images would pool to
  nearly the same features): noise over a ramp, and 8x8 blocks of random colour."""
  generator = torch.Generator().manual_seed(1)
  ramp = torch.linspace(0, 1, _WIDTH).expand(3, _HEIGHT, _WIDTH)
  noisy_ramp = 0.5 * torch.rand(3, _HEIGHT, _WIDTH, generator=generator) + 0.5 * ramp
  blocks = torch.rand(1, 3, _HEIGHT // 8, _WIDTH // 8, generator=generator)
  blocks = F.interpolate(blocks, size=(_HEIGHT, _WIDTH), mode='nearest')[0]
  return torch.stack([noisy_ramp, blocks])


def _nhwc(x: torch.Tensor) -> np.ndarray:
  return x.numpy().transpose(0, 2, 3, 1)


def test_matches_pytorch_fid(pytorch_fid_model, features_fn):
  images = _images()
  with torch.no_grad():
    ref = pytorch_fid_model(images)[0].reshape(len(images), -1).numpy()
  ours = features_fn(_nhwc(images))
  assert ours.shape == ref.shape == (2, inception.FEATURES)
  scale = np.abs(ref).max()
  # The features depend on the image, not on the biases alone.
  assert np.abs(ref[0] - ref[1]).max() > 0.01 * scale
  err = np.abs(ours - ref).max()
  assert err / scale <= _TOLERANCE, f'max|diff|={err:.3g}, max|ref|={scale:.3g}'


@pytest.mark.parametrize('size', ((_HEIGHT, _WIDTH), (512, 400), (inception.INPUT_SIZE,) * 2),
                         ids=('up', 'down', 'same'))
def test_resize_matches_torch_bilinear(size):
  images = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(2))
  ref = F.interpolate(images, size=(inception.INPUT_SIZE,) * 2, mode='bilinear',
                      align_corners=False)
  ours = np.asarray(inception.preprocess(jnp.asarray(_nhwc(images))))
  assert np.abs(ours - (2 * _nhwc(ref) - 1)).max() <= 1e-6


def test_rejects_nchw_images():
  with pytest.raises(ValueError, match=r'NHWC RGB images \[B, H, W, 3\], got shape \(1, 3, 8, 8\)'):
    inception.preprocess(jnp.zeros((1, 3, 8, 8)))


def test_flax_paths_name_the_torch_keys(weights_file):
  state = read_torch_file(weights_file)
  variables = inception_weights.inception_state_to_variables(state)
  conv = variables['params']['Mixed_6b']['branch7x7dbl_5']['conv']['kernel']
  assert np.array_equal(conv, state['Mixed_6b.branch7x7dbl_5.conv.weight'].transpose(2, 3, 1, 0))
  bn = variables['batch_stats']['Mixed_7c']['branch3x3_2b']['bn']
  assert np.array_equal(bn['mean'], state['Mixed_7c.branch3x3_2b.bn.running_mean'])
  assert np.array_equal(bn['var'], state['Mixed_7c.branch3x3_2b.bn.running_var'])


def test_missing_weights_is_a_clear_error():
  with pytest.raises(ValueError) as error:
    inception_weights.load_fid_inception(None)
  assert str(error.value) == (
      "FID needs pytorch-fid's Inception weights: pass the path of "
      'pt_inception-2015-12-05-6726825d.pth (none can be downloaded here)')


def _assert_load_error(path, message: str):
  """load_fid_inception(path) fails with a ConversionError that starts with the file's name."""
  with pytest.raises(ConversionError, match=f'^{re.escape(str(path))}: {message}'):
    inception_weights.load_fid_inception(str(path))


def test_file_errors_name_the_file(tmp_path, weights_file):
  _assert_load_error(tmp_path / 'missing.pth', 'file not found$')
  truncated = tmp_path / 'truncated.pth'
  with open(weights_file, 'rb') as f:
    truncated.write_bytes(f.read()[:1 << 20])
  _assert_load_error(truncated, 'cannot read torch checkpoint .* truncated or corrupt')
  foreign = tmp_path / 'aux.pth'
  torch.save({'AuxLogits.conv0.conv.weight': torch.zeros(128, 768, 1, 1)}, foreign)
  _assert_load_error(foreign, "unexpected key 'AuxLogits.conv0.conv.weight'")


def test_state_dict_errors(weights_file):
  state = read_torch_file(weights_file)
  source = 'weights.pth'
  convert = lambda s: inception_weights.inception_state_to_variables(s, source)
  cases = {
      "missing key 'Conv2d_2a_3x3.conv.weight'":
          {k: v for k, v in state.items() if k != 'Conv2d_2a_3x3.conv.weight'},
      "missing key 'Mixed_5b.branch1x1.bn.running_var'":
          {k: v for k, v in state.items() if k != 'Mixed_5b.branch1x1.bn.running_var'},
      "unexpected key 'Mixed_5b.branch1x2.bn.running_mean'":
          dict(state, **{'Mixed_5b.branch1x2.bn.running_mean': np.zeros(64, np.float32)}),
      r"key 'Conv2d_1a_3x3.conv.weight' has shape \(32, 1, 3, 3\), the model expects "
      r'\(32, 3, 3, 3\)':
          dict(state, **{'Conv2d_1a_3x3.conv.weight': np.zeros((32, 1, 3, 3), np.float32)}),
      r"key 'Mixed_7c.branch_pool.bn.running_mean' has shape \(19,\), the model expects \(192,\)":
          dict(state, **{'Mixed_7c.branch_pool.bn.running_mean': np.zeros(19, np.float32)}),
      # torchvision's ImageNet Inception: same trunk, 1000 classes, not the FID weights.
      r'fc.weight has shape \(1000, 2048\), not \(1008, 2048\)':
          dict(state, **{'fc.weight': np.zeros((1000, 2048), np.float32)}),
  }
  for message, broken in cases.items():
    with pytest.raises(ConversionError, match=f'^{source}: {message}'):
      convert(broken)
  # A branch name that ends in _<digit> is reported in the shared rule's split form.
  del state['Mixed_6e.branch7x7dbl_4.conv.weight']
  with pytest.raises(ConversionError, match="missing key 'Mixed_6e.branch7x7dbl.4.conv.weight'"):
    convert(state)


@pytest.mark.slow  # FID Inception-v3 at 299px
def test_eval_judge_measures_fid_features(weights_file, features_fn):
  """The eval stage's judge for photographs: pytorch-fid's features, no prompt metric
  without a CLIP model."""
  from instaflow_jax.stages import evaluate
  config = ml_collections.ConfigDict(dict(inception_path=weights_file, clip_path='',
                                          batch_size=2))
  judge = evaluate.InceptionJudge(config, ['a', 'b', 'c'])
  images = _nhwc(_images())
  images = np.concatenate([images, images[:1]])  # a last batch of one
  features, prompt_metrics = judge.measure(images)
  assert features.shape == (3, 2048) and prompt_metrics == {} and judge.about_real(images) == {}
  np.testing.assert_allclose(features[:2], features_fn(images[:2]), rtol=1e-5, atol=1e-5)
