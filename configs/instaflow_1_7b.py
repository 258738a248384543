r"""Stage 'distill' for InstaFlow-1.7B: a stacked-U-Net one-step student on top of SD 1.5.

InstaFlow-1.7B (Liu et al., 2023, Sec. 4 and appendix) is the one-step generator made of two
SD 1.5 U-Nets in series without parameter sharing (instaflow_jax/models/stacked_unet.py),
both halves initialised from the 2-RF U-Net (the reflow stage's output), and distilled from
the 2-RF teacher with an L2 similarity loss, then LPIPS. The paper reports FID 22.4 on MS
COCO 2017 (5k images) at 0.12 s per image on an A100 (InstaFlow-0.9B: 23.4, 0.09 s).

Not published, so chosen here: the 1.7B run's batch size, step counts and teacher guidance
below are those of the InstaFlow-0.9B model card (batch 1024; 21,500 steps of L2, then
18,000 of LPIPS; 2-RF teacher at guidance 1.5). Which middle blocks the released 1.7B model
removed is not public either: by default nothing is removed (2 x 860M = 1.72B params);
model.stacked.keep_mid=False removes both mid blocks (1.53B), num_dropped_levels=1 also the
deepest level of each half (1.05B); see the stacked_unet module docstring.

  python -m instaflow_jax.main --config=configs/instaflow_1_7b.py:/data/stable-diffusion-v1-5 \
      --workdir=gs://bucket/instaflow_1_7b --config.data.data_dir=/data/tensorflow_datasets

Hardware: like configs/sd15_rf.py (bf16 compute, remat) with twice the U-Net; scale
distill.batch_size with the number of devices. The student is built by Pipeline.from_config
(model.unet_kind='stacked'); distill.init='reflow_large' (the 2-RF) copies its single U-Net
into both halves, and that single U-Net (distill.teacher) stays the teacher.
"""
import ml_collections

from configs import sd15_distill


def get_config(diffusers_path: str = '') -> ml_collections.ConfigDict:
  c = sd15_distill.get_config(diffusers_path)
  c.model.unet_kind = 'stacked'     # the student; 'unet' is the 0.9B student
  c.model.stacked = ml_collections.ConfigDict(dict(num_dropped_levels=0, keep_mid=True))
  c.distill.ema_decay = 0.9999
  c.distill.checkpoint_every = 1000
  c.distill.sample_every = 1000
  return c
