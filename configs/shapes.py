r"""The embedded default: the InstaFlow recipe on captioned shapes, on a CPU, in minutes.

Pixel-space rectified flow (no VAE) on the locally generated `captioned_shapes` dataset,
conditioned by a small CLIP text encoder (seeded random weights, trained with the U-Net in
stage rf, frozen afterwards) and a word-level tokenizer over the training captions' words,
both stored with the run (WORKDIR/text). Nothing is downloaded.

  python -m instaflow_jax.main --config=configs/shapes.py --workdir=runs/shapes
  python -m instaflow_jax.main --config=configs/shapes.py:quick --workdir=/tmp/quick

`:quick` shrinks the same config so that every code path runs in about a minute (tests,
smoke runs); `:long` trains each stage longer, on four times the pairs (65 to 95 min on
2 cores), for a teacher that draws most prompts exactly. Override any field from the
command line, e.g. --config.rf.steps=100.
"""
import ml_collections

from instaflow_jax import parallel


def get_config(arg: str = None) -> ml_collections.ConfigDict:
  quick, long = arg == 'quick', arg == 'long'
  if arg not in (None, '', 'quick', 'long'):
    raise ValueError(
        f"configs/shapes.py: unknown variant {arg!r}; use ':quick', ':long' or nothing")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stages = ('rf', 'pairs', 'reflow', 'distill', 'eval')
  add_mesh(c)

  c.data = ml_collections.ConfigDict(dict(
      # Where the images and captions come from: 'tfds' (the dataset `name`), 'folder' (an
      # image folder with metadata.jsonl, metadata.csv or .txt captions) or 'webdataset'
      # (tar shards of KEY.jpg + KEY.txt/.json, as img2dataset writes): see data/files.py.
      source='tfds',
      path='',                      # folder, or tars: comma-separated paths or globs
      name='captioned_shapes/size16' if quick else 'captioned_shapes/size24',  # tfds name
      data_dir='',                  # '' = the tfds default (~/tensorflow_datasets)
      # Splits: a folder or webdataset has one, 'train', sliced as tfds slices splits:
      # train_split='train[:-100]', eval_split='train[-100:]'.
      train_split='train[:2048]' if quick else 'train',
      eval_split='validation',
      image_key='image',            # tfds feature paths (file sources: image and caption)
      caption_key='caption',
      image_size=16 if quick else 24,
      # Shorter side resized to image_size, then a 'center' or 'random' crop, and a
      # horizontal flip half of the time with random_flip (drawn from seed, epoch, example).
      crop='center',
      random_flip=False,
      # Unreadable images (skipped, with a warning that counts them) and index entries
      # without an image or caption tolerated, as a fraction of the examples; above it the
      # run stops with an error.
      max_bad_fraction=0.01,
      # UTF-8 text files of prompts, one a line ('' = the tfds captions), for what needs
      # prompts only: prompts_file for pairs and distill, eval_prompts_file for the sample
      # grids and for eval with evaluator 'inception' (configs/coco_eval.py): its first
      # eval.num_prompts lines, CLIP score without FD (no real images); the shapes
      # evaluator needs the dataset's labels. rf trains on the dataset's images.
      # Surrounding whitespace is stripped, empty lines skipped, duplicates kept
      # (data/input.py read_prompts).
      prompts_file='',
      eval_prompts_file='',
  ))

  c.model = ml_collections.ConfigDict(dict(
      source='embedded',            # or 'diffusers' (see configs/sd15_rf.py)
      # 'stacked': two U-Nets in series (InstaFlow-1.7B), both from the one U-Net; meant
      # for the distill stage's student (--config.model.unet_kind=stacked there).
      unet_kind='unet',
      stacked=dict(num_dropped_levels=0, keep_mid=True),
      diffusers_path='',
      compute_dtype='float32',
      remat_policy='none',          # a CPU saves nothing by it (models/unet.py)
      autoencoder='identity',       # pixel space
      # The word tokenizer's words: '' = those of the training captions, or a file (one
      # word a line, or a word_tokenizer.json). With the encoder from text_seed they are
      # stored once per run in WORKDIR/text, which every later stage, generate and eval read.
      vocabulary='',
      text_seed=1234,               # the frozen random text encoder's weights
      # LoRA training: the training stages named in `stages` (e.g. ('reflow', 'distill'))
      # train a LoRA of `rank` on the layers named in `target_modules` (the last part of a
      # params path: 'to_q', 'to_out_0', 'proj_in', the feed-forward's 'net_2', ...)
      # instead of the whole U-Net; the train state, the checkpoints and the stage's
      # params/ then hold the LoRA alone, merged onto the stage's init wherever the stage's
      # U-Net is read.
      # The deltas are scaled by alpha / rank, as peft does.
      lora=dict(stages=(), rank=4, alpha=4.0,
                target_modules=('to_q', 'to_k', 'to_v', 'to_out_0')),
      max_length=16,
      text_encoder=dict(hidden_size=32 if quick else 64, intermediate_size=64 if quick else 128,
                        num_hidden_layers=1 if quick else 2, num_attention_heads=2 if quick else 4,
                        hidden_act='quick_gelu'),
      unet=dict(
          sample_size=16 if quick else 24,
          in_channels=3, out_channels=3,
          # Attention only at the lowest resolution (6x6) and in the middle block: on a
          # CPU, attention at 12x12 or 24x24 too makes a step several times slower, and
          # 6x6 still resolves the 3x3 grid of positions the captions name.
          block_out_channels=(16, 32) if quick else (32, 64, 64),
          down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D') if quick else (
              'DownBlock2D', 'DownBlock2D', 'CrossAttnDownBlock2D'),
          up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D') if quick else (
              'CrossAttnUpBlock2D', 'UpBlock2D', 'UpBlock2D'),
          layers_per_block=1,
          # Two transformer layers at 6x6 bind the caption's words to the layout faster than
          # one: 0.58 exact at 4000 steps on average over three seeds against 0.50 over two,
          # for a step 1.13x slower; three draw no more. :long's teacher was measured with
          # one (docs/shapes_ablation.md).
          transformer_layers_per_block=1 if quick or long else 2,
          attention_head_dim=2 if quick else 4,
          norm_num_groups=8,
          cross_attention_dim=32 if quick else 64,
          # 'text' adds the attention-pooled caption to the timestep embedding, so every
          # resnet reads it: no better than cross-attention alone (docs/shapes_ablation.md).
          addition_embed_type=ml_collections.config_dict.placeholder(str),
          addition_embed_type_num_heads=4,
      ),
  ))

  # Optional, for latent-space models: the frozen VAE and text encoder run once over
  # data.train_split; a training stage with encoded='encode' trains on the stored results.
  c.encode = ml_collections.ConfigDict(dict(
      shard_size=64 if quick else 1024,
      batch_size=8 if quick else 64,
      dtype='float32',              # or 'float16': half the disk
  ))

  # The teacher's steps are what makes it follow its prompts: at 1000 it ignored them (exact
  # prompt fidelity 0.01), at 4000 it draws 68% exactly at seed 0 (52% and 56% at seeds 1
  # and 2), at 10000 (:long, one layer) 86% (docs/shapes_ablation.md).
  c.rf = training_config(quick, steps=30 if quick else 10000 if long else 4000)
  # Logit-normal times (SD3's) weight the middle of the path, where the text decides the
  # layout: the same fidelity as uniform times at 3000 steps, better colours and counts.
  c.rf.time.kind = 'logit_normal'
  # With one transformer layer: 0.517 exact at 4000 steps against 0.458 at 1e-3 (4e-3:
  # 0.480). :long's 10000 steps were measured at 1e-3 (docs/shapes_ablation.md).
  c.rf.optimizer.lr = 1e-3 if long else 2e-3
  # The text encoder trains with the U-Net (the run's stored one, WORKDIR/text, becomes the
  # trained one, frozen for every later stage), for a step about 1.04x slower: the teacher
  # then draws 0.91 of the colours and 0.93 of the counts right where the random encoder's
  # drew 0.76 and 0.83 at seed 0 (at seed 1: 0.85 and 0.85 against 0.74 and 0.84), its
  # positions worse (0.65 against 0.73), as it reads the relation of two shapes poorly
  # (docs/shapes_ablation.md). :long's teacher was measured with the random encoder.
  c.rf.train_text_encoder = not long
  c.rf.sample_guidance = 2.0        # the grid with classifier-free guidance (trained with dropout)

  # The teacher (1-RF) integrates its ODE from noise to images: the coupled pairs.
  c.pairs = ml_collections.ConfigDict(dict(
      # A stage of this workdir (its final params), an absolute path of params, or an
      # absolute path of a diffusers folder: a diffusion model (Stable Diffusion itself, as
      # in the paper) or a flow; a folder teacher brings its own text encoder and tokenizer.
      teacher='rf',
      teacher_kind='',              # a folder's 'flow' or 'diffusion'; '' = its class name's
      split='train',                # the prompts (unless data.prompts_file)
      num_pairs=64 if quick else 4096 if long else 1024,
      shard_size=8 if quick else 256,
      batch_size=8 if quick else 128,
      solver='euler',               # a flow teacher's: or 'dopri5' (adaptive; rtol/atol)
      sampler='dpm_solver++',       # a diffusion teacher's: or 'ddim'
      num_steps=4 if quick else 16,
      rtol=1e-3, atol=1e-3,
      # w; the paper used 5.0 for SD 1.5 pairs. Here w=2 follows the prompts as well as 3
      # and 5 do, with a far lower FD (docs/shapes_ablation.md).
      guidance=2.0,
  ))

  # The 2-rectified flow: the same trainer on the pairs, starting from the teacher.
  c.reflow = training_config(quick, steps=20 if quick else 2000 if long else 700)
  c.reflow.ema_decay = 0.99
  # The 2-RF starts from the teacher: a lower learning rate keeps more of what it draws.
  # After the earlier one-layer default's teacher 5e-4 took the student to 0.82x of the
  # teacher's exact fidelity (1e-3: 0.80x); in :long the 2-RF draws 0.755 at 25 steps
  # (1e-3: 0.738).
  # :quick keeps the 1e-3 its tests were written against (docs/shapes_ablation.md).
  c.reflow.optimizer.lr = 1e-3 if quick else 5e-4
  c.reflow.pairs = 'pairs'
  c.reflow.init = 'rf'

  # The one-step student, distilled from the 2-RF teacher, which solves its (straight)
  # ODE inside each step. Pixel space has no pretrained LPIPS trunk here (nothing can be
  # downloaded), so the loss is pseudo-Huber on pixels, chosen explicitly.
  c.distill = training_config(quick, steps=20 if quick else 1500 if long else 300)
  c.distill.ema_decay = 0.99
  c.distill.optimizer.lr = 5e-4
  c.distill.update(dict(
      teacher='reflow', init='reflow', student_steps=1, teacher_steps=4,
      teacher_guidance=1.0, loss='pseudo_huber', loss_after='lpips', switch_step=-1,
      lpips_net='vgg', lpips_trunk_path='', sample_steps=1))

  # The paper's comparison: every model at each number of steps, on held-out prompts.
  c.eval = ml_collections.ConfigDict(dict(
      models=('rf', 'reflow', 'distill'),  # stages of this workdir; the first is the teacher
      labels=dict(rf='1-RF', reflow='2-RF', distill='2-RF + distill'),
      steps=dict(rf=(1,) if quick else (1, 2, 4, 25), reflow=(1,) if quick else (1, 2, 4, 25),
                 distill=(1,)),
      # Each model at the guidance it was made for: the 1-RF at the pairs' w, whose
      # distribution the 2-RF and the student learned at w=1.
      guidance=dict(rf=c.pairs.guidance, reflow=1.0, distill=1.0),
      # Dopri5 (adaptive) after the Euler steps: :long and :quick run it; the default leaves
      # it out, since at this size its NFE does not show the straightening the straightness
      # column shows (the 2-RF took more evaluations than the 1-RF), and it was the eval's
      # costliest row.
      dopri5=('reflow',) if quick else ('rf', 'reflow') if long else (), rtol=1e-2, atol=1e-2,
      num_prompts=16 if quick else 400,   # the first of the held-out split, fixed noise
      batch_size=8 if quick else 100,
      reference_split='train',  # FD floor: real held-out vs as many real training images
      evaluator='shapes',
      evaluator_examples=512 if quick else 20000,
      # 1000 steps read 98% of the real 24x24 held-out images exactly; 16x16 images (read
      # up-sampled) 78%, 96% after 2000 steps, 98% after 4000. eval warns below 95%.
      evaluator_steps=20 if quick else 1000,
      grid_prompts=8,
  ))
  return c


def training_config(quick: bool, steps: int) -> ml_collections.ConfigDict:
  """The training section shared by the rf, reflow and distill stages."""
  t = ml_collections.ConfigDict()
  t.steps = steps
  t.batch_size = 8 if quick else 32
  t.grad_accum_steps = 1
  t.ema_decay = 0.99 if quick else 0.995  # short runs: average the last ~200 steps
  t.optimizer = ml_collections.ConfigDict(dict(
      lr=1e-3, warmup_steps=5 if quick else 100, schedule='cosine', grad_clip=1.0,
      b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
      mu_dtype=''))                 # AdamW's first moment: '' = the params' dtype, or 'bfloat16'
  t.time = ml_collections.ConfigDict(dict(
      kind='uniform', logit_mean=0.0, logit_std=1.0, u_shape_a=4.0))
  t.loss = 'l2'                     # or 'l1', 'pseudo_huber'
  t.caption_dropout = 0.1           # classifier-free guidance training
  t.init = ''                       # params to start from ('' = fresh init or the base model)
  t.pairs = ''                      # train on the pairs of this stage (reflow) instead of data
  t.encoded = ''                    # train on the latents and text states of this stage (encode)
  t.log_every = 5 if quick else 25
  t.checkpoint_every = 10 if quick else 250
  t.keep_checkpoints = 2
  # Processes agree whether one got SIGTERM every this many steps (and at log and save
  # steps): a host round trip each time. A single process stops at the next step.
  t.preemption_check_every = 5
  t.sample_every = 15 if quick else 250
  t.num_samples = 8 if quick else 16
  t.sample_steps = 8 if quick else 25
  t.sample_guidance = 1.0
  return t


def add_mesh(c: ml_collections.ConfigDict) -> None:
  """How a run spreads over devices (instaflow_jax/parallel.py). By default every device
  is on `data` (data parallelism); --config.mesh.fsdp=8 shards params and optimizer state
  over groups of 8 devices (data=-1 takes the rest: 1 on 8 devices, 4 on 32)."""
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1: the devices left
  c.axis_rules = parallel.AXIS_RULES
  c.min_shard_size = 2 ** 14  # params with fewer elements stay replicated
