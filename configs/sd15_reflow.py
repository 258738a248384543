r"""Stage 'reflow' at Stable Diffusion 1.5 scale: the 2-rectified flow (2-RF).

The rectified-flow trainer on the teacher's pairs (configs/sd15_pairs.py), started from the
teacher. Paper settings (InstaFlow, 2-RF from SD 1.5): AdamW, lr 1e-5 (constant after
warmup), batch 256 (they report ~75 A100-days for 2-RF), guidance-free training on pairs
made with w = 5; sampling the 2-RF with 2-8 Euler steps and guidance 1-2.

  python -m instaflow_jax.main --config=configs/sd15_reflow.py:/data/stable-diffusion-v1-5 \
      --workdir=/runs/sd15
"""
import ml_collections

from configs import sd15_rf


def get_config(diffusers_path: str = '') -> ml_collections.ConfigDict:
  c = sd15_rf.get_config(diffusers_path)
  c.stages = ('reflow',)
  c.reflow = c.rf
  c.reflow.pairs = 'pairs'
  c.reflow.init = 'rf'
  c.reflow.caption_dropout = 0.0
  c.reflow.sample_steps = 4
  del c['rf']
  return c
