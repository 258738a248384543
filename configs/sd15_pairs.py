r"""Stage 'pairs' of the paper's chain: Stable Diffusion 1.5 itself makes the reflow data.

InstaFlow's 2-RF was trained on (noise, latent) couplings from SD 1.5, a diffusion model
(epsilon prediction), whose probability-flow ODE is solved with DPM-Solver (the paper, Sec.
3-4; the 2-RF's model card compares against "SD 1.5+DPM-Solver"). Here: X0 ~ N(0, I) at
64x64x4, X1 = SD 1.5's latent after 25 steps of DPM-Solver++ (2M, diffusers' defaults)
with classifier-free guidance w, for prompts of the training captions (coco_captions here;
the paper drew them from laion2B-en: give them as --config.data.prompts_file=FILE).

Sources: teacher, solver and resolution, the paper; 25 steps, diffusers' default and the
paper's setting for SD 1.5 + DPM-Solver; w = 5.0 and 1.6M pairs are this project's
choices, not stated in the model cards. Cost in the paper: generating the data is the part
of InstaFlow-0.9B's 199.2 A100-days that reflow (75.2) and distillation (108) leave.

  python -m instaflow_jax.main --config=configs/sd15_pairs.py:/data/stable-diffusion-v1-5 \
      --workdir=/runs/sd15 --config.data.data_dir=/data/tensorflow_datasets
"""
import ml_collections

from configs import sd15


def get_config(diffusers_path: str = '') -> ml_collections.ConfigDict:
  c = sd15.base_config(diffusers_path, stages=('pairs',))
  c.pairs = ml_collections.ConfigDict(dict(
      teacher=diffusers_path,       # SD 1.5's own folder: the diffusion model is the teacher
      teacher_kind='diffusion',
      split='train',                # the prompts (unless data.prompts_file)
      num_pairs=1_600_000, shard_size=4096, batch_size=64,
      sampler='dpm_solver++', num_steps=25, guidance=5.0,
      solver='euler', rtol=1e-3, atol=1e-3,  # for a flow teacher (--config.pairs.teacher=rf)
  ))
  return c
