r"""Stage 'distill' at Stable Diffusion 1.5 scale: the one-step InstaFlow-0.9B student.

The student starts from the 2-RF (configs/sd15_reflow.py) and learns to map noise to the
2-RF's ODE solution in one Euler step. Paper / model-card settings of InstaFlow-0.9B:
batch 1024, L2 loss on latents first, then LPIPS on decoded images (the switch below);
LPIPS needs the torchvision VGG16 weights as a state-dict file (lpips_trunk_path).
The teacher target is computed in the step by an 8-step Euler solve of the (straight) 2-RF
with guidance 1.5; set distill.pairs='pairs' to use stored pairs instead.

  python -m instaflow_jax.main --config=configs/sd15_distill.py:/data/stable-diffusion-v1-5 \
      --workdir=/runs/sd15 --config.distill.lpips_trunk_path=/data/vgg16.pth
"""
import ml_collections

from configs import sd15_rf


def get_config(diffusers_path: str = '') -> ml_collections.ConfigDict:
  c = sd15_rf.get_config(diffusers_path)
  c.stages = ('distill',)
  c.distill = c.rf
  del c['rf']
  c.distill.batch_size = 1024
  c.distill.steps = 39_500
  c.distill.caption_dropout = 0.0
  c.distill.sample_steps = 1
  c.distill.sample_guidance = 1.0
  c.distill.update(dict(
      teacher='reflow', init='reflow', pairs='', student_steps=1, teacher_steps=8,
      teacher_guidance=1.5, loss='l2', loss_after='lpips', switch_step=21_500,
      lpips_net='vgg', lpips_trunk_path=''))
  return c
