"""The benchmark script runs end to end on a tiny case and writes its table (no timing asserted)."""

import json
import subprocess
import sys

from conftest import ROOT


def test_benchmark_writes_jsonl_and_markdown(tmp_path):
  out = tmp_path / 'bench'
  res = subprocess.run(
    [
      sys.executable,
      'experiments/benchmark.py',
      '--configs',
      'default',
      '--batch_sizes',
      '32',
      '--steps',
      '4',
      '--repeats',
      '2',
      '--out',
      str(out),
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert res.returncode == 0, res.stderr[-2000:]
  row = json.loads((out.with_suffix('.jsonl')).read_text().splitlines()[0])
  # CCL MLP 64-256-256-10 on digits: forward+backward is ~2x(64·256+256·256+256·10) MACs per sample,
  # so XLA's count must be within a small factor of 2·3·84k ≈ 0.5 MFLOP.
  assert 0.2 < row['mflop_per_sample'] < 1.5, row
  assert row['samples_per_s'] > 0 and 0 < row['roof_fraction']
  table = out.with_suffix('.md').read_text()
  assert '| default | 32 |' in table
