"""LoRA training (model.lora) on configs/shapes.py:quick: a LoRA reflow from the quick chain's
1-RF, then a LoRA distill from it. The checkpoints hold the LoRA alone, a resumed run ends
where an uninterrupted one does, and the stages' U-Nets read back merged."""
import os
import shutil

import flax
import jax
import numpy as np
import pytest

from instaflow_jax import checkpoint
from instaflow_jax import convert_cli
from instaflow_jax import pipeline as pipeline_lib
from instaflow_jax import stages
from instaflow_jax import workdir as workdir_lib
from instaflow_jax.convert import lora_files
from instaflow_jax.models import lora as lora_lib
from tests.test_main import quick_config

pytestmark = pytest.mark.slow  # runs the quick chain


def _lora_config(tfds_dir, *stage_names):
  """The quick config with LoRA reflow and distill, shortened: reflow checkpoints at steps
  5 and 10."""
  config = quick_config(tfds_dir, *stage_names)
  config.model.lora.stages = ('reflow', 'distill')
  config.reflow.update(dict(steps=10, log_every=5, checkpoint_every=5, sample_every=10))
  config.distill.update(dict(steps=4, log_every=2, checkpoint_every=4, sample_every=4))
  return config


def _last_checkpoint(stage_dir) -> str:
  steps = sorted(int(s) for s in os.listdir(os.path.join(stage_dir, 'checkpoints')))
  return os.path.join(stage_dir, 'checkpoints', str(steps[-1]))


def _copy(quick_chain, workdir, names=('text', 'rf', 'pairs')):
  for name in names:
    shutil.copytree(os.path.join(quick_chain, name), os.path.join(workdir, name))


def _array_bytes(step_dir) -> int:
  """The bytes of the arrays a train-state checkpoint holds (from its metadata: the files'
  own sizes vary with how OCDBT happened to batch the writes)."""
  metadata = checkpoint._tree_metadata(os.path.join(step_dir, workdir_lib.STATE_ITEM))
  return sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
             for leaf in jax.tree.leaves(metadata))


def _unet(workdir, stage):
  trained = workdir_lib.find_trained_params(workdir, stage=stage)
  return pipeline_lib.Pipeline.from_checkpoint(trained).unet_params


@pytest.fixture(scope='module')
def lora_run(quick_chain, tfds_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('lora_run'))
  _copy(quick_chain, workdir)
  stages.run_all(_lora_config(tfds_dir, 'reflow', 'distill'), workdir)
  return workdir


def test_checkpoints_hold_the_lora_alone(lora_run, quick_chain):
  for stage in ('reflow', 'distill'):
    stage_dir = os.path.join(lora_run, stage)
    names = {path[-1] for path in flax.traverse_util.flatten_dict(
        checkpoint._tree_metadata(os.path.join(stage_dir, workdir_lib.FINAL_PARAMS)))}
    assert names == {lora_lib.DOWN, lora_lib.UP}, (stage, names)
    lora_checkpoint = _array_bytes(_last_checkpoint(stage_dir))
    full_checkpoint = _array_bytes(_last_checkpoint(os.path.join(quick_chain, stage)))
    print(f'{stage}: LoRA checkpoint {lora_checkpoint} bytes, whole U-Net {full_checkpoint}')
    assert lora_checkpoint < full_checkpoint / 4, (stage, lora_checkpoint, full_checkpoint)


def test_stages_read_back_merged_onto_their_init(lora_run, quick_chain):
  rf, reflow, distill = (_unet(lora_run, stage) for stage in ('rf', 'reflow', 'distill'))
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), rf, reflow)
  flat = flax.traverse_util.flatten_dict(changed)
  adapted = {path for path, differs in flat.items() if differs}
  assert adapted and all(path[-2] in ('to_q', 'to_k', 'to_v', 'to_out_0') and path[-1] == 'kernel'
                         for path in adapted), 'only the adapted kernels may change'
  assert any(np.any(np.asarray(a) != np.asarray(b))
             for a, b in zip(jax.tree.leaves(reflow), jax.tree.leaves(distill)))
  images = pipeline_lib.load_pipeline(workdir_lib.find_trained_params(lora_run)).generate(
      ['a red circle'], seed=0)
  assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()


def test_resume_is_exact(lora_run, quick_chain, tfds_dir, tmp_path):
  """A LoRA reflow stopped after its checkpoint at step 5 ends where the run that did not
  stop ended."""
  workdir = str(tmp_path / 'resumed')
  _copy(quick_chain, workdir)
  stage_dir = os.path.join(workdir, 'reflow')
  shutil.copytree(os.path.join(lora_run, 'reflow'), stage_dir)
  os.remove(os.path.join(stage_dir, workdir_lib.DONE_FILE))
  shutil.rmtree(os.path.join(stage_dir, workdir_lib.FINAL_PARAMS))
  shutil.rmtree(os.path.join(stage_dir, 'checkpoints', '10'))
  stages.run_all(_lora_config(tfds_dir, 'reflow'), workdir)
  jax.tree.map(np.testing.assert_array_equal, _unet(workdir, 'reflow'), _unet(lora_run, 'reflow'))


def test_resume_with_another_rank_is_refused(lora_run, quick_chain, tfds_dir, tmp_path):
  workdir = str(tmp_path / 'other_rank')
  _copy(quick_chain, workdir)
  stage_dir = os.path.join(workdir, 'reflow')
  shutil.copytree(os.path.join(lora_run, 'reflow'), stage_dir)
  os.remove(os.path.join(stage_dir, workdir_lib.DONE_FILE))
  config = _lora_config(tfds_dir, 'reflow')
  config.model.lora.rank = 8
  with pytest.raises(checkpoint.CheckpointError, match=r'checkpoints/10 does not fit the model '
                     r'config: .*down.* shape'):
    stages.run_all(config, workdir)


def test_export_and_merge(lora_run, tmp_path):
  """convert writes a LoRA stage as diffusers' LoRA file, which reads back to the stage's
  merged U-Net; --merge_lora is refused for the pixel-space toy, which has no diffusers
  folder to write."""
  out = str(tmp_path / 'lora')
  convert_cli.convert(os.path.join(lora_run, 'reflow'), out)
  pipe = pipeline_lib.Pipeline.from_checkpoint(
      workdir_lib.find_trained_params(lora_run, stage='rf'))
  again = pipe.with_lora(out, 1.0).unet_params
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(_unet(lora_run, 'reflow'))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
  assert os.listdir(out) == [lora_files.WEIGHTS_NAME]
  with pytest.raises(ValueError, match='the embedded model is pixel space'):
    convert_cli.convert(os.path.join(lora_run, 'reflow'), str(tmp_path / 'merged'),
                        merge_lora=True)


def test_lora_of_a_diffusers_model_exports_to_diffusers(tfds_dir, tmp_path):
  """A LoRA rf on a tiny diffusers folder (its U-Net the base, init ''): the LoRA file that
  convert writes, loaded by diffusers onto the folder's U-Net, computes what the folder that
  --merge_lora writes does, and that folder's U-Net is the stage's merged one."""
  import torch
  from diffusers import UNet2DConditionModel
  from tests.test_stages import tiny_sd_rf_config
  folder = str(tmp_path / 'tiny_sd')
  config = tiny_sd_rf_config(folder, tfds_dir)
  config.rf.optimizer.update(dict(lr=1e-2, warmup_steps=1))
  config.model.lora.update(dict(stages=('rf',), rank=2, alpha=4.0))
  workdir = str(tmp_path / 'work')
  stages.run_all(config, workdir)
  lora_out, merged_out = str(tmp_path / 'lora'), str(tmp_path / 'merged')
  convert_cli.convert(workdir, lora_out)
  convert_cli.convert(workdir, merged_out, merge_lora=True)

  ours = pipeline_lib.Pipeline.from_checkpoint(workdir_lib.find_trained_params(workdir))
  exported = pipeline_lib.Pipeline.from_diffusers(merged_out)
  for a, b in zip(jax.tree.leaves(ours.unet_params), jax.tree.leaves(exported.unet_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with torch.no_grad():
    with_lora = UNet2DConditionModel.from_pretrained(os.path.join(folder, 'unet'))
    with_lora.load_lora_adapter(os.path.join(lora_out, lora_files.WEIGHTS_NAME), prefix='unet')
    merged = UNet2DConditionModel.from_pretrained(os.path.join(merged_out, 'unet'))
    base = UNet2DConditionModel.from_pretrained(os.path.join(folder, 'unet'))
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 16, 32)
    out = with_lora(x, 500.0, encoder_hidden_states=text).sample
    want = merged(x, 500.0, encoder_hidden_states=text).sample
    assert (want - base(x, 500.0, encoder_hidden_states=text).sample).abs().max() > 1e-3
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
