r"""Stage 'reflow' of the paper's chain: the 2-rectified flow (2-RF), in two phases.

The velocity objective on SD 1.5's pairs (configs/sd15_pairs.py), started from SD 1.5's own
U-Net weights (reflow.init='': the diffusers folder's), as the 2-RF's model card says:
  phase 1, stage 'reflow':       batch 64 for 70,000 steps (11.2 A100-days);
  phase 2, stage 'reflow_large': batch 1024 for 25,000 more (64 A100-days), from phase 1.
The card reports FID-5k 21.5 and CLIP score 0.315 on MS COCO 2017 with 25 Euler steps.
AdamW lr 1e-5 after warm-up, EMA 0.9999, no caption dropout: this project's choices.

  python -m instaflow_jax.main --config=configs/sd15_reflow.py:/data/stable-diffusion-v1-5 \
      --workdir=/runs/sd15
"""
import ml_collections

from configs import sd15

PAIRS = dict(pairs='pairs', caption_dropout=0.0, sample_steps=4)


def get_config(diffusers_path: str = '') -> ml_collections.ConfigDict:
  c = sd15.base_config(diffusers_path, stages=('reflow', 'reflow_large'))
  c.reflow = sd15.training(steps=70_000, batch_size=64, init='', **PAIRS)
  # A stage of its own (config_checks.stage_kind): the same trainer from phase 1's params.
  c.reflow_large = sd15.training(kind='reflow', steps=25_000, batch_size=1024, init='reflow',
                                 **PAIRS)
  return c
