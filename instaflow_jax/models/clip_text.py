"""transformers' `CLIPTextModel` (the Stable Diffusion text encoder) in Flax.

Token + position embeddings, causal pre-LayerNorm encoder layers, a final LayerNorm, and
the pooled output taken at the end-of-text token. Module names mirror transformers'
module tree (text_model/encoder/layers_0/self_attn/q_proj, ...), so torch weights load
through the rename rule in instaflow_jax/convert/torch_names.py.
"""
import dataclasses
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from instaflow_jax.models import formulations
from instaflow_jax.models import layers

Dtype = Any

_MODEL_TYPE = 'clip_text_model'
# transformers 5 keeps pooling at argmax(input_ids) for configs that still carry the
# eos_token_id=2 of checkpoints saved before transformers PR #24773 (SD 1.x/2.x among them).
_LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """The settings of transformers' CLIPTextConfig that define the computation.

  Defaults are transformers' defaults, so a config.json that omits a key means the same
  here. pad/bos token ids and projection_dim do not change this model; they are kept
  so that an exported config.json says what the original said.
  """
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  projection_dim: Optional[int] = 512
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5
  pad_token_id: Optional[int] = 1
  bos_token_id: Optional[int] = 49406
  eos_token_id: int = 49407

  def __post_init__(self):
    try:
      layers.activation(self.hidden_act)
    except ValueError as e:
      raise ValueError(f'clip text config: hidden_act={self.hidden_act!r}: {e}') from None
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
          f'clip text config: hidden_size={self.hidden_size} is not a multiple of '
          f'num_attention_heads={self.num_attention_heads}')
    if not isinstance(self.eos_token_id, int):
      raise ValueError(
          f'clip text config: eos_token_id={self.eos_token_id!r} is not supported (need one int)')

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_transformers_config(cls, d: Dict[str, Any]) -> 'CLIPTextConfig':
    """Reads a CLIPTextModel config.json dict (not a full CLIPConfig).

    Keys that are not fields (dropout, initializers, dtype, generic PreTrainedConfig
    settings, '_'-prefixed keys) do not change the forward pass and are ignored.
    """
    model_type = d.get('model_type', _MODEL_TYPE)
    if model_type != _MODEL_TYPE:
      raise ValueError(
          f'clip text config: model_type={model_type!r} is not supported; '
          f'expected {_MODEL_TYPE!r} (for a full CLIP config, pass its text_config)')
    if not d.get('is_causal', True):
      raise ValueError('clip text config: is_causal=False is not supported')
    names = {field.name for field in dataclasses.fields(cls)}
    return cls(**{key: value for key, value in d.items() if key in names})

  def to_transformers_config(self) -> Dict[str, Any]:
    """A config.json dict that transformers' CLIPTextModel.from_pretrained accepts."""
    return {'architectures': ['CLIPTextModel'], 'model_type': _MODEL_TYPE,
            **dataclasses.asdict(self)}


class CLIPTextEmbeddings(nn.Module):
  """Token embeddings plus learned absolute position embeddings."""
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> jax.Array:
    cfg = self.config
    length = input_ids.shape[-1]
    if length > cfg.max_position_embeddings:
      raise ValueError(
          f'sequence length {length} exceeds max_position_embeddings={cfg.max_position_embeddings}')
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    tokens = layers.embedding(cfg.vocab_size, cfg.hidden_size, 'token_embedding', **kw)(input_ids)
    positions = layers.embedding(
        cfg.max_position_embeddings, cfg.hidden_size, 'position_embedding', **kw)(
            jnp.arange(length))
    return tokens + positions


class CLIPAttention(nn.Module):
  """Causal multi-head self-attention, keys additionally limited by a padding mask."""
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: Optional[jax.Array]) -> jax.Array:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    split = lambda t: t.reshape(t.shape[:-1] + (cfg.num_attention_heads, cfg.head_dim))
    q, k, v = (split(layers.dense(cfg.hidden_size, name, **kw)(x))
               for name in ('q_proj', 'k_proj', 'v_proj'))
    out = formulations.attention(q, k, v, mask=key_mask, is_causal=True)
    out = out.reshape(out.shape[:-2] + (cfg.hidden_size,))
    return layers.dense(cfg.hidden_size, 'out_proj', axes=('mlp', 'embed'), **kw)(out)


class CLIPMLP(nn.Module):
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.dense(cfg.intermediate_size, 'fc1', **kw)(x)
    x = layers.activation(cfg.hidden_act)(x)
    return layers.dense(cfg.hidden_size, 'fc2', axes=('mlp', 'embed'), **kw)(x)


class CLIPEncoderLayer(nn.Module):
  """Pre-LayerNorm residual block: x + attn(ln1(x)), then x + mlp(ln2(x))."""
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: Optional[jax.Array]) -> jax.Array:
    eps = self.config.layer_norm_eps
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.layer_norm(eps, 'layer_norm1', **kw)(x)
    x = x + CLIPAttention(self.config, name='self_attn', **kw)(h, key_mask)
    h = layers.layer_norm(eps, 'layer_norm2', **kw)(x)
    return x + CLIPMLP(self.config, name='mlp', **kw)(h)


class CLIPEncoder(nn.Module):
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: Optional[jax.Array]) -> jax.Array:
    for i in range(self.config.num_hidden_layers):
      x = CLIPEncoderLayer(self.config, self.dtype, self.param_dtype, name=f'layers_{i}')(
          x, key_mask)
    return x


def _key_padding_mask(attention_mask: Optional[jax.Array]) -> Optional[jax.Array]:
  """[B, T] padding mask (nonzero = real token) -> boolean [B, heads=1, query=1, key=T]."""
  if attention_mask is None:
    return None
  return attention_mask.astype(bool)[:, None, None, :]


def _pool_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
  """Per sequence, the position whose final hidden state is the pooled output."""
  if eos_token_id == _LEGACY_EOS_TOKEN_ID:
    # Legacy configs: the end-of-text token has the highest id in CLIP's vocabulary.
    return jnp.argmax(input_ids, axis=-1)
  # The first eos token (the pad token may equal it); position 0 when there is none.
  return jnp.argmax(input_ids == eos_token_id, axis=-1)


class CLIPTextTransformer(nn.Module):
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array,
               attention_mask: Optional[jax.Array]) -> Tuple[jax.Array, jax.Array]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = CLIPTextEmbeddings(self.config, name='embeddings', **kw)(input_ids)
    x = CLIPEncoder(self.config, name='encoder', **kw)(x, _key_padding_mask(attention_mask))
    x = layers.layer_norm(self.config.layer_norm_eps, 'final_layer_norm', **kw)(x)
    positions = _pool_positions(input_ids, self.config.eos_token_id)
    pooled = jnp.take_along_axis(x, positions[:, None, None], axis=1)[:, 0]
    return x, pooled


class CLIPTextModel(nn.Module):
  """transformers' CLIPTextModel: (input_ids [B, T], attention_mask [B, T] or None) ->
  (last_hidden_state [B, T, hidden], pooled_output [B, hidden]).

  attention_mask (1 = token, 0 = padding) hides padded keys on top of the causal mask.
  """
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array,
               attention_mask: Optional[jax.Array] = None) -> Tuple[jax.Array, jax.Array]:
    return CLIPTextTransformer(self.config, self.dtype, self.param_dtype, name='text_model')(
        input_ids, attention_mask)

  def example_inputs(self, batch_size: int = 1) -> Tuple[jax.Array]:
    length = min(8, self.config.max_position_embeddings)
    return (jnp.zeros((batch_size, length), jnp.int32),)
