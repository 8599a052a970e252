"""The benchmark script runs end to end on a tiny case and writes its table (no timing asserted);
its torch twin of the CCL step computes our step (where torch is installed)."""

import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import ROOT, load_config


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


@pytest.mark.parametrize(
  'name, overrides',
  [
    ('cifar10_ccl', {'cnn__channels': (4, 8), 'conv_impl': 'xla'}),  # 8×8 → 4 → 2
    ('cifar10_mlp_ccl', {'mlp__hidden': (32, 16)}),
  ],
)
def test_torch_ccl_twin_matches_our_step(name, overrides):
  """The benchmark's torch twin of the CCL step, on our weights: the same total loss as
  `rule.losses`, and the same parameters after two training steps."""
  torch = pytest.importorskip('torch', reason='torch is not installed (not a project dependency)')
  import jax
  import jax.numpy as jnp
  import numpy as np

  from ccl_jax import config as config_lib
  from ccl_jax import step
  from ccl_jax.rules.base import Task

  spec = importlib.util.spec_from_file_location(
    'torch_baseline', ROOT / 'experiments' / 'torch_baseline.py'
  )
  tb = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tb)
  config = load_config(name, batch_size=8, **overrides)
  config = config_lib.finalize(config)
  shape, k = (8, 8, 3), 10
  learner = step.build(config, Task(k, shape, 50))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(8, *shape)).astype(np.float32)
  y = rng.integers(0, k, 8).astype(np.int32)
  batch = {'image': jnp.asarray(x), 'label': jnp.asarray(y)}
  # Parameters U(±1/sqrt(fan_in)) drawn here: compiling our init costs more than the whole check.
  shapes = jax.eval_shape(learner.init, jax.random.PRNGKey(0), batch)
  params = jax.tree.map(
    lambda s: jnp.asarray(rng.uniform(-1, 1, s.shape) / np.sqrt(np.prod(s.shape[:-1])), s.dtype),
    shapes.params,
  )
  state = shapes.replace(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state={t: learner.tx[t].init(p) for t, p in params.items()},
    rng=jax.random.PRNGKey(1),
  )
  assert tb.kind(config) == 'ccl'
  twin = tb.make(config, shape, k, 8, 2, threads=(), total_steps=50)
  twin.load_jax(*jax.device_get((state.params['forward'], state.params['feedback'])))
  twin.set_batch(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(y).long())
  ours = float(jax.jit(learner.rule.losses)(state.params, batch)[0])
  assert abs(twin.losses()[0].item() - ours) < 1e-5 * max(1.0, abs(ours))
  update = jax.jit(learner.update)
  for _ in range(2):
    state, _ = update(state, batch)
    twin.step()
  ref = tb.make(config, shape, k, 8, 1, threads=(), total_steps=50)
  ref.load_jax(*jax.device_get((state.params['forward'], state.params['feedback'])))
  with torch.no_grad():
    for module in ('net', 'feedback'):
      for a, b in zip(getattr(twin, module).parameters(), getattr(ref, module).parameters()):
        assert float((a - b).abs().max()) < 1e-6, module
