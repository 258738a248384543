"""Tiny random PyTorch models and diffusers folders, built locally (nothing is downloaded)."""
import json
import os
import string

import jax
import numpy as np
import torch

from instaflow_jax.models.abstract import abstract_params

# A CLIP BPE vocabulary of single letters: every lowercase word tokenizes, letter by letter.
_LETTERS = list(string.ascii_lowercase)
TOKENIZER_MAX_LENGTH = 16


def write_tiny_clip_tokenizer(path: str):
  """A CLIPTokenizer folder with a letter-level vocab, and the tokenizer itself."""
  from transformers import CLIPTokenizer
  os.makedirs(path, exist_ok=True)
  tokens = _LETTERS + [c + '</w>' for c in _LETTERS] + ['<|startoftext|>', '<|endoftext|>']
  with open(os.path.join(path, 'vocab.json'), 'w') as f:
    json.dump({t: i for i, t in enumerate(tokens)}, f)
  with open(os.path.join(path, 'merges.txt'), 'w') as f:
    f.write('#version: 0.2\n')
  tokenizer = CLIPTokenizer(os.path.join(path, 'vocab.json'), os.path.join(path, 'merges.txt'),
                            model_max_length=TOKENIZER_MAX_LENGTH)
  tokenizer.save_pretrained(path)
  return tokenizer


def random_params(module, seed: int = 0):
  """`module`'s params filled with N(0, 0.1^2) noise from numpy: distinct values without
  compiling its init, whose random draws alone take XLA:CPU long to compile for a small U-Net."""
  abstract = abstract_params(module)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: np.asarray(0.1 * rng.standard_normal(a.shape), a.dtype), abstract)


def perturb_(model: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> torch.nn.Module:
  """Adds noise to every parameter, so identity-initialised norms cannot hide a swap."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(scale * torch.randn(p.shape, generator=generator))
  return model.eval()


def tiny_unet_config(cross_attention_dim: int = 32) -> dict:
  return dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
              block_out_channels=(32, 64), down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
              up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), cross_attention_dim=cross_attention_dim,
              attention_head_dim=4, norm_num_groups=8)


def tiny_vae_config() -> dict:
  return dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
              down_block_types=('DownEncoderBlock2D',) * 2, up_block_types=('UpDecoderBlock2D',) * 2,
              layers_per_block=1, norm_num_groups=8, sample_size=16, scaling_factor=0.18215)


def tiny_text_config(vocab_size: int) -> dict:
  return dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=TOKENIZER_MAX_LENGTH,
              hidden_act='quick_gelu', bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
              pad_token_id=vocab_size - 1)


def write_tiny_clip_model(path: str, image_size: int = 32) -> str:
  """A CLIPModel with tiny random towers and its CLIPProcessor, saved like a hub folder."""
  from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor
  tokenizer = write_tiny_clip_tokenizer(path)
  vision = dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4)
  config = CLIPConfig(text_config=tiny_text_config(len(tokenizer)), vision_config=vision,
                      projection_dim=16)
  torch.manual_seed(0)
  perturb_(CLIPModel(config)).save_pretrained(path)
  image_processor = CLIPImageProcessor(size={'shortest_edge': image_size},
                                       crop_size={'height': image_size, 'width': image_size})
  CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
  return path


# Stable Diffusion 1.5's scheduler config, with the spacing that its PNDM scheduler uses.
SD15_SCHEDULER = {'_class_name': 'PNDMScheduler', 'beta_start': 0.00085, 'beta_end': 0.012,
                  'beta_schedule': 'scaled_linear', 'num_train_timesteps': 1000,
                  'steps_offset': 1, 'timestep_spacing': 'leading', 'set_alpha_to_one': False,
                  'clip_sample': False, 'skip_prk_steps': True, 'trained_betas': None}


def write_tiny_sd_pipeline(path: str, prediction_type: str = 'epsilon') -> dict:
  """A tiny random StableDiffusionPipeline folder (a diffusion model) with SD 1.5's
  scheduler config and `prediction_type`; returns the torch parts and that config."""
  parts = write_tiny_pipeline(path, class_name='StableDiffusionPipeline')
  os.makedirs(os.path.join(path, 'scheduler'))
  config = {**SD15_SCHEDULER, 'prediction_type': prediction_type}
  with open(os.path.join(path, 'scheduler', 'scheduler_config.json'), 'w') as f:
    json.dump(config, f)
  index_path = os.path.join(path, 'model_index.json')
  with open(index_path) as f:
    index = json.load(f)
  with open(index_path, 'w') as f:
    json.dump({**index, 'scheduler': ['diffusers', 'PNDMScheduler']}, f)
  return {**parts, 'scheduler_config': config}


def write_tiny_pipeline(path: str, seed: int = 0,
                        class_name: str = 'RectifiedFlowPipeline') -> dict:
  """A random diffusers pipeline folder saved with save_pretrained, a flow unless
  `class_name` says otherwise; returns the torch parts."""
  from diffusers import AutoencoderKL, UNet2DConditionModel
  from transformers import CLIPTextConfig, CLIPTextModel
  torch.manual_seed(seed)
  tokenizer = write_tiny_clip_tokenizer(os.path.join(path, 'tokenizer'))
  unet = perturb_(UNet2DConditionModel(**tiny_unet_config()), seed=seed)
  vae = perturb_(AutoencoderKL(**tiny_vae_config()), seed=seed + 1)
  text_encoder = perturb_(CLIPTextModel(CLIPTextConfig(**tiny_text_config(len(tokenizer)))),
                          seed=seed + 2)
  unet.save_pretrained(os.path.join(path, 'unet'))
  vae.save_pretrained(os.path.join(path, 'vae'))
  text_encoder.save_pretrained(os.path.join(path, 'text_encoder'))
  with open(os.path.join(path, 'model_index.json'), 'w') as f:
    json.dump({'_class_name': class_name, '_diffusers_version': '0.42.1',
               'unet': ['diffusers', 'UNet2DConditionModel'], 'vae': ['diffusers', 'AutoencoderKL'],
               'text_encoder': ['transformers', 'CLIPTextModel'],
               'tokenizer': ['transformers', 'CLIPTokenizer']}, f)
  return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
