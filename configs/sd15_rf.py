r"""Stage 'rf' at Stable Diffusion 1.5 scale: fine-tune SD 1.5 into a rectified flow.

InstaFlow starts from SD 1.5's weights; fine-tuning them with the rectified-flow loss turns
the epsilon-predicting U-Net into a velocity field (the paper's 1-RF teacher; its 2-RF is
then obtained by reflow, configs/sd15_pairs.py -> configs/sd15_reflow.py). Needs a local
diffusers copy of SD 1.5 (unet/, vae/, text_encoder/, tokenizer/, model_index.json) and
an image-text tfds dataset (coco_captions by default, prepared as array_record).

  python -m instaflow_jax.main --config=configs/sd15_rf.py:/data/stable-diffusion-v1-5 \
      --workdir=gs://bucket/sd15_rf --config.data.data_dir=/data/tensorflow_datasets

Hardware: accelerators with bf16 (TPU v4/v5, A100/H100); the U-Net has 860M parameters.
The per-device batch and remat settings below fit 80 GB GPUs; scale rf.batch_size with
the number of devices.
"""
import ml_collections

from configs import shapes


def get_config(diffusers_path: str = '') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stages = ('rf',)
  shapes.add_mesh(c)

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
      source='diffusers',
      diffusers_path=diffusers_path,
      compute_dtype='bfloat16',     # fp32 master weights, bf16 compute
      remat=True,
      autoencoder='vae',
      text_seed=0,
      max_length=77,
      text_encoder=ml_collections.ConfigDict(),
      unet=ml_collections.ConfigDict(),
  ))

  t = shapes.training_config(quick=False, steps=100_000)
  t.batch_size = 256
  t.ema_decay = 0.9999
  t.optimizer.lr = 1e-5
  t.optimizer.warmup_steps = 1000
  t.optimizer.schedule = 'constant'
  t.optimizer.weight_decay = 1e-2
  t.caption_dropout = 0.1
  t.log_every = 100
  t.checkpoint_every = 2000
  t.keep_checkpoints = 3
  t.sample_every = 2000
  t.num_samples = 16
  t.sample_steps = 25
  t.sample_guidance = 1.5
  c.rf = t
  return c
