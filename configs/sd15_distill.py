r"""Stage 'distill' of the paper's chain: the one-step InstaFlow-0.9B student.

From InstaFlow-0.9B's model card: the student starts from the 2-RF (the last reflow phase,
configs/sd15_reflow.py), its time fixed (one Euler step from noise), batch 1024; the 2-RF
teacher at guidance 1.5; L2 loss for 21,500 steps (54.4 A100-days), then LPIPS for 18,000
more (53.6 A100-days). The card reports FID-5k 23.4 and CLIP score 0.304 on MS COCO 2017.
LPIPS needs the torchvision VGG16 weights as a state-dict file (lpips_trunk_path). The
teacher's target is solved in the step, 8 Euler steps of the straight 2-RF (ours; set
distill.pairs='pairs' to use the stored pairs instead).

  python -m instaflow_jax.main --config=configs/sd15_distill.py:/data/stable-diffusion-v1-5 \
      --workdir=/runs/sd15 --config.distill.lpips_trunk_path=/data/vgg16.pth
"""
import ml_collections

from configs import sd15

TEACHER = 'reflow_large'  # the 2-RF: the last phase of configs/sd15_reflow.py


def get_config(diffusers_path: str = '') -> ml_collections.ConfigDict:
  c = sd15.base_config(diffusers_path, stages=('distill',))
  c.distill = sd15.training(
      steps=39_500, batch_size=1024, caption_dropout=0.0, sample_steps=1, sample_guidance=1.0,
      teacher=TEACHER, init=TEACHER, student_steps=1, teacher_steps=8, teacher_guidance=1.5,
      loss='l2', loss_after='lpips', switch_step=21_500, lpips_net='vgg', lpips_trunk_path='')
  return c
