"""The command lines restart once with glibc's huge-page tunable (instaflow_jax/huge_pages.py)."""
import os
import subprocess
import sys

import pytest

from instaflow_jax import huge_pages

from tests import runs

# What the restarted child reports: its process id and the tunables it runs with. The
# kernel's THP mode is read from the file named by argv[1].
_REPORT = ('import os, sys; from instaflow_jax import huge_pages; '
           'huge_pages.restart_with_huge_pages(sys.argv[1]); '
           'print(os.getpid(), os.environ.get("GLIBC_TUNABLES"))')


def _run_report(env, thp_mode_file):
  child = subprocess.Popen([sys.executable, '-c', _REPORT, thp_mode_file], cwd=runs.REPO,
                           env=env, stdout=subprocess.PIPE, text=True)
  out, _ = child.communicate(timeout=60)
  assert child.returncode == 0
  pid, tunables = out.split()
  return child.pid, int(pid), tunables


def _env_without_tunables():
  return {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}


def _thp_mode_file(tmp_path, content):
  path = tmp_path / 'enabled'
  path.write_text(content + '\n')
  return str(path)


def test_the_tunable_joins_the_others():
  assert huge_pages.with_huge_pages({})['GLIBC_TUNABLES'] == 'glibc.malloc.hugetlb=1'
  env = huge_pages.with_huge_pages({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=4', 'A': 'b'})
  assert env == {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1', 'A': 'b'}


def test_a_setting_the_user_gave_is_kept():
  env = {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}
  assert huge_pages.with_huge_pages(env) == env


def test_the_process_restarts_itself_once_with_the_tunable_under_madvise(tmp_path):
  madvise = _thp_mode_file(tmp_path, 'always [madvise] never')
  popen_pid, pid, tunables = _run_report(_env_without_tunables(), madvise)
  assert pid == popen_pid  # exec: the same process, which a supervisor can still signal
  assert tunables == 'glibc.malloc.hugetlb=1'


@pytest.mark.parametrize('mode', ['[always] madvise never', 'always madvise [never]', None])
def test_no_restart_where_the_kernel_gives_huge_pages_to_every_block_or_none(tmp_path, mode):
  """Under `always` every block has them already, under `never` none can; no THP file (not
  Linux, or no THP): nothing to advise."""
  mode_file = _thp_mode_file(tmp_path, mode) if mode else str(tmp_path / 'missing')
  _, _, tunables = _run_report(_env_without_tunables(), mode_file)
  assert tunables == 'None'


def test_no_restart_where_the_user_opted_out(tmp_path):
  env = dict(os.environ, GLIBC_TUNABLES='glibc.malloc.hugetlb=0')
  _, _, tunables = _run_report(env, _thp_mode_file(tmp_path, 'always [madvise] never'))
  assert tunables == 'glibc.malloc.hugetlb=0'


def test_no_restart_where_jax_runs_on_an_accelerator(tmp_path):
  env = dict(_env_without_tunables(), JAX_PLATFORMS='cuda,cpu')
  _, _, tunables = _run_report(env, _thp_mode_file(tmp_path, 'always [madvise] never'))
  assert tunables == 'None'


@pytest.mark.parametrize('platforms, on_cpu', [('cpu', True), ('cpu,cuda', True),
                                               ('tpu', False), ('cuda,cpu', False)])
def test_the_backend_is_told_from_jax_platforms(platforms, on_cpu):
  assert huge_pages.jax_will_run_on_cpu({'JAX_PLATFORMS': platforms}) == on_cpu


def test_without_jax_platforms_an_installed_accelerator_plugin_decides(monkeypatch):
  assert huge_pages.jax_will_run_on_cpu({})  # this machine has none
  monkeypatch.setattr(huge_pages.importlib.metadata, 'entry_points',
                      lambda group: ['xla_cuda12'] if group == 'jax_plugins' else [])
  assert not huge_pages.jax_will_run_on_cpu({})
