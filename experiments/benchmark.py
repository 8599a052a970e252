"""Training-speed benchmark: every rule × model × batch size asked for, on this machine's devices.

For each case it builds the real config (`configs/<name>.py`), the rule and the same fused training
chunk the loop uses (`train.make_chunk`), on synthetic data of the dataset's shape resident on the
device, and reports: median step time, samples/s, training FLOPs per sample (XLA's cost analysis of
one step, at batch 32 and at the case's batch), achieved FLOP/s, the fraction of the machine's
matmul roof (a large fp32 matmul timed the same way, in the same process), compile time, peak
memory (XLA's buffer assignment) and the wall time of one whole epoch of steps including index
shuffling and the per-call metrics pull.

  python experiments/benchmark.py                       # CIFAR-10 MLP, BP vs CCL, batch 256
  python experiments/benchmark.py --configs cifar10_mlp_bp,cifar10_mlp_ccl,mnist_mlp_fa \
      --batch_sizes 32,256 --out experiments/results/bench_cpu
Writes <out>.jsonl and <out>.md; `step_over_bp` compares each row with BP on the same network.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from ccl_jax import config as config_lib
from ccl_jax import data, step, train
from ccl_jax.rules import local_losses
from ccl_jax.rules.base import Task

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPES = {
  'digits': ((8, 8, 1), 10, 1293),
  'mnist': ((28, 28, 1), 10, 54000),
  'fashion_mnist': ((28, 28, 1), 10, 54000),
  'cifar10': ((32, 32, 3), 10, 45000),
  'cifar100': ((32, 32, 3), 100, 45000),
}


def load_config(name: str):
  spec = importlib.util.spec_from_file_location(name, ROOT / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def matmul(n: int = 2048):
  """A large fp32 matmul on the default device (2n³ FLOPs): the roof the steps are compared with."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  jax.block_until_ready(f(a))
  return lambda: jax.block_until_ready(f(a)), 2 * n**3


def step_flops(learner, state, images, labels, batch: int) -> float:
  """XLA's FLOP count of one training step at `batch`, per sample."""
  idx = jnp.zeros((1, batch), jnp.int32)
  lowered = jax.jit(train.make_chunk(learner.update)).lower(state, images, labels, idx)
  cost = lowered.compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', float('nan'))) / batch


class Case:
  """One config × batch size, compiled and ready to time on synthetic data resident on device."""

  def __init__(self, name: str, batch: int, steps: int, data_cache: dict):
    self.name, self.batch, self.steps = name, batch, steps
    config = load_config(name)
    config.batch_size = batch
    config = self.config = config_lib.finalize(config)
    shape, k, n = SHAPES[config.dataset]
    if config.dataset not in data_cache:
      rng = np.random.default_rng(0)
      data_cache[config.dataset] = (
        jnp.asarray(rng.normal(size=(n,) + shape).astype(np.float32)),
        jnp.asarray(rng.integers(0, k, n).astype(np.int32)),
      )
    self.images, self.labels = data_cache[config.dataset]
    self.n, self.steps_per_epoch = n, n // batch
    self.learner = step.build(config, Task(k, shape, self.steps_per_epoch * config.num_epochs))
    self.state = self.learner.init(
      jax.random.PRNGKey(0), {'image': self.images[:batch], 'label': self.labels[:batch]}
    )
    self.chunk = jax.jit(
      train.make_chunk(self.learner.update, config.scan_unroll, data.augmenter(config)),
      donate_argnums=0,
    )
    self.idx = jnp.asarray(train.epoch_indices(jax.random.PRNGKey(1), 0, n, batch, True)[:steps])
    t0 = time.perf_counter()
    self.compiled = self.chunk.lower(self.state, self.images, self.labels, self.idx).compile()
    self.compile_s = time.perf_counter() - t0
    self.times: list[float] = []
    self.call()  # warm-up

  def call(self, idx=None, compiled=None):
    self.state, metrics = (compiled or self.compiled)(
      self.state, self.images, self.labels, self.idx if idx is None else idx
    )
    return metrics

  def time_call(self) -> None:
    t0 = time.perf_counter()
    jax.block_until_ready(self.call())
    self.times.append(time.perf_counter() - t0)

  def result(self, roof: float) -> dict:
    """The row: step-time median over the timed calls, then one whole epoch as the loop runs it."""
    config, batch = self.config, self.batch
    step_s = statistics.median(self.times) / self.steps
    mem = self.compiled.memory_analysis()
    peak = (
      (
        mem.temp_size_in_bytes
        + mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
      )
      if mem is not None
      else float('nan')
    )
    # Shuffle, calls of `steps` steps, a metrics pull per call. A short last call is compiled
    # ahead (as the loop does), so compilation is not epoch time.
    rest = self.steps_per_epoch % self.steps
    calls = {self.steps: self.compiled}
    if rest:
      calls[rest] = self.chunk.lower(
        self.state, self.images, self.labels, self.idx[:rest]
      ).compile()
    t0 = time.perf_counter()
    all_idx = train.epoch_indices(jax.random.PRNGKey(2), 1, self.n, batch, True)
    for start in range(0, self.steps_per_epoch, self.steps):
      part = jnp.asarray(all_idx[start : start + self.steps])
      jax.device_get(self.call(part, calls[part.shape[0]])['loss'])
    epoch_s = time.perf_counter() - t0
    # The epoch's overhead is judged against step times taken right after it, not the rounds
    # (minutes earlier): on a VM whose speed drifts, that keeps epoch_over_steps about the loop.
    self.times, rounds = [], self.times
    for _ in range(5):
      self.time_call()
    local_step_s, self.times = statistics.median(self.times) / self.steps, rounds
    flops = step_flops(self.learner, self.state, self.images, self.labels, batch)
    flops32 = step_flops(self.learner, self.state, self.images, self.labels, 32)
    achieved = flops * batch / step_s
    return {
      'config': self.name,
      'rule': config.rule,
      'model': config.model,
      'dataset': config.dataset,
      'network': network(config),
      'activation': activation(config),
      'batch': batch,
      'device': jax.devices()[0].device_kind,
      'step_ms': 1e3 * step_s,
      'samples_per_s': batch / step_s,
      'mflop_per_sample': flops / 1e6,
      'mflop_per_sample_b32': flops32 / 1e6,
      'gflop_per_s': achieved / 1e9,
      'roof_gflop_per_s': roof / 1e9,
      'roof_fraction': achieved / roof,
      'compile_s': self.compile_s,
      'peak_mib': peak / 2**20,
      'epoch_s': epoch_s,
      'steps_per_epoch': self.steps_per_epoch,
      'epoch_over_steps': epoch_s / (self.steps_per_epoch * local_step_s),
    }


def bench(
  names: list[str], batches: list[int], steps: int, repeats: int
) -> tuple[list[dict], float]:
  """Builds every case, then times them and the roof matmul in interleaved rounds (one call of
  each per round), so a drift of the machine's speed hits every case alike. Returns the rows and
  the roof in FLOP/s."""
  data_cache: dict = {}
  cases = [Case(name, batch, steps, data_cache) for name in names for batch in batches]
  roof_call, roof_flops = matmul()
  roof_times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    roof_call()
    roof_times.append(time.perf_counter() - t0)
    for case in cases:
      case.time_call()
  roof = roof_flops / statistics.median(roof_times)
  print(f'{jax.devices()[0].device_kind}: fp32 matmul roof {roof / 1e9:.1f} GFLOP/s', flush=True)
  rows = []
  for case in cases:
    rows.append(case.result(roof))
    print(
      json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}),
      flush=True,
    )
  return rows, roof


def network(config) -> str:
  """The layer widths a step's cost depends on (activations aside)."""
  if config.model == 'mlp':
    return f'mlp {tuple(config.mlp.hidden)}'
  if config.model == 'cnn':
    return f'cnn {tuple(config.cnn.channels)}'
  return f'{config.model} ×{config.vgg.feat_mult:g}'


def activation(config) -> str:
  section = config[config.model] if config.model in config else config.vgg
  return f'{section.activation}/{section.get("output_activation", "none")}'


def add_bp_ratios(rows: list[dict]) -> None:
  """step_over_bp: each row's step time over backprop's on the same network and batch, in this
  run: rule 'bp', or for the local-loss rules 'global' (backprop through the same block net)."""
  base = {(r['rule'], r['network'], r['dataset'], r['batch']): r['step_ms'] for r in rows}
  for r in rows:
    baseline = 'global' if r['rule'] in local_losses.VARIANTS else 'bp'
    key = (baseline, r['network'], r['dataset'], r['batch'])
    r['step_over_bp'] = r['step_ms'] / base.get(key, float('nan'))


COLUMNS = [
  ('config', '{}'),
  ('batch', '{}'),
  ('step_ms', '{:.2f}'),
  ('step_over_bp', '{:.2f}'),
  ('samples_per_s', '{:.0f}'),
  ('mflop_per_sample', '{:.1f}'),
  ('mflop_per_sample_b32', '{:.1f}'),
  ('gflop_per_s', '{:.1f}'),
  ('roof_fraction', '{:.2f}'),
  ('compile_s', '{:.1f}'),
  ('peak_mib', '{:.0f}'),
  ('epoch_s', '{:.2f}'),
  ('epoch_over_steps', '{:.3f}'),
]


def markdown(rows: list[dict]) -> str:
  head = '| ' + ' | '.join(c for c, _ in COLUMNS) + ' |'
  sep = '|' + '---|' * len(COLUMNS)
  body = ['| ' + ' | '.join(f.format(r[c]) for c, f in COLUMNS) + ' |' for r in rows]
  return '\n'.join([head, sep, *body])


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--configs', default='cifar10_mlp_bp,cifar10_mlp_ccl')
  p.add_argument('--batch_sizes', default='256')
  p.add_argument('--steps', type=int, default=20, help='steps per compiled call')
  p.add_argument('--repeats', type=int, default=15, help='interleaved timing rounds')
  p.add_argument('--out', default='experiments/results/bench_cpu')
  args = p.parse_args(argv)
  rows, roof = bench(
    args.configs.split(','), [int(b) for b in args.batch_sizes.split(',')], args.steps, args.repeats
  )
  add_bp_ratios(rows)
  os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
  with open(args.out + '.jsonl', 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  with open(args.out + '.md', 'w') as f:
    f.write(
      f'# Training speed on {jax.devices()[0].device_kind} ({os.cpu_count()} CPUs)\n\n'
      f'fp32 matmul roof measured in the same process: {roof / 1e9:.1f} GFLOP/s.\n'
      f'Command: `python {" ".join([sys.argv[0]] + (argv or sys.argv[1:]))}`\n'
      'Step times are medians of multi-step calls timed in interleaved rounds (every case and\n'
      "the roof matmul once per round); `step_over_bp` is the step time over BP's on the same\n"
      'network in this run; `epoch_over_steps` is one epoch as the loop runs it (shuffle, calls,\n'
      'a metrics pull per call) over steps × a step time taken just after it. For the local-loss\n'
      'rules (pred, sim, predsim) the backprop baseline is `global` on the same block net.\n'
      'On a shared VM\n'
      'absolute times drift by about ±10% between runs: compare rows of one run only.\n\n'
    )
    f.write(markdown(rows) + '\n')
  print(markdown(rows))


if __name__ == '__main__':
  main()
