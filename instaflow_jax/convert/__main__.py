"""python -m instaflow_jax.convert: see instaflow_jax/convert/cli.py."""
from instaflow_jax import generate
from instaflow_jax.convert import cli

__doc__ = cli.__doc__  # what --help prints

if __name__ == '__main__':
  generate.run_main(cli.main)
