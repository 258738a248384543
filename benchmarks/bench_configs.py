"""What bench.py measures: the model presets (`--config`), their rows (`--rows`), the
trainer's settings, and the inputs, the same numpy arrays on both sides."""
import dataclasses
from typing import Any, Dict, List, Optional

import numpy as np

SEED = 0
TIMESTEP = 1000.0  # what the network sees at flow time 0, the one Euler step from noise
UNCOND_SEED = 6    # token ids of the negative prompts of guidance
ATTENTION = ('cudnn', 'xla')  # jax.nn.dot_product_attention's implementations, one row each
ATTENTION_SEEDS = (11, 12, 13, 14)  # q, k, v and the output's gradient


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """Model configs (diffusers / transformers constructor kwargs) and run sizes."""
  unet: Dict[str, Any]
  vae: Dict[str, Any]
  text: Dict[str, Any]
  budget_s: float            # wall-time cap of the whole run
  torch_reserve_s: float     # left to the reference's eager measurements when ours ends
  compile_min_left_s: float  # a torch.compile measurement starts only with this much left
  run_reserve_s: float       # our compiles stop being waited for this long before our deadline
  e2e_batches: tuple = (1, 16)
  unet_batches: tuple = (1, 8)
  train_batch: int = 8
  check_latent_size: int = 8
  pairs_batch: int = 8       # prompts per teacher solve
  pairs_steps: int = 25      # Euler steps of the teacher
  guidance: float = 5.0      # classifier-free guidance of the teacher (the paper's w)
  dtype: str = 'bfloat16'    # compute dtype of every measurement but the float32 check
  # The training step's remat policy (models/unet.py REMAT_POLICIES); None: the reflow
  # config's (configs/sd15_reflow.py model.remat_policy).
  remat_policy: Optional[str] = None
  stacked_batches: tuple = ()  # forward passes of the stacked 1.7B student (two U-Nets)
  attention_batch: int = 0     # attention alone at the top level's self-attention shapes

  @property
  def latent_size(self) -> int:
    return self.unet['sample_size']

  @property
  def image_size(self) -> int:
    return self.latent_size * 2 ** (len(self.vae['block_out_channels']) - 1)

  @property
  def attention_shape(self) -> tuple:
    """(batch, tokens, heads, head dim) of the U-Net's widest self-attention. SD 1.5's
    config names its head count attention_head_dim, as diffusers reads it."""
    heads = self.unet['attention_head_dim']
    return (self.attention_batch, self.latent_size ** 2, heads,
            self.unet['block_out_channels'][0] // heads)

  @property
  def text_shape(self) -> tuple:
    """(tokens, width) of the text states the U-Net attends to."""
    return self.text['max_position_embeddings'], self.unet['cross_attention_dim']


def _sd_unet(channels, layers, heads, cross_dim, groups, sample_size, levels_with_attention):
  levels = len(channels)
  plain = levels - levels_with_attention
  return dict(sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=layers,
              block_out_channels=channels, norm_num_groups=groups,
              down_block_types=('CrossAttnDownBlock2D',) * levels_with_attention
              + ('DownBlock2D',) * plain,
              up_block_types=('UpBlock2D',) * plain
              + ('CrossAttnUpBlock2D',) * levels_with_attention,
              attention_head_dim=heads, cross_attention_dim=cross_dim)


def _sd_vae(channels, layers, groups, sample_size):
  return dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=channels,
              down_block_types=('DownEncoderBlock2D',) * len(channels),
              up_block_types=('UpDecoderBlock2D',) * len(channels), layers_per_block=layers,
              norm_num_groups=groups, sample_size=sample_size, scaling_factor=0.18215)


def _clip_text(vocab, hidden, layers, heads, intermediate):
  # SD 1.5's text_encoder/config.json token ids (eos_token_id=2: legacy argmax pooling).
  return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
              num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
              hidden_act='quick_gelu', projection_dim=hidden, bos_token_id=0, eos_token_id=2,
              pad_token_id=1)


# The CPU presets: SD 1.5's layout scaled down, float32 (a CPU has no fast bf16), the
# training step without remat (XLA:CPU drops remat's optimization barriers: it would save no
# memory there, only add work). `bench.py --gflops` prints their U-Nets' FLOPs per image.
_CPU = dict(dtype='float32', remat_policy='none', e2e_batches=(1, 8), unet_batches=(1, 8),
            train_batch=8, pairs_batch=4, torch_reserve_s=420, compile_min_left_s=120,
            run_reserve_s=30)

CONFIGS = {
    'sd15': BenchConfig(
        unet=_sd_unet((320, 640, 1280, 1280), 2, 8, 768, 32, 64, levels_with_attention=3),
        vae=_sd_vae((128, 256, 512, 512), 2, 32, 512),
        text=_clip_text(49408, 768, 12, 12, 3072),
        budget_s=280, torch_reserve_s=90, compile_min_left_s=40, run_reserve_s=30,
        stacked_batches=(1, 8), attention_batch=8),
    # 8.6M-parameter U-Net (32 to 128 channels), 16x16 latents, 128px images.
    'small': BenchConfig(
        unet=_sd_unet((32, 64, 128, 128), 2, 4, 64, 8, 16, levels_with_attention=3),
        vae=_sd_vae((32, 64, 64, 64), 1, 8, 128),
        text=_clip_text(1000, 64, 2, 4, 128),
        budget_s=900, **_CPU),
    # Wider and deeper: 25.5M parameters (48 to 192 channels, 3 layers per block).
    'medium': BenchConfig(
        unet=_sd_unet((48, 96, 192, 192), 3, 4, 96, 8, 16, levels_with_attention=3),
        vae=_sd_vae((32, 64, 96, 96), 1, 8, 128),
        text=_clip_text(1000, 96, 2, 4, 192),
        budget_s=900, **_CPU),
    # Wider still, on 24x24 latents (192px images): 34.0M parameters (64 to 256 channels).
    'large': BenchConfig(
        unet=_sd_unet((64, 128, 256, 256), 2, 8, 128, 8, 24, levels_with_attention=3),
        vae=_sd_vae((48, 96, 128, 128), 1, 8, 192),
        text=_clip_text(1000, 128, 2, 4, 256),
        budget_s=900, **_CPU),
}


def row_names(cfg: BenchConfig) -> List[str]:
  """Every measurement of a config, in the table's order (`--rows` picks among these)."""
  attention = [f'attn_{impl}_{passes}' for passes in ('fwd', 'fwdbwd') for impl in ATTENTION]
  return (['check'] + [f'e2e_b{b}' for b in cfg.e2e_batches]
          + [f'unet_b{b}' for b in cfg.unet_batches]
          + [f'pairs_b{cfg.pairs_batch}', f'train_b{cfg.train_batch}']
          + [f'stacked_b{b}' for b in cfg.stacked_batches]
          + (attention if cfg.attention_batch else []))


def compared_rows(cfg: BenchConfig) -> List[str]:
  """The rows whose outputs both sides save, to compare them (the agreement line)."""
  return ['e2e_b1', 'unet_b1', f'pairs_b{cfg.pairs_batch}', 'stacked_b1']


def select_rows(cfg: BenchConfig, rows: str) -> List[str]:
  """The rows named in `rows` (comma-separated; empty: all), in the table's order."""
  known = row_names(cfg)
  wanted = [r for r in rows.split(',') if r]
  unknown = [r for r in wanted if r not in known]
  if unknown:
    raise ValueError(f'--rows: {unknown[0]!r} is not a row of this config; '
                     f'choose from {",".join(known)}')
  return [r for r in known if r in wanted] if wanted else known


def reflow_config():
  """configs/sd15_reflow.py, whose `reflow` stage the training step follows."""
  from configs import sd15_reflow  # the repository root is on the children's PYTHONPATH
  return sd15_reflow.get_config()


def trainer_config():
  """The training section both sides' steps follow: configs/sd15_reflow.py's `reflow` (AdamW
  with linear warm-up, global-norm clipping, EMA, uniform time, l2 loss, the teacher's
  coupled noise, no caption dropout).

  Its log_every is moved to the last step so that no timed step is a log step: there the
  trainer runs two more forward passes for text_use, which the reference does not."""
  train = reflow_config().reflow
  train.log_every = train.steps
  return train


def remat_policy(cfg: BenchConfig) -> str:
  return cfg.remat_policy or reflow_config().model.remat_policy


def trainer_settings(train, cfg: BenchConfig) -> dict:
  """The trainer's numbers that both steps follow, for the report."""
  optimizer = train.optimizer
  return dict(lr=optimizer.lr, warmup_steps=optimizer.warmup_steps, b1=optimizer.b1,
              b2=optimizer.b2, eps=optimizer.eps, weight_decay=optimizer.weight_decay,
              grad_clip=optimizer.grad_clip, ema_decay=train.ema_decay,
              caption_dropout=train.caption_dropout, time=train.time.kind, loss=train.loss,
              remat=remat_policy(cfg))


def stacked_settings() -> dict:
  """configs/instaflow_1_7b.py's removals (StackedUNetConfig's num_dropped_levels, keep_mid)."""
  from configs import instaflow_1_7b
  return instaflow_1_7b.get_config().model.stacked.to_dict()


# ---- Inputs, the same numpy arrays on both sides ---------------------------------------

def token_ids(cfg: BenchConfig, batch: int, seed: int = 1) -> np.ndarray:
  """Random prompts (seed 1), or with UNCOND_SEED the negative prompts of guidance."""
  shape = (batch, cfg.text['max_position_embeddings'])
  return np.random.RandomState(seed).randint(0, cfg.text['vocab_size'], shape).astype(np.int32)


def normal(seed: int, shape) -> np.ndarray:
  return np.random.RandomState(seed).standard_normal(shape).astype(np.float32)


def latents(cfg: BenchConfig, batch: int, size: Optional[int] = None) -> np.ndarray:
  """N(0, I) noise, NHWC."""
  size = size or cfg.latent_size
  return normal(2, (batch, size, size, cfg.unet['in_channels']))


def text_states(cfg: BenchConfig, batch: int) -> np.ndarray:
  return normal(3, (batch,) + cfg.text_shape)


def train_batch(cfg: BenchConfig) -> Dict[str, np.ndarray]:
  """A batch of the reflow stage: the teacher's pairs (its noise X0 and its latents X1,
  NHWC) and text states. The step draws the times and the dropped captions itself."""
  b, size = cfg.train_batch, cfg.latent_size
  shape = (b, size, size, cfg.unet['in_channels'])
  return dict(x0=normal(4, shape), latents=normal(5, shape), text_embeds=text_states(cfg, b))


def null_text_states(cfg: BenchConfig) -> np.ndarray:
  """The empty prompt's states, which replace a dropped caption."""
  return normal(7, (1,) + cfg.text_shape)


def nchw(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def nhwc(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
