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

# Logical axes (the models' parameter axes, models/layers.py, and the activations' batch)
# -> mesh axes, as in configs/shapes.py: the batch over data and fsdp, FSDP on the weights'
# input width, tensor parallelism on their output width; norms and embeddings whole.
AXIS_RULES = (
    ('batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),
    ('conv_in', 'fsdp'),
    ('mlp', 'tensor'),
    ('conv_out', 'tensor'),
    ('norm', None),
    ('vocab', None),
)


def get_config(diffusers_path: str = '') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stages = ('rf',)
  # Data parallel over every device; --config.mesh.fsdp=8 shards params and optimizer state
  # over groups of 8 devices (instaflow_jax/parallel.py).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1: the devices left
  c.axis_rules = AXIS_RULES
  c.min_shard_size = 2 ** 14  # params with fewer elements stay replicated

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

  c.rf = ml_collections.ConfigDict(dict(
      steps=100_000,
      batch_size=256,
      grad_accum_steps=1,
      ema_decay=0.9999,
      optimizer=dict(lr=1e-5, warmup_steps=1000, schedule='constant', grad_clip=1.0,
                     b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2),
      time=dict(kind='uniform', logit_mean=0.0, logit_std=1.0, u_shape_a=4.0),
      loss='l2',                    # or 'pseudo_huber'
      caption_dropout=0.1,          # classifier-free guidance training
      init='',                      # '' = the diffusers folder's U-Net
      pairs='',                     # train on the pairs of this stage (reflow) instead of data
      log_every=100,
      checkpoint_every=2000,
      keep_checkpoints=3,
      sample_every=2000,
      num_samples=16,
      sample_steps=25,
      sample_guidance=1.5,
  ))
  return c
