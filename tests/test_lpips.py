"""LPIPS against the `lpips` package (v0.1, vgg and alex), with the real shipped lin weights
and random trunks (torchvision's ImageNet weights cannot be downloaded here), in float32.

Distances are compared with an absolute tolerance of 1e-5 (they are of order 0.1 here).
"""
import functools
import warnings

import jax
import jax.numpy as jnp
import lpips
import numpy as np
import pytest
import torch
import torchvision

from instaflow_jax.convert import lpips_weights
from instaflow_jax.convert.torch_names import ConversionError
from instaflow_jax.convert.torch_names import flax_to_torch_state
from instaflow_jax.convert.torch_names import read_torch_file
from instaflow_jax.convert.torch_names import torch_key
from instaflow_jax.models.lpips import LPIPS

NETS = ('vgg', 'alex')
# Square; non-square; small and odd, so that the floor-mode pools drop a row or column.
SIZES = ((64, 64), (64, 48), (33, 37))
_TOLERANCE = 1e-5
_TORCHVISION = {'vgg': torchvision.models.vgg16, 'alex': torchvision.models.alexnet}


def _perturb_biases_(module: torch.nn.Module, seed: int) -> None:
  """torchvision initialises VGG's biases to zero, which would hide a misplaced bias."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith('bias'):
        p.add_(0.1 * torch.randn(p.shape, generator=generator))


def _lpips_model(net: str, **kwargs) -> lpips.LPIPS:
  with warnings.catch_warnings():  # torchvision's deprecation of pretrained=
    warnings.simplefilter('ignore', UserWarning)
    return lpips.LPIPS(net=net, version='0.1', pretrained=True, verbose=False, **kwargs)


def _numpy_state(module: torch.nn.Module):
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


@functools.lru_cache(maxsize=None)
def _reference(net: str):
  """(lpips model with a random trunk and the shipped lin weights, our module, converted
  params), built once per net."""
  torch.manual_seed(0)
  model = _lpips_model(net, pnet_rand=True)
  _perturb_biases_(model.net, seed=0)
  params = lpips_weights.lpips_state_to_params(_numpy_state(model), net)
  return model, LPIPS(net), params


def _image_pair(height: int, width: int, seed: int = 1, batch: int = 2):
  generator = torch.Generator().manual_seed(seed)
  return [torch.rand(batch, 3, height, width, generator=generator) * 2 - 1 for _ in range(2)]


def _nhwc(x: torch.Tensor) -> jnp.ndarray:
  return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def _distances(module: LPIPS, params, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
  return np.asarray(jax.jit(module.apply)({'params': params}, _nhwc(x), _nhwc(y)))


def _reference_distances(model: lpips.LPIPS, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
  with torch.no_grad():
    return model(x, y).reshape(-1).numpy()


def _assert_distances_close(ours: np.ndarray, ref: np.ndarray):
  assert ours.shape == ref.shape
  err = np.abs(ours - ref).max()
  assert err <= _TOLERANCE, f'max|diff|={err:.3g} (distances {ref})'


def test_flax_paths_name_the_lpips_keys():
  assert torch_key(('net', 'slice1_0', 'kernel')) == 'net.slice1.0.weight'
  assert torch_key(('net', 'slice3_14', 'bias')) == 'net.slice3.14.bias'
  assert torch_key(('lin0', 'model_1', 'kernel')) == 'lin0.model.1.weight'


@pytest.mark.parametrize('size', SIZES, ids=lambda s: f'{s[0]}x{s[1]}')
@pytest.mark.parametrize('net', NETS)
def test_matches_lpips(net, size):
  model, module, params = _reference(net)
  x, y = _image_pair(*size)
  ref = _reference_distances(model, x, y)
  assert ref.min() > 0.01  # a real distance, not a degenerate zero
  _assert_distances_close(_distances(module, params, x, y), ref)


@pytest.mark.parametrize('net', NETS)
def test_identical_images_give_zero(net):
  _, module, params = _reference(net)
  x, _ = _image_pair(32, 40)
  # Zero up to float32 rounding: XLA may sum a channel norm in a different order at another
  # batch position (distances of distinct images are of order 0.1).
  assert np.abs(_distances(module, params, x, x)).max() <= 1e-12


@pytest.mark.parametrize('net', NETS)
def test_export_round_trip(net):
  model, _, params = _reference(net)
  fresh = _lpips_model(net, pnet_rand=True)
  result = fresh.load_state_dict(
      {k: torch.from_numpy(v) for k, v in flax_to_torch_state(params).items()}, strict=False)
  # The ScalingLayer buffers are constants here, and `lins` re-holds lin0..lin4.
  assert not result.unexpected_keys
  assert all(k.startswith(('scaling_layer.', 'lins.')) for k in result.missing_keys)
  original = model.state_dict()
  for key, value in fresh.state_dict().items():
    assert torch.equal(value, original[key]), key


@pytest.mark.slow  # a sweep beside the parity test of the quick tier
@pytest.mark.parametrize('net', NETS)
def test_load_lpips_with_torchvision_trunk(net, tmp_path, monkeypatch):
  torch.manual_seed(1)
  classifier = _TORCHVISION[net](weights=None).eval()
  _perturb_biases_(classifier.features, seed=1)
  trunk_path = str(tmp_path / f'{net}_torchvision.pth')
  torch.save(classifier.state_dict(), trunk_path)
  # lpips cuts the torchvision model it asks for; hand it this one instead of a download.
  monkeypatch.setattr(lpips.pretrained_networks.tv, _TORCHVISION[net].__name__,
                      lambda **kwargs: classifier)
  model = _lpips_model(net)

  module, params = lpips_weights.load_lpips(net, trunk_path=trunk_path)

  for k in range(5):
    shipped = getattr(model, f'lin{k}').model[1].weight.detach().numpy()
    assert np.array_equal(flax_to_torch_state(params)[f'lin{k}.model.1.weight'], shipped)
  x, y = _image_pair(64, 48, seed=2)
  _assert_distances_close(_distances(module, params, x, y), _reference_distances(model, x, y))


@pytest.mark.parametrize('net', NETS)
def test_missing_trunk_is_a_clear_error(net):
  model = {'vgg': 'vgg16', 'alex': 'alexnet'}[net]
  with pytest.raises(ValueError) as error:
    lpips_weights.load_lpips(net)
  assert str(error.value) == (
      f'LPIPS needs pretrained {net} trunk weights: pass trunk_path=<torchvision {model} '
      'state dict .pth> (none can be downloaded here)')


def test_file_errors_name_the_file(tmp_path):
  missing = str(tmp_path / 'missing.pth')
  corrupt = tmp_path / 'corrupt.pth'
  corrupt.write_bytes(b'not a torch file')
  trunkless = tmp_path / 'trunkless.pth'
  torch.save({'classifier.1.weight': torch.zeros(2, 2)}, trunkless)
  cases = [dict(trunk_path=missing), dict(trunk_path=str(corrupt)),
           dict(trunk_path=str(trunkless)), dict(trunk_path=str(trunkless), lin_path=missing)]
  for kwargs in cases:
    named = kwargs.get('lin_path', kwargs['trunk_path'])
    with pytest.raises(ConversionError, match=named):
      lpips_weights.load_lpips('alex', **kwargs)


def test_shipped_lin_file_is_the_packages():
  path = lpips_weights.shipped_lin_path('vgg')
  shipped = torch.load(path, map_location='cpu', weights_only=True)
  assert sorted(read_torch_file(path)) == sorted(shipped) == [
      f'lin{k}.model.1.weight' for k in range(5)]


def test_state_dict_checks():
  model, _, _ = _reference('alex')
  state = _numpy_state(model)
  shifted = dict(state, **{'scaling_layer.shift': state['scaling_layer.shift'] + 0.1})
  with pytest.raises(ConversionError, match='scaling_layer.shift'):
    lpips_weights.lpips_state_to_params(shifted, 'alex')
  unaliased = dict(state, **{'lins.2.model.1.weight': state['lin2.model.1.weight'] * 2})
  with pytest.raises(ConversionError, match='lins.2.model.1.weight differs from lin2'):
    lpips_weights.lpips_state_to_params(unaliased, 'alex')


def test_unsupported_net():
  with pytest.raises(ValueError, match="net='squeeze' is not supported"):
    lpips_weights.load_lpips('squeeze', trunk_path='unused.pth')
  module = LPIPS('squeeze')
  with pytest.raises(ValueError, match="net='squeeze' is not supported"):
    jax.eval_shape(module.init, jax.random.key(0), *module.example_inputs())
