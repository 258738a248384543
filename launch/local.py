r"""Runs one multi-process JAX job on this machine: N processes on CPU devices, for
development and tests of multi-host code paths without a cluster.

  .venv/bin/python launch/local.py --num_processes=2 --devices_per_process=2 -- \
      -m instaflow_jax.main --config=configs/shapes.py:quick --workdir=/tmp/two_processes

Everything after `--` is the Python command line of every process. Process i gets
JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT, JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i (which
instaflow_jax.main passes to jax.distributed.initialize), JAX_PLATFORMS=cpu and
XLA_FLAGS=--xla_force_host_platform_device_count=D. All processes write to this terminal;
when one fails, the others are stopped, and the exit status is the first failure's.
"""
import argparse
import os
import socket
import subprocess
import sys
import time


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def process_env(process_id: int, num_processes: int, devices: int, port: int) -> dict:
  env = dict(os.environ)
  env.update(JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES=str(num_processes),
             JAX_PROCESS_ID=str(process_id), JAX_PLATFORMS='cpu')
  env['XLA_FLAGS'] = ' '.join(filter(None, [
      env.get('XLA_FLAGS', ''), f'--xla_force_host_platform_device_count={devices}']))
  return env


def wait_all(processes) -> int:
  """0 when every process succeeds; otherwise stops the others and returns the first
  failure's status."""
  running = list(processes)
  while running:
    for process in list(running):
      status = process.poll()
      if status is None:
        continue
      running.remove(process)
      if status != 0:
        for other in running:
          other.terminate()
        for other in running:
          other.wait()
        return status
    time.sleep(0.1)
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--num_processes', type=int, default=2)
  parser.add_argument('--devices_per_process', type=int, default=2)
  parser.add_argument('command', nargs=argparse.REMAINDER,
                      help='-- followed by the arguments of python in every process')
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ['--'] else args.command
  if not command:
    parser.error('give the command after --, e.g. -- -m instaflow_jax.main --config=...')
  port = free_port()
  processes = [subprocess.Popen([sys.executable] + command,
                                env=process_env(i, args.num_processes,
                                                args.devices_per_process, port))
               for i in range(args.num_processes)]
  return wait_all(processes)


if __name__ == '__main__':
  sys.exit(main())
