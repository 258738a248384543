r"""Stage 'pairs' at Stable Diffusion 1.5 scale: the teacher's (noise, latent) couplings.

The paper generates its reflow data with the SD 1.5 teacher: noise X0 -> X1 by the teacher
ODE with classifier-free guidance w = 5 (25-step Euler here; Dopri5 via
--config.pairs.solver=dopri5), over captions of the training set (LAION in the paper;
coco_captions by default here). The paper's 2-RF used about 1.6M pairs of 64x64x4 latents.
`teacher` names params of a finished stage in the same workdir ('rf', from
configs/sd15_rf.py) or an absolute path of params.

  python -m instaflow_jax.main --config=configs/sd15_pairs.py:/data/stable-diffusion-v1-5 \
      --workdir=/runs/sd15 --config.data.data_dir=/data/tensorflow_datasets
"""
import ml_collections

from configs import sd15_rf


def get_config(diffusers_path: str = '') -> ml_collections.ConfigDict:
  c = sd15_rf.get_config(diffusers_path)
  c.stages = ('pairs',)
  c.pairs = ml_collections.ConfigDict(dict(
      teacher='rf', split='train', num_pairs=1_600_000, shard_size=4096, batch_size=64,
      solver='euler', num_steps=25, rtol=1e-3, atol=1e-3, guidance=5.0))
  return c
