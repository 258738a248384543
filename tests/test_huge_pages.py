"""The command lines restart once with glibc's huge-page tunable (instaflow_jax/huge_pages.py)."""
import os
import subprocess
import sys

from instaflow_jax import huge_pages

from tests import runs

# What the restarted child reports: its process id and the tunables it runs with.
_REPORT = ('import os; from instaflow_jax import huge_pages; huge_pages.restart_with_huge_pages(); '
           'print(os.getpid(), os.environ.get("GLIBC_TUNABLES"))')


def _run_report(env):
  child = subprocess.Popen([sys.executable, '-c', _REPORT], cwd=runs.REPO, env=env,
                           stdout=subprocess.PIPE, text=True)
  out, _ = child.communicate(timeout=60)
  assert child.returncode == 0
  pid, tunables = out.split()
  return child.pid, int(pid), tunables


def test_the_tunable_joins_the_others():
  assert huge_pages.with_huge_pages({})['GLIBC_TUNABLES'] == 'glibc.malloc.hugetlb=1'
  env = huge_pages.with_huge_pages({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=4', 'A': 'b'})
  assert env == {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1', 'A': 'b'}


def test_a_setting_the_user_gave_is_kept():
  env = {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}
  assert huge_pages.with_huge_pages(env) == env


def test_the_process_restarts_itself_once_with_the_tunable():
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  popen_pid, pid, tunables = _run_report(env)
  assert pid == popen_pid  # exec: the same process, which a supervisor can still signal
  if huge_pages._huge_pages_only_when_advised():
    assert tunables == 'glibc.malloc.hugetlb=1'
  else:  # the kernel gives huge pages to every block already, or to none
    assert tunables == 'None'


def test_no_restart_where_the_user_opted_out():
  env = dict(os.environ, GLIBC_TUNABLES='glibc.malloc.hugetlb=0')
  _, _, tunables = _run_report(env)
  assert tunables == 'glibc.malloc.hugetlb=0'
