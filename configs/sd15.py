r"""What every Stable Diffusion 1.5 config shares: the model (a local diffusers folder of SD
1.5), the data, the device mesh, and the trainer's defaults at this scale.

The paper's chain from SD 1.5 (InstaFlow, Liu et al., ICLR 2024; the released models' cards,
huggingface.co/XCLiu/2_rectified_flow_from_sd_1_5 and .../instaflow_0_9B_from_sd_1_5) is
three stages, one config each, in one workdir:

  configs/sd15_pairs.py    SD 1.5 itself (DPM-Solver++) makes the (noise, latent) pairs
  configs/sd15_reflow.py   the 2-RF: reflow from SD 1.5's weights, batch 64 then 1024
  configs/sd15_distill.py  InstaFlow-0.9B: one-step student, L2 then LPIPS
  configs/coco_eval.py     FID and CLIP score on MS COCO 2017 5k

configs/sd15_rf.py (fine-tuning SD 1.5 into a 1-RF first) is an option, not the paper's
path. Hardware: accelerators with bf16 (TPU v4/v5, A100/H100); the U-Net has 860M
parameters. The batch sizes are global: scale nothing, the mesh spreads them.
"""
import ml_collections

from instaflow_jax import parallel


def base_config(diffusers_path: str, stages: tuple) -> ml_collections.ConfigDict:
  """Everything but the stages' own sections."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stages = stages
  # Data parallel over every device; --config.mesh.fsdp=8 shards params and optimizer state
  # over groups of 8 devices (instaflow_jax/parallel.py).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1: the devices left
  c.axis_rules = parallel.AXIS_RULES
  c.min_shard_size = 2 ** 14  # params with fewer elements stay replicated

  c.data = ml_collections.ConfigDict(dict(
      source='tfds',                # or 'folder', 'webdataset' with `path` (configs/shapes.py)
      path='',
      name='coco_captions',
      data_dir='',
      train_split='train',
      eval_split='val[:1000]',
      image_key='image',
      caption_key='captions/text',
      image_size=512,
      crop='center',                # or 'random'
      random_flip=False,
      max_bad_fraction=0.01,        # unreadable images tolerated before the run stops
      # Prompts alone (one a line, UTF-8) for pairs and distill, and (eval_prompts_file) for
      # the sample grids and eval, which then measures CLIP score but no FD (no real images):
      # the paper drew its prompts from LAION (laion2B-en); '' = the dataset's captions.
      prompts_file='',
      eval_prompts_file='',
  ))

  # --config.stages='("encode", "rf")' --config.rf.encoded=encode: the VAE latents and
  # text states computed once (float16 halves their disk), not in every training step.
  c.encode = ml_collections.ConfigDict(dict(shard_size=4096, batch_size=64, dtype='float16'))

  c.model = ml_collections.ConfigDict(dict(
      source='diffusers',
      diffusers_path=diffusers_path,
      compute_dtype='bfloat16',     # fp32 master weights, bf16 compute
      # What the U-Net's backward pass recomputes (models/unet.py REMAT_POLICIES: none,
      # attention, dots_saveable, full); the memory of each: benchmarks/residuals.py.
      remat_policy='full',
      autoencoder='vae',
      text_seed=0,
      max_length=77,
      # LoRA training instead of the whole U-Net, for the stages named (configs/shapes.py).
      lora=dict(stages=(), rank=16, alpha=16.0,
                target_modules=('to_q', 'to_k', 'to_v', 'to_out_0')),
      text_encoder=ml_collections.ConfigDict(),
      unet=ml_collections.ConfigDict(),
  ))
  return c


def training(**settings) -> ml_collections.ConfigDict:
  """A training stage's section at this scale (rf, reflow, distill), with `settings`."""
  section = ml_collections.ConfigDict(dict(
      steps=100_000,
      batch_size=256,
      grad_accum_steps=1,
      ema_decay=0.9999,
      optimizer=dict(lr=1e-5, warmup_steps=1000, schedule='constant', grad_clip=1.0,
                     b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2,
                     mu_dtype=''),  # AdamW's first moment: '' = float32; 'bfloat16' halves it
      time=dict(kind='uniform', logit_mean=0.0, logit_std=1.0, u_shape_a=4.0),
      loss='l2',                    # or 'l1', 'pseudo_huber'
      caption_dropout=0.1,          # classifier-free guidance training
      init='',                      # '' = the diffusers folder's U-Net
      pairs='',                     # train on the pairs of this stage (reflow) instead of data
      encoded='',                   # train on the latents and text states of this stage (encode)
      log_every=100,
      checkpoint_every=2000,
      keep_checkpoints=3,
      preemption_check_every=10,    # processes agree on SIGTERM (a host round trip)
      sample_every=2000,
      num_samples=16,
      sample_steps=25,
      sample_guidance=1.5,
  ))
  section.update(settings)
  return section
