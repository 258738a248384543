"""benchmarks/bench.py's rows (`--rows`), its configs' sizes and its children's environment."""
import os

import pytest

from tests import runs


@pytest.fixture
def bench(monkeypatch):
  """bench.py's modules, which import each other as scripts do (benchmarks/ on sys.path)."""
  monkeypatch.syspath_prepend(os.path.join(runs.REPO, 'benchmarks'))
  import bench
  return bench


def test_rows_are_picked_in_the_tables_order(bench):
  sd15 = bench.CONFIGS['sd15']
  assert bench.bench_configs.select_rows(sd15, 'train_b8,e2e_b1,attn_cudnn_fwd') == [
      'e2e_b1', 'train_b8', 'attn_cudnn_fwd']
  assert bench.bench_configs.select_rows(sd15, '') == bench.bench_configs.row_names(sd15)


def test_the_sd15_table_has_the_gpu_rows(bench):
  sd15 = bench.CONFIGS['sd15']
  rows = bench.bench_configs.row_names(sd15)
  for row in ('e2e_b1', 'e2e_b16', 'unet_b8', 'train_b8', 'stacked_b1', 'attn_cudnn_fwd',
              'attn_xla_fwd', 'attn_cudnn_fwdbwd', 'attn_xla_fwdbwd'):
    assert row in rows
  # SD 1.5's 64x64 self-attention: 4096 tokens, 8 heads of 40.
  assert sd15.attention_shape == (8, 4096, 8, 40)
  assert not any(row.startswith(('attn', 'stacked'))
                 for row in bench.bench_configs.row_names(bench.CONFIGS['small']))


def test_an_unknown_row_stops_the_command_with_the_rows_it_has(bench, capsys):
  with pytest.raises(SystemExit) as stop:
    bench.main(['--config', 'small', '--rows', 'e2e_b1,unet_b9'])
  message = str(stop.value.code)
  assert "'unet_b9' is not a row" in message
  assert 'unet_b8' in message and 'train_b8' in message


def test_the_cpu_configs_span_4x_in_unet_flops(bench):
  gflops = [bench.bench_torch.unet_gflops(bench.CONFIGS[name])
            for name in ('small', 'medium', 'large')]
  assert gflops == sorted(gflops)
  assert gflops[-1] >= 4 * gflops[0]


def test_the_children_run_in_the_users_environment(bench):
  env = bench.child_environment({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=4', 'A': 'b'})
  assert env == {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=4', 'A': 'b',
                 'PYTHONUNBUFFERED': '1', 'PYTHONPATH': bench.REPO_ROOT}
