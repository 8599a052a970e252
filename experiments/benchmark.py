"""Training-speed benchmark: every rule × model × batch size asked for, on this machine's devices.

For each case it builds the real config (`configs/<name>.py`), the rule and the same fused training
chunk the loop uses (`train.make_chunk`), on synthetic data of the dataset's shape resident on the
device, and reports: median step time, samples/s, training FLOPs per sample (XLA's cost analysis of
one step, at batch 32 and at the case's batch), achieved FLOP/s, the fraction of the machine's
matmul roof (a large fp32 matmul timed the same way, in the same process), compile time, peak
memory (XLA's buffer assignment) and the wall time of one whole epoch of steps including index
shuffling and the per-call metrics pull (`--epoch_steps N`: timed over N steps and scaled to the
epoch; 0 skips it).

Where PyTorch can be imported (it is not a dependency), each MLP and cnn_pool case also gets a
side-by-side baseline in torch (`torch_baseline.py`), timed in the same interleaved rounds at 1 and
2 threads, its best thread count reported (`ours_over_torch`: our samples/s over torch's). The
baseline is the same computation as the row's where torch has a twin of it (`torch_step`): 'ccl'
for CCL rows (our CCL step written in torch: local forward net, feedback net on the identity, the
same pair losses and per-tree optimizers), 'bp' for every other rule (the same network's backprop
step). The roof is then the faster of XLA's and torch's fp32 matmul. Without torch the baseline
is skipped with a message (`--torch off` skips it too).

  python experiments/benchmark.py                       # CIFAR-10 MLP, BP vs CCL, batch 256
  python experiments/benchmark.py --configs cifar10_mlp_bp,cifar10_mlp_ccl,mnist_mlp_fa \
      --batch_sizes 32,256 --out experiments/results/bench_cpu
  python experiments/benchmark.py --configs cifar10_cnn_bp,cifar10_ccl --batch_sizes 128 \
      --steps 3 --repeats 3 --epoch_steps 24    # conv nets in minutes
Writes <out>.jsonl and <out>.md; `step_over_bp` compares each row with BP on the same network.
"""

from __future__ import annotations

import argparse
import ast
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

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import torch_baseline  # noqa: E402  (beside this script; imports torch only when used)

from ccl_jax import config as config_lib
from ccl_jax import cpu_tuning, data, layers, step, train
from ccl_jax.rules import local_losses
from ccl_jax.rules.base import Task

ROOT = pathlib.Path(__file__).resolve().parents[1]
TORCH_THREADS = (1, 2)
SHAPES = {
  'digits': ((8, 8, 1), 10, 1293),
  'mnist': ((28, 28, 1), 10, 54000),
  'fashion_mnist': ((28, 28, 1), 10, 54000),
  'cifar10': ((32, 32, 3), 10, 45000),
  'cifar100': ((32, 32, 3), 100, 45000),
}


def load_config(name: str):
  """`configs/<name>.py`'s config; a case may override keys after colons:
  `cifar10_ccl:compute_dtype=bfloat16:ccl.loss_scale=0.5` (values read as Python literals)."""
  base, *overrides = name.split(':')
  spec = importlib.util.spec_from_file_location(base, ROOT / 'configs' / f'{base}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for item in overrides:
    key, _, text = item.partition('=')
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    *path, last = key.split('.')
    node = config
    for part in path:
      node = node[part]
    node[last] = value
  return config


def matmul(n: int | None = None, dtype=jnp.float32):
  """A large matmul in `dtype` on the default device (2n³ FLOPs): the roof the steps are compared
  with (n = 2048 on CPU, 8192 on accelerators)."""
  n = n or (2048 if jax.default_backend() == 'cpu' else 8192)
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
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

  def __init__(self, name: str, batch: int, steps: int, data_cache: dict, epoch_steps=None):
    self.name, self.batch, self.steps, self.epoch_steps = name, batch, steps, epoch_steps
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
    self.conv_impl = layers.resolve_conv_impl(config.conv_impl)
    self.work_learner = self.learner  # whose XLA FLOP count is the step's work (see `result`)
    if self.conv_impl != 'xla':
      ref = load_config(name)
      ref.batch_size, ref.conv_impl = batch, 'xla'
      self.work_learner = step.build(config_lib.finalize(ref), self.learner.rule.task)
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
    self.torch: torch_baseline.Step | None = None  # set by `bench` where torch has a twin
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
    """The row: step-time median over the timed calls, then one epoch as the loop runs it (or its
    first `epoch_steps` steps, scaled to the epoch; none if 0)."""
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
    timed = self.steps_per_epoch if self.epoch_steps is None else self.epoch_steps
    timed = min(timed, self.steps_per_epoch)
    epoch_s = over = float('nan')
    if timed > 0:
      epoch_s, over = self.epoch(timed)
    # The work of a step is XLA's count for lax.conv: the multiply-adds a conv needs (padding
    # taps not counted). im2col executes more (the zero taps), Winograd fewer (its transformed
    # products): `mflop_executed` is the step's own count; the roof fraction is of the work.
    flops = step_flops(self.work_learner, self.state, self.images, self.labels, batch)
    flops32 = step_flops(self.work_learner, self.state, self.images, self.labels, 32)
    executed = step_flops(self.learner, self.state, self.images, self.labels, batch)
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
      'mflop_executed': executed / 1e6,
      'gflop_per_s': achieved / 1e9,
      'roof_gflop_per_s': roof / 1e9,
      'roof_fraction': achieved / roof,
      'compile_s': self.compile_s,
      'peak_mib': peak / 2**20,
      'epoch_s': epoch_s,
      'steps_per_epoch': self.steps_per_epoch,
      'epoch_steps_timed': timed,
      'epoch_over_steps': over,
      'conv_impl': self.conv_impl if config.model != 'mlp' else '',
      **self.torch_columns(batch / step_s),
    }

  def epoch(self, timed: int) -> tuple[float, float]:
    """(epoch seconds, their ratio to steps × a step time): shuffle, calls of `steps` steps and a
    metrics pull per call over the epoch's first `timed` steps, scaled to the whole epoch."""
    # A short last call is compiled ahead (as the loop does), so compilation is not epoch time.
    rest = timed % self.steps
    calls = {self.steps: self.compiled}
    if rest:
      calls[rest] = self.chunk.lower(
        self.state, self.images, self.labels, self.idx[:rest]
      ).compile()
    t0 = time.perf_counter()
    all_idx = train.epoch_indices(jax.random.PRNGKey(2), 1, self.n, self.batch, True)[:timed]
    for start in range(0, timed, self.steps):
      part = jnp.asarray(all_idx[start : start + self.steps])
      jax.device_get(self.call(part, calls[part.shape[0]])['loss'])
    elapsed = time.perf_counter() - t0
    # The epoch's overhead is judged against step times taken right after it, not the rounds
    # (minutes earlier): on a VM whose speed drifts, that keeps epoch_over_steps about the loop.
    self.times, rounds = [], self.times
    for _ in range(5):
      self.time_call()
    local_step_s, self.times = statistics.median(self.times) / self.steps, rounds
    return elapsed * self.steps_per_epoch / timed, elapsed / (timed * local_step_s)

  def torch_columns(self, samples_per_s: float) -> dict:
    """torch's step at its best thread count in these rounds, and our speed over it."""
    if self.torch is None:
      return {}
    medians = {t: statistics.median(ts) / self.steps for t, ts in self.torch.times.items()}
    threads = min(medians, key=medians.get)
    torch_rate = self.batch / medians[threads]
    return {
      'torch_step': self.torch.kind,
      'torch_samples_per_s': torch_rate,
      'torch_threads': threads,
      **{f'torch_step_ms_{t}t': 1e3 * m for t, m in medians.items()},
      'ours_over_torch': samples_per_s / torch_rate,
    }


def bench(
  names: list[str],
  batches: list[int],
  steps: int,
  repeats: int,
  epoch_steps: int | None = None,
  use_torch: bool = True,
) -> tuple[list[dict], dict]:
  """Builds every case (and its torch twin), then times them and the roof matmuls in interleaved
  rounds (one call of each per round), so a drift of the machine's speed hits every case alike.
  Returns the rows and the roofs in FLOP/s ({'xla', 'torch' if timed, 'roof': the faster})."""
  data_cache: dict = {}
  cases = [Case(name, batch, steps, data_cache, epoch_steps) for name in names for batch in batches]
  torch_roof = None
  if use_torch and jax.default_backend() != 'cpu':
    print('the PyTorch baseline is a CPU one: skipped on', jax.default_backend(), flush=True)
  elif use_torch and not torch_baseline.available():
    print('torch is not importable: the PyTorch baseline is skipped', flush=True)
  elif use_torch:
    # One torch step per kind × network × batch: the BP twin is shared by the rules on a network,
    # the CCL twin belongs to its config.
    twins: dict = {}
    for case in cases:
      c = case.config
      kind = torch_baseline.kind(c)
      if kind is None:
        if c.model in torch_baseline.NETWORKS:
          print(f"no torch twin of {case.name}'s step: its torch baseline is skipped", flush=True)
        continue
      shape, k, _ = SHAPES[c.dataset]
      name = case.name if kind == 'ccl' else ''
      key = (kind, name, network(c), activation(c), c.dataset, case.batch)
      if key not in twins:
        twins[key] = torch_baseline.make(
          c, shape, k, case.batch, steps, TORCH_THREADS, case.learner.rule.task.total_steps
        )
      case.torch = twins[key]
    torch_roof = torch_baseline.matmul() if twins else None
  roof_call, roof_flops = matmul()
  low = sorted({c.config.compute_dtype for c in cases} - {'float32'})  # e.g. bf16 on a GPU
  low_roofs = {d: matmul(dtype=jnp.dtype(d)) for d in low}
  roof_times: dict[str, list[float]] = {'xla': [], **{f'torch{t}': [] for t in TORCH_THREADS}}
  roof_times.update({d: [] for d in low})
  for _ in range(repeats):
    t0 = time.perf_counter()
    roof_call()
    roof_times['xla'].append(time.perf_counter() - t0)
    for d, (call, _) in low_roofs.items():
      t0 = time.perf_counter()
      call()
      roof_times[d].append(time.perf_counter() - t0)
    if torch_roof is not None:
      for t in TORCH_THREADS:
        roof_times[f'torch{t}'].append(torch_roof[0](t))
    timed = set()
    for case in cases:
      case.time_call()
      if case.torch is not None and id(case.torch) not in timed:
        case.torch.time_call()
        timed.add(id(case.torch))
  roofs = {'xla': roof_flops / statistics.median(roof_times['xla'])}
  if torch_roof is not None:
    roofs['torch'] = max(
      torch_roof[1] / statistics.median(roof_times[f'torch{t}']) for t in TORCH_THREADS
    )
  roofs['roof'] = max(roofs.values())
  roof = roofs['roof']
  print(
    f'{jax.devices()[0].device_kind}: fp32 matmul roof {roof / 1e9:.1f} GFLOP/s ('
    + ', '.join(f'{k} {v / 1e9:.1f}' for k, v in roofs.items() if k != 'roof')
    + ')',
    flush=True,
  )
  for d, (_, flops) in low_roofs.items():  # a row computing in `d` is held to d's matmul
    roofs[d] = flops / statistics.median(roof_times[d])
    print(f'{d} matmul roof {roofs[d] / 1e9:.1f} GFLOP/s', flush=True)
  rows = []
  for case in cases:
    dtype = case.config.compute_dtype
    own = roofs.get(dtype, roof)
    rows.append(case.result(own))
    rows[-1]['compute_dtype'] = dtype
    xla = roofs.get(dtype, roofs['xla'])
    rows[-1]['roof_xla_gflop_per_s'] = xla / 1e9
    rows[-1]['xla_roof_fraction'] = rows[-1]['gflop_per_s'] * 1e9 / xla
    if 'torch' in roofs:
      rows[-1]['roof_torch_gflop_per_s'] = roofs['torch'] / 1e9
    print(
      json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}),
      flush=True,
    )
  return rows, roofs


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
  same = lambda r: (r['network'], r['dataset'], r['batch'], r.get('compute_dtype'), r['conv_impl'])
  base = {(r['rule'], *same(r)): r['step_ms'] for r in rows}
  for r in rows:
    baseline = 'global' if r['rule'] in local_losses.VARIANTS else 'bp'
    key = (baseline, *same(r))
    r['step_over_bp'] = r['step_ms'] / base.get(key, float('nan'))


COLUMNS = [
  ('config', '{}'),
  ('batch', '{}'),
  ('compute_dtype', '{}'),
  ('conv_impl', '{}'),
  ('step_ms', '{:.2f}'),
  ('step_over_bp', '{:.2f}'),
  ('samples_per_s', '{:.0f}'),
  ('mflop_per_sample', '{:.1f}'),
  ('mflop_per_sample_b32', '{:.1f}'),
  ('mflop_executed', '{:.1f}'),
  ('gflop_per_s', '{:.1f}'),
  ('roof_fraction', '{:.2f}'),
  ('xla_roof_fraction', '{:.2f}'),
  ('torch_step', '{}'),
  ('torch_samples_per_s', '{:.0f}'),
  ('torch_threads', '{}'),
  ('ours_over_torch', '{:.2f}'),
  ('compile_s', '{:.1f}'),
  ('peak_mib', '{:.0f}'),
  ('epoch_s', '{:.2f}'),
  ('epoch_over_steps', '{:.3f}'),
]


FLOP_NOTE = (
  "`mflop_per_sample` is a step's work: XLA's FLOP count of it with lax.conv convs (padding taps\n"
  'not counted), for every `conv_impl`; `gflop_per_s` and `roof_fraction` are of that work.\n'
  "`mflop_executed` is XLA's count of the row's own step: im2col also multiplies the zero taps,\n"
  "Winograd's transformed products are fewer than the work.\n"
)
TORCH_NOTE = (
  "`torch_samples_per_s`: PyTorch's twin of the row's step on the same network and batch (CPU,\n"
  'at its best thread count `torch_threads` of 1 and 2, timed in the same rounds; no on-device\n'
  'batch drawing or augmentation, which ours includes). `torch_step` says which: `ccl`, our CCL\n'
  'step written in torch (local forward net, feedback net on the K×K identity, the same pair and\n'
  'task losses, one backward, per-tree clipping and SGD), for CCL rows; `bp`, the same\n'
  "network's backprop step, for the others. `ours_over_torch`: this row's samples/s over it.\n"
)


def markdown(rows: list[dict]) -> str:
  """The table; a column no row has (torch's, without torch) is left out, and so are the compute
  dtype and conv implementation where every row has the default; a missing cell is —."""
  default = {'compute_dtype': 'float32', 'conv_impl': ''}  # shown only where some row differs
  columns = [
    (c, f)
    for c, f in COLUMNS
    if any(c in r and (c not in default or r[c] != default[c]) for r in rows)
  ]
  head = '| ' + ' | '.join(c for c, _ in columns) + ' |'
  sep = '|' + '---|' * len(columns)
  cell = lambda r, c, f: '—' if c not in r or r[c] != r[c] else f.format(r[c])  # nan: —
  body = ['| ' + ' | '.join(cell(r, c, f) for c, f in columns) + ' |' for r in rows]
  return '\n'.join([head, sep, *body])


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--configs', default='cifar10_mlp_bp,cifar10_mlp_ccl')
  p.add_argument('--batch_sizes', default='256')
  p.add_argument('--steps', type=int, default=20, help='steps per compiled call')
  p.add_argument('--repeats', type=int, default=15, help='interleaved timing rounds')
  p.add_argument('--out', default='experiments/results/bench_cpu')
  p.add_argument(
    '--epoch_steps',
    type=int,
    default=None,
    help='time the epoch figure over this many steps, scaled to the epoch (default: the whole '
    'epoch; 0 skips it)',
  )
  p.add_argument(
    '--torch',
    choices=('auto', 'off'),
    default='auto',
    help="side-by-side PyTorch baseline where torch is importable ('off': skip it)",
  )
  args = p.parse_args(argv)
  cpu_tuning.tune_allocator()  # as `python -m ccl_jax.main` runs
  if args.epoch_steps is not None and args.epoch_steps < 0:
    p.error('--epoch_steps must be >= 0')
  rows, roofs = bench(
    args.configs.split(','),
    [int(b) for b in args.batch_sizes.split(',')],
    args.steps,
    args.repeats,
    args.epoch_steps,
    args.torch == 'auto',
  )
  roof = roofs['roof']
  add_bp_ratios(rows)
  os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
  with open(args.out + '.jsonl', 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  with open(args.out + '.md', 'w') as f:
    f.write(
      f'# Training speed on {jax.devices()[0].device_kind} ({os.cpu_count()} CPUs)\n\n'
      f'fp32 matmul roof measured in the same process: {roof / 1e9:.1f} GFLOP/s ('
      + ', '.join(f'{k} {v / 1e9:.1f}' for k, v in roofs.items() if k != 'roof')
      + "; `roof_fraction` is against the faster, `xla_roof_fraction` against XLA's).\n"
      f'Command: `python {" ".join([sys.argv[0]] + (argv or sys.argv[1:]))}`\n'
      'Step times are medians of multi-step calls timed in interleaved rounds (every case and\n'
      "the roof matmul once per round); `step_over_bp` is the step time over BP's on the same\n"
      'network in this run; `epoch_over_steps` is one epoch as the loop runs it (shuffle, calls,\n'
      'a metrics pull per call; with --epoch_steps N its first N steps, and `epoch_s` scaled to\n'
      'the epoch) over steps × a step time taken just after it. For the local-loss\n'
      'rules (pred, sim, predsim) the backprop baseline is `global` on the same block net.\n'
      + FLOP_NOTE
      + TORCH_NOTE * ('torch' in roofs)
      + 'On a shared VM\n'
      'absolute times drift by about ±10% between runs: compare rows of one run only.\n\n'
    )
    f.write(markdown(rows) + '\n')
  print(markdown(rows))


if __name__ == '__main__':
  main()
