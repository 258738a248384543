r"""Our checkpoints <-> diffusers folders, from the command line.

  # a training run of ours -> a diffusers folder (safetensors + config.json per component)
  python -m instaflow_jax.convert --src=RUN --out=DIR [--stage=NAME] [--params=ema|raw]
  # a stage that trained a LoRA -> DIR/pytorch_lora_weights.safetensors (diffusers' LoRA
  # file), or with --merge_lora the diffusers folder of its U-Net with the LoRA merged
  python -m instaflow_jax.convert --src=RUN --stage=NAME --out=DIR [--merge_lora]
  # a diffusers folder -> an Orbax params directory, usable as a stage's `init`
  python -m instaflow_jax.convert --src=DIFFUSERS_FOLDER --out=PARAMS_DIR

The direction follows from --src. A diffusers folder (model_index.json) becomes the Orbax
params of its U-Net, what `init` of the rf, reflow and distill stages reads
(e.g. --config.rf.init=/abs/PARAMS_DIR, with model.diffusers_path the same folder for the
text encoder, the VAE and the tokenizer). Anything else is one of our runs, found as
generate finds it (workdir.find_trained_params): a workdir (its latest finished stage of
distill > reflow > rf, or --stage), a stage directory, its params/, or a checkpoints/STEP
directory (EMA params, or the raw ones with --params=raw). Its trained U-Net is written
with the text encoder, the VAE, the tokenizer and the other components (scheduler, ...) of
the base diffusers folder it was trained from (model.diffusers_path), so that diffusers'
and transformers' from_pretrained load every component. Sampling it needs the rectified-flow
loop (Euler over timesteps (1 - i/N) * 1000, as the released InstaFlow pipeline does), not
the base folder's diffusion scheduler.

The embedded toy model (model.source='embedded') is refused with an error that says why:
it is pixel space (an identity autoencoder, no VAE) with a word-level tokenizer and a
seeded random text encoder, and no diffusers pipeline runs that; a folder without VAE or
CLIP tokenizer would look loadable and fail later. Its Orbax params already are its
checkpoint: generate from the workdir directly.

--out must not exist; it appears only once the conversion is complete.
"""
import os

from absl import flags

from instaflow_jax import checkpoint
from instaflow_jax import cli
from instaflow_jax import pipeline as pipeline_lib
from instaflow_jax import trained_unet
from instaflow_jax import workdir as workdir_lib
from instaflow_jax.convert import diffusers as diffusers_io
from instaflow_jax.convert import lora_files
from instaflow_jax.models import abstract
from instaflow_jax.models import lora as lora_lib

FLAGS = flags.FlagValues()
_SRC = flags.DEFINE_string('src', None, 'A diffusers folder, or a workdir, stage directory, '
                           'params/ or checkpoints/STEP directory of ours.', flag_values=FLAGS)
_OUT = flags.DEFINE_string('out', None, 'The folder to write (must not exist).',
                           flag_values=FLAGS)
_STAGE = flags.DEFINE_string('stage', '', 'The stage of a workdir (default: the latest '
                             'finished one).', flag_values=FLAGS)
_PARAMS = flags.DEFINE_enum('params', 'ema', ['ema', 'raw'], 'Of a checkpoints/STEP '
                            'directory: the EMA or the raw params.', flag_values=FLAGS)
_MERGE_LORA = flags.DEFINE_bool('merge_lora', False, 'Of a stage that trained a LoRA: write '
                                'the diffusers folder of its U-Net with the LoRA merged, '
                                "instead of the LoRA file.", flag_values=FLAGS)
flags.mark_flags_as_required(['src', 'out'], flag_values=FLAGS)


def diffusers_to_params(folder: str, out: str) -> str:
  """The U-Net of a diffusers folder -> an Orbax params directory (an `init`)."""
  diffusers_io.read_model_index(folder)
  with cli.staged_output(out) as staging:
    _, _, params = diffusers_io.load_component(folder, 'unet')
    checkpoint.save_params(staging, params)
  return (f'wrote the U-Net params of {folder} to {os.path.abspath(out)}; train from them '
          f'with --config.<stage>.init={os.path.abspath(out)}')


def lora_to_file(trained: workdir_lib.TrainedParams, out: str) -> str:
  """The LoRA of a stage that trained one -> out/pytorch_lora_weights.safetensors, the file
  diffusers' load_lora_weights reads (and generate --lora)."""
  lora_config = trained_unet.stage_lora(trained.stage_config(), trained.stage)
  unet = pipeline_lib.Pipeline.from_config(trained.model_config(), workdir=trained.workdir).unet
  abstract_params = abstract.abstract_params(unet)
  lora = trained_unet.load_lora(trained, lora_config, abstract_params)
  with cli.staged_output(out) as staging:
    lora_files.write_lora(
        os.path.join(staging, lora_files.WEIGHTS_NAME), lora,
        lora_files.kernel_shapes(abstract_params, lora_lib.layers_of(lora)),
        trained_unet.lora_scale(lora_config))
  return (f'wrote the LoRA of {trained.params_path} to '
          f'{os.path.join(os.path.abspath(out), lora_files.WEIGHTS_NAME)}')


def trained_to_diffusers(trained: workdir_lib.TrainedParams, out: str) -> str:
  """The trained U-Net of one of our runs (a LoRA stage's merged), with its base model -> a
  diffusers folder."""
  if trained.model_config().source == 'embedded':
    raise ValueError(
        f'{trained.params_path}: the embedded model is pixel space (identity autoencoder, '
        'word-level tokenizer); no diffusers pipeline runs it, so there is no diffusers folder '
        'to write. Use the run directly: python -m instaflow_jax.generate --model='
        f'{trained.workdir}')
  with cli.staged_output(out) as staging:
    pipeline_lib.Pipeline.from_checkpoint(trained).save_diffusers(staging)
  return f'wrote {trained.params_path} as a diffusers folder to {os.path.abspath(out)}'


def convert(src: str, out: str, stage: str = '', params: str = 'ema',
            merge_lora: bool = False) -> str:
  """Converts in the direction that `src` implies; returns what was written."""
  source = pipeline_lib.find_model(src, stage, params)
  lora_stage = not isinstance(source, str) and trained_unet.stage_lora(
      source.stage_config(), source.stage) is not None
  if merge_lora and not lora_stage:
    raise ValueError(f'--merge_lora: {src} is no stage that trained a LoRA (model.lora.stages)')
  if isinstance(source, str):
    return diffusers_to_params(source, out)
  if lora_stage and not merge_lora:
    return lora_to_file(source, out)
  return trained_to_diffusers(source, out)


def main(argv) -> None:
  cli.run_command(FLAGS, argv, lambda: print(
      convert(_SRC.value, _OUT.value, _STAGE.value, _PARAMS.value, _MERGE_LORA.value)))
