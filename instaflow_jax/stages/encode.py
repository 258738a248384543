"""Stage 'encode': the frozen autoencoder and text encoder run once over a dataset.

At Stable Diffusion's scale the VAE encoder and the text encoder in every training step
cost a large part of its compute. This stage stores, for each example i of the config's
data.train_split, the autoencoder's latent distribution (mean and std, so that each
training step still samples a latent, as from images) and the text encoder's hidden
states of its caption, in numbered shards written atomically (data/shards.py): a killed
run resumes where it stopped. A training stage with `encoded='encode'` in its section
(rf) then trains on them: the same batches and random numbers as from the images, without
the frozen encoders in the step.

The images are prepared as the training pipeline shows them in its first epoch: a random
crop or flip (data.crop, data.random_flip) is drawn once and kept; an example with several
captions keeps the one drawn for that epoch. Unreadable images are skipped as in training
(the next readable example takes the place of one). Process p of n writes the shards j
with j % n == p on its own devices; the log gives the images/s.
"""
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from instaflow_jax import images as image_io
from instaflow_jax import parallel
from instaflow_jax import pipeline as pipeline_lib
from instaflow_jax import sampling
from instaflow_jax import workdir as workdir_lib
from instaflow_jax.data import encoded as encoded_lib
from instaflow_jax.data import input as input_lib
from instaflow_jax.data import shards
from instaflow_jax.models import formulations


def encoder(modules: sampling.PipelineModules, layout: parallel.Layout):
  """(params, images uint8, token ids) -> (latent mean, latent std, text states), compiled
  for `layout`: params replicated, the batch split over the batch axes."""
  def encode(params, images, token_ids):
    mean, std = sampling.encode_posterior(modules, params, image_io.to_model_range(images))
    return mean, std, sampling.encode_text(modules, params, token_ids)

  batch = layout.batch_sharding
  return formulations.jit(encode, in_shardings=(layout.replicated, batch, batch),
                          out_shardings=batch)


def text_shape(pipe: pipeline_lib.Pipeline) -> tuple:
  """The shape of one caption's text states, [tokens, width], computed abstractly."""
  states = jax.eval_shape(lambda p, ids: sampling.encode_text(pipe.modules, p, ids),
                          pipe.params, pipe.tokenize(['']))
  return tuple(states.shape[1:])


def run_encode(config: ml_collections.ConfigDict, stage_dir: str) -> Mapping[str, Any]:
  # Each process writes its own shards on its own devices.
  with parallel.use(parallel.data_parallel(jax.local_devices())) as layout:
    return _write_encoded(config, stage_dir, layout)


def _write_encoded(config: ml_collections.ConfigDict, stage_dir: str,
                   layout: parallel.Layout) -> Mapping[str, Any]:
  encode_config = config.encode
  layout.check_batch_size(encode_config.batch_size, 'encode.batch_size (per process)')
  if encode_config.dtype not in encoded_lib.DTYPES:
    raise ValueError(f'config.encode.dtype = {encode_config.dtype!r}: use one of '
                     f'{", ".join(encoded_lib.DTYPES)}')
  pipe = pipeline_lib.Pipeline.for_training(config.model, seed=config.seed,
                                            workdir=os.path.dirname(stage_dir))
  data_config = input_lib.input_config(config.data, config.data.train_split)
  data = input_lib.create_input(data_config, pipe.tokenizer,
                                global_batch_size=encode_config.batch_size, seed=config.seed)
  ranges = shards.shard_ranges(len(data), encode_config.shard_size)
  meta = {
      'num_examples': len(data), 'shard_size': encode_config.shard_size,
      'num_shards': len(ranges), 'seed': config.seed, 'data': input_lib.describe(data_config),
      'image_size': data_config.image_size, 'crop': data_config.crop,
      'random_flip': data_config.random_flip, 'dtype': encode_config.dtype,
      'latent_shape': list(pipe.latent_shape), 'text_shape': list(text_shape(pipe)),
      'model': {'source': config.model.source, 'diffusers_path': config.model.diffusers_path}}
  # meta.json first: it refuses shards on disk made with other settings.
  parallel.process_0_first('encode meta',
                           lambda: shards.write_meta(stage_dir, encoded_lib.KIND, meta))
  workdir_lib.write_stage_config(stage_dir, config)
  encode = encoder(pipe.modules, layout)
  params = parallel.put({'vae': pipe.params['vae'], 'text': pipe.params['text']},
                        layout.replicated)
  dtype = jnp.dtype(encode_config.dtype)

  with input_lib.worker_map(data.workers) as map_fn:
    def make_records(indices, padded):
      batch = data.batch_of(np.zeros_like(padded), padded, map_fn)
      outputs = encode(params, *layout.shard_batch((batch['image'], batch['input_ids'])))
      mean, std, text = (np.asarray(x.astype(dtype)) for x in outputs)
      return [{'index': int(i), 'latent_mean': mean[k], 'latent_std': std[k],
               'text_embeds': text[k]} for k, i in enumerate(indices)]

    written = shards.write_missing_shards(stage_dir, encoded_lib.KIND, ranges,
                                          encode_config.batch_size, make_records, 'images')
  return {'num_examples': len(data), 'num_shards': len(ranges), **written}
