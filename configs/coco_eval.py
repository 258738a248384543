r"""Stage 'eval' on MS COCO: the paper's protocol (5,000 captions, FID, CLIP score).

InstaFlow (Liu et al., ICLR 2024, Table 1 and Fig. 1) generates one 512x512 image for each
of 5,000 captions of MS COCO 2017 validation images and reports the FID between them and
those 5,000 real images (pytorch-fid's Inception; InstaFlow-0.9B: 23.4 at one step,
2-RF: 47.0 at one step, SD 1.5: 20.1 with 25 steps), plus the CLIP score (ViT-g/14 in the
paper; any transformers CLIP folder here). The captions come from tfds `coco_captions`
(the 2014 images, Karpathy split; its 'val' split stands in for 2017 val, from which 5k
images are the first 5,000 here), one caption per image.

Models: the stages of WORKDIR named in eval.models, and diffusers folders given in
eval.paths (e.g. a local copy of the released InstaFlow-0.9B):

  python -m instaflow_jax.main --config=configs/coco_eval.py:/data/stable-diffusion-v1-5 \
      --workdir=/runs/sd15 --config.data.data_dir=/data/tensorflow_datasets \
      --config.eval.inception_path=/data/pt_inception-2015-12-05-6726825d.pth \
      --config.eval.clip_path=/data/clip-vit-large-patch14

Nothing is downloaded: the Inception weights and the CLIP model are files you provide.
"""
import ml_collections

from configs import sd15
from configs import sd15_distill


def get_config(diffusers_path: str = '') -> ml_collections.ConfigDict:
  c = sd15.base_config(diffusers_path, stages=('eval',))
  c.data.eval_split = 'val[:5000]'
  c.eval = ml_collections.ConfigDict(dict(
      models=(sd15_distill.TEACHER, 'distill'),
      labels=dict(reflow_large='2-RF', distill='InstaFlow (2-RF + distill)', released='InstaFlow-0.9B'),
      paths=dict(released=''),       # add 'released' to models and set its folder to compare
      steps=dict(reflow_large=(1, 2, 4, 25), distill=(1,), released=(1,)),
      guidance=dict(reflow_large=1.5, distill=1.0, released=1.0),
      dopri5=(), rtol=1e-3, atol=1e-3,
      num_prompts=5000,
      batch_size=16,
      reference_split='train[:5000]',  # the floor: real val vs real train images
      evaluator='inception',
      inception_path='',             # pytorch-fid's pt_inception-2015-12-05-6726825d.pth
      clip_path='',                  # a transformers CLIP folder; '' = no CLIP score
      grid_prompts=8,
  ))
  return c
