"""python -m instaflow_jax.convert: see instaflow_jax/convert_cli.py."""
from instaflow_jax import cli
from instaflow_jax import convert_cli

__doc__ = convert_cli.__doc__  # what --help prints

if __name__ == '__main__':
  cli.run_main(convert_cli.main)
