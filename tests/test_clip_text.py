"""CLIPTextModel against transformers' CLIPTextModel, conversion both ways, and its config."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from instaflow_jax.convert.torch_names import flax_to_torch_state, torch_state_to_flax
from instaflow_jax.models.clip_text import CLIPTextConfig, CLIPTextModel

_BASE = dict(vocab_size=99, hidden_size=32, intermediate_size=48, projection_dim=24,
             num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
             pad_token_id=1, bos_token_id=0)

CONFIGS = {
    # SD 1.x style: legacy eos id, pooled at argmax(input_ids).
    'quick_gelu_legacy_eos': CLIPTextConfig(hidden_act='quick_gelu', eos_token_id=2, **_BASE),
    # Pooled at the first eos token, which is neither the largest id nor the pad id.
    'gelu_eos_7': CLIPTextConfig(hidden_act='gelu', eos_token_id=7, layer_norm_eps=1e-6,
                                 **{**_BASE, 'hidden_size': 64}),
}


def _torch_model(config: CLIPTextConfig, seed: int = 0):
  torch.manual_seed(seed)
  model = transformers.CLIPTextModel(
      transformers.CLIPTextConfig(**config.to_transformers_config())).eval()
  with torch.no_grad():
    # Make every norm scale/bias and every weight non-trivial.
    for tensor in model.state_dict().values():
      if tensor.is_floating_point():
        tensor.add_(0.2 * torch.randn_like(tensor))
  return model


def _inputs(config: CLIPTextConfig, eos_positions, length: int):
  """Random token ids, each row ending with its eos token followed by padding."""
  rng = np.random.default_rng(0)
  if config.eos_token_id == 2:
    eos, pad = config.vocab_size - 1, config.pad_token_id  # eos has the largest id
  else:
    eos, pad = config.eos_token_id, config.eos_token_id  # pad may equal eos
  ids = rng.integers(8, config.vocab_size - 1, size=(len(eos_positions), length))
  ids[:, 0] = config.bos_token_id
  mask = np.zeros_like(ids)
  for row, pos in enumerate(eos_positions):
    ids[row, pos], ids[row, pos + 1:] = eos, pad
    mask[row, :pos + 1] = 1
  return ids.astype(np.int32), mask.astype(np.int32)


# transformers 5 drops the 'text_model.' prefix in memory (and in its own saves); published
# checkpoints (SD's text_encoder) keep it, and so do our parameter names.
_PREFIX = 'text_model.'


def _state(model) -> dict:
  """A torch CLIPTextModel's weights, keyed as in published checkpoints."""
  return {_PREFIX + key: value.numpy() for key, value in model.state_dict().items()}


def _load_torch_state(model, state: dict):
  model.load_state_dict({key.removeprefix(_PREFIX): torch.from_numpy(value)
                         for key, value in state.items()}, strict=True)


def _load_params(model: CLIPTextModel, state: dict):
  abstract = jax.eval_shape(model.init, jax.random.key(0), *model.example_inputs())
  return {'params': torch_state_to_flax(state, abstract, source='torch CLIPTextModel')}


def _assert_close(ours, ref, rtol: float = 1e-4):
  ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
  assert ours.shape == ref.shape
  assert np.abs(ours - ref).max() <= rtol * np.abs(ref).max()


@pytest.mark.parametrize('name', sorted(CONFIGS))
@pytest.mark.parametrize('use_mask', [False, True])
def test_matches_transformers(name, use_mask):
  config = CONFIGS[name]
  torch_model = _torch_model(config)
  model = CLIPTextModel(config)
  params = _load_params(model, _state(torch_model))
  # Rows: padded, eos in the last position, and a full-length row.
  ids, mask = _inputs(config, eos_positions=[4, 11, 7], length=12)
  mask = mask if use_mask else None
  with torch.no_grad():
    ref = torch_model(torch.from_numpy(ids).long(),
                      attention_mask=None if mask is None else torch.from_numpy(mask))
  hidden, pooled = jax.jit(model.apply)(params, jnp.asarray(ids), mask)
  _assert_close(hidden, ref.last_hidden_state.numpy())
  _assert_close(pooled, ref.pooler_output.numpy())


@pytest.mark.slow  # a sweep beside the parity test of the quick tier
def test_pools_at_expected_positions():
  config = CONFIGS['gelu_eos_7']
  model = CLIPTextModel(config)
  ids, _ = _inputs(config, eos_positions=[2, 9], length=12)
  params = model.init(jax.random.key(0), *model.example_inputs())
  hidden, pooled = model.apply(params, jnp.asarray(ids))
  np.testing.assert_array_equal(pooled, hidden[jnp.arange(2), jnp.array([2, 9])])


def test_full_length_and_bfloat16():
  config = CONFIGS['quick_gelu_legacy_eos']
  torch_model = _torch_model(config)
  ids, mask = _inputs(config, eos_positions=[15, 6], length=config.max_position_embeddings)
  with torch.no_grad():
    ref = torch_model(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask))
  model = CLIPTextModel(config, dtype=jnp.bfloat16)
  hidden, pooled = model.apply(_load_params(model, _state(torch_model)), jnp.asarray(ids),
                               jnp.asarray(mask))
  assert hidden.dtype == pooled.dtype == jnp.bfloat16
  _assert_close(hidden, ref.last_hidden_state.numpy(), rtol=5e-2)
  _assert_close(pooled, ref.pooler_output.numpy(), rtol=5e-2)


def test_too_long_input_raises():
  config = CONFIGS['gelu_eos_7']
  model = CLIPTextModel(config)
  ids = jnp.zeros((1, config.max_position_embeddings + 1), jnp.int32)
  with pytest.raises(ValueError, match='max_position_embeddings'):
    jax.eval_shape(model.init, jax.random.key(0), ids)


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_export_round_trip_is_bitwise(name, tmp_path):
  config = CONFIGS[name]
  original = _state(_torch_model(config, seed=1))
  exported = flax_to_torch_state(_load_params(CLIPTextModel(config), original))
  fresh = _torch_model(config, seed=2)
  _load_torch_state(fresh, exported)
  # And as a folder (prefixed keys, like SD's text_encoder) that from_pretrained reads.
  (tmp_path / 'config.json').write_text(json.dumps(config.to_transformers_config()))
  safetensors.numpy.save_file(exported, str(tmp_path / 'model.safetensors'))
  loaded = transformers.CLIPTextModel.from_pretrained(str(tmp_path))
  for state in (_state(fresh), _state(loaded)):
    assert state.keys() == original.keys()
    for key, value in original.items():
      np.testing.assert_array_equal(state[key], value, err_msg=key)


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_config_round_trip_and_param_tree(name):
  config = CONFIGS[name]
  exported = config.to_transformers_config()
  assert CLIPTextConfig.from_transformers_config(exported) == config
  torch_model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**exported))
  model = CLIPTextModel(config)
  ours = flax_to_torch_state(model.init(jax.random.key(0), *model.example_inputs()))
  theirs = _state(torch_model)
  assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_config_reads_transformers_dicts():
  # Every key transformers writes, generic ones included; defaults match transformers'.
  assert CLIPTextConfig.from_transformers_config(
      transformers.CLIPTextConfig().to_dict()) == CLIPTextConfig()
  sd15 = {'_name_or_path': 'openai/clip-vit-large-patch14', 'architectures': ['CLIPTextModel'],
          'attention_dropout': 0.0, 'bos_token_id': 0, 'dropout': 0.0, 'eos_token_id': 2,
          'hidden_act': 'quick_gelu', 'hidden_size': 768, 'initializer_factor': 1.0,
          'initializer_range': 0.02, 'intermediate_size': 3072, 'layer_norm_eps': 1e-05,
          'max_position_embeddings': 77, 'model_type': 'clip_text_model',
          'num_attention_heads': 12, 'num_hidden_layers': 12, 'pad_token_id': 1,
          'projection_dim': 768, 'torch_dtype': 'float32', 'transformers_version': '4.22.0',
          'vocab_size': 49408}
  config = CLIPTextConfig.from_transformers_config(sd15)
  assert (config.hidden_size, config.eos_token_id, config.head_dim) == (768, 2, 64)


@pytest.mark.parametrize('change, message', [
    ({'hidden_act': 'gelu_10'}, "hidden_act='gelu_10'"),
    ({'model_type': 'clip'}, "model_type='clip'"),
    ({'is_causal': False}, 'is_causal=False'),
    ({'eos_token_id': [2, 3]}, r'eos_token_id=\[2, 3\]'),
    ({'hidden_size': 30}, 'hidden_size=30'),
])
def test_config_rejects_unsupported_settings(change, message):
  with pytest.raises(ValueError, match=message):
    CLIPTextConfig.from_transformers_config({**CONFIGS['gelu_eos_7'].to_transformers_config(),
                                             **change})
