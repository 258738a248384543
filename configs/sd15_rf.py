r"""Stage 'rf' at Stable Diffusion 1.5 scale: fine-tune SD 1.5 into a rectified flow.

Not the paper's path: InstaFlow's 2-RF reflows SD 1.5 itself (configs/sd15_pairs.py takes
SD 1.5 as the teacher). This stage is for a flow teacher of one's own: fine-tuning SD 1.5's
weights with the rectified-flow loss turns the epsilon-predicting U-Net into a velocity
field, a 1-RF, which configs/sd15_pairs.py then takes with --config.pairs.teacher=rf. Needs
a local diffusers copy of SD 1.5 and an image-text tfds dataset (coco_captions by default,
prepared as array_record).

  python -m instaflow_jax.main --config=configs/sd15_rf.py:/data/stable-diffusion-v1-5 \
      --workdir=gs://bucket/sd15 --config.data.data_dir=/data/tensorflow_datasets

Settings (ours, not the paper's): AdamW lr 1e-5 after 1000 warm-up steps, batch 256,
caption dropout 0.1, EMA 0.9999, 100k steps.
"""
import ml_collections

from configs import sd15


def get_config(diffusers_path: str = '') -> ml_collections.ConfigDict:
  c = sd15.base_config(diffusers_path, stages=('rf',))
  c.rf = sd15.training()
  return c
