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
distill.batch_size with the number of devices.
"""
import ml_collections

from configs import shapes


def get_config(diffusers_path: str = '') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stages = ('distill',)

  c.data = ml_collections.ConfigDict(dict(
      name='coco_captions',
      data_dir='',
      train_split='train',
      eval_split='val[:1000]',
      image_key='image',
      caption_key='captions/text',
      image_size=512,
  ))

  c.model = ml_collections.ConfigDict(dict(
      source='diffusers',           # SD 1.5's VAE, text encoder, tokenizer and U-Net config
      diffusers_path=diffusers_path,
      compute_dtype='bfloat16',
      remat=True,
      autoencoder='vae',
      text_seed=0,
      max_length=77,
      text_encoder=ml_collections.ConfigDict(),
      unet=ml_collections.ConfigDict(),
      unet_kind='stacked',          # the student; 'unet' would be the 0.9B student
      stacked=ml_collections.ConfigDict(dict(num_dropped_levels=0, keep_mid=True)),
  ))

  t = shapes.training_config(quick=False, steps=39_500)
  t.teacher = 'reflow'              # the 2-RF velocity field, run for many Euler steps
  t.teacher_guidance = 1.5
  t.init = 'reflow'                 # both halves from the 2-RF U-Net (stacked_unet.init_from_unet)
  t.loss = 'l2'                     # until lpips_switch_step, then LPIPS
  t.lpips_switch_step = 21_500
  t.lpips_net = 'vgg'
  t.lpips_trunk_path = ''           # torchvision VGG16 weights for LPIPS ('' = none given)
  t.batch_size = 1024
  t.ema_decay = 0.9999
  t.optimizer.lr = 1e-5
  t.optimizer.warmup_steps = 1000
  t.optimizer.schedule = 'constant'
  t.optimizer.weight_decay = 1e-2
  t.caption_dropout = 0.0           # the teacher's guided velocity carries the guidance
  t.log_every = 100
  t.checkpoint_every = 1000
  t.keep_checkpoints = 3
  t.sample_every = 1000
  t.num_samples = 16
  t.sample_steps = 1                # a one-step generator
  t.sample_guidance = 1.0
  c.distill = t
  return c
