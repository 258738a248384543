"""instaflow_jax: the InstaFlow training recipe and one-step sampler in JAX/Flax."""
from setuptools import find_packages, setup

# PyTorch is a test/conversion dependency only; install torch==2.14.1 torchvision==0.29.1
# first (see README), so that these extras do not pull another torch build.
TEST_REQUIRES = [
    'torch',
    'torchvision',
    'diffusers>=0.35',
    'peft==0.21.2',  # builds the LoRA that tests/test_lora.py loads
    'lpips',
    'pytorch-fid',
    'nbclient',
    'ipykernel',
    'nbformat',
    'jupytext',  # the notebooks' sources, colabs/*.py
    'pytest',
    'pytest-xdist',  # the suite runs on both cores (-n 2)
    'filelock',  # the workers make the shared quick chain once
]

setup(
    name='instaflow_jax',
    version='0.1.0',
    description='InstaFlow (one-step text-to-image with rectified flow) in JAX/Flax: '
                'training recipe, sampling, evaluation, conversion.',
    packages=find_packages(include=['instaflow_jax', 'instaflow_jax.*']),
    # The CPU kernels' source, compiled on first use (models/formulations/cpu_kernels.py).
    package_data={'instaflow_jax.models.formulations': ['*.cc']},
    python_requires='>=3.10',
    install_requires=[
        'jax>=0.7',
        'flax>=0.10',
        'optax>=0.2.5',  # optax.tree.norm
        'orbax-checkpoint',
        'transformers>=4.40',
        'safetensors',
        'tensorflow-cpu',
        'tensorboard',
        'tensorflow-datasets',
        'clu',
        'ml-collections',
        'diffrax',
        'scipy',  # the Frechet distance's matrix square root
        'numpy',
        'pillow',
        'matplotlib',
        'absl-py',
        'importlib_resources',  # tensorflow-datasets needs it to prepare datasets, but does not declare it
    ],
    extras_require={'test': TEST_REQUIRES},
)
