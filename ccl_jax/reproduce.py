"""One command per published table: train every cell's runs, then write `TABLE.md` and `TABLE.json`.

  python -m ccl_jax.reproduce TABLE [--seeds N] [--epochs E] [--data_dir D] [--out DIR]
                                    [--jobs J] [--grid [--grid_epochs G]] [--rows R,..]
                                    [--columns C,..] [--dry-run] [--no-train]

The tables are plain data in `ccl_jax/tables.py`. Every cell × seed (× grid point, with `--grid`)
is one run of the normal loop (`train.train_and_evaluate`) in its own workdir,
`OUT/runs/<config>[+<key>=<value>...]/seed<S>-ep<E>` (the keys: overrides that differ from the
config file): a finished run is read and not redone, an interrupted one resumes. `--jobs J` runs J
at once as `python -m ccl_jax.main` subprocesses (each pinned to one GPU when there are several;
its output in the workdir's `train.log`); with one job they run in this process. `ccl_table2`
trains nothing: it compiles each config's training step and reads XLA's FLOP count.

Selection (`--grid`): a grid point's score is the mean over its finished seeds of the validation
accuracy of the parameters the run reports (those of its lowest-validation-loss epoch, the final
record's `best_epoch`; runs without validation accuracy score by −`best_val_loss`); the highest
score wins, ties go to the earlier point, and only the chosen point's test numbers are reported.
Test accuracy never enters the choice. Without `--grid` (the default, cheap) each cell runs its
config's own values, and the table says so. `--grid_epochs G` makes the sweep two-stage, for
grids too dear to run in full: every point runs once (first seed) for G epochs, the choice is made
on those runs, and only the chosen point then runs at the full length for every seed; the table's
header names this deviation.

The table reports per cell the mean ± sample standard deviation (ddof 1) over finished seeds, the
published value beside it and the difference, the epochs run against the protocol's and the seeds
finished against those asked. Any deviation from the paper's protocol (fewer epochs or seeds, no
sweep) is named in the table's header line; a missing run shows as missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import importlib.util
import itertools
import json
import math
import os
import pathlib
import queue
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from concurrent import futures
from typing import Any

from ccl_jax import cpu_tuning
from ccl_jax import tables as tables_lib
from ccl_jax.errors import UserError
from ccl_jax.tables import Cell, Table

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / 'configs'
DEFAULT_OUT = os.path.join('experiments', 'results')
IMAGE_SHAPES = {  # dataset -> (image shape, classes), for the FLOP count without data
  'digits': ((8, 8, 1), 10),
  'mnist': ((28, 28, 1), 10),
  'fashion_mnist': ((28, 28, 1), 10),
  'cifar10': ((32, 32, 3), 10),
  'cifar100': ((32, 32, 3), 100),
  'stl10': ((96, 96, 3), 10),
}


# -- metrics of a finished run --------------------------------------------------------------------
def _num(v) -> float | None:
  return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _scaled(v, f) -> float | None:
  v = _num(v)
  return None if v is None else f(v)


def output_angle(final: dict, records: list[dict]) -> float | None:
  """The last epoch's weight angle of the output layer (the highest-numbered `weight_angle/`)."""
  if not records:
    return None
  keys = [k for k in records[-1] if k.startswith('weight_angle/')]
  if not keys:
    return None
  last = max(
    keys, key=lambda k: [int(t) if t.isdigit() else t for t in k.replace('_', ' ').split()]
  )
  return _num(records[-1][last])


METRICS = {  # name -> (label, unit, format, value of a run from its (final record, epoch records))
  'accuracy': (
    'test accuracy',
    '%',
    '.2f',
    lambda f, r: _scaled(f.get('test_accuracy'), lambda v: 100 * v),
  ),
  'error': (
    'test error',
    '%',
    '.2f',
    lambda f, r: _scaled(f.get('test_accuracy'), lambda v: 100 * (1 - v)),
  ),
  'mse': ('test MSE', '', '.4f', lambda f, r: _num(f.get('test_mse'))),
  'mflops': ('MFLOP per sample', ' MFLOP', '.2f', None),
  'output_angle': ('output-layer weight angle', '°', '.1f', output_angle),
}


def val_score(final: dict, records: list[dict]) -> float | None:
  """What selection maximises: the validation accuracy of the parameters the run reports (its
  best-by-validation-loss epoch), else −best_val_loss. Never a test number."""
  best = final.get('best_epoch')
  for r in records:
    if r.get('epoch') == best and _num(r.get('val_accuracy')) is not None:
      return float(r['val_accuracy'])
  loss = _num(final.get('best_val_loss'))
  return None if loss is None else -loss


def read_metrics(workdir: str) -> tuple[list[dict], dict | None]:
  """(per-epoch records, the last final record or None) of `workdir/metrics.jsonl`."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return [], None
  records, final = [], None
  with open(path) as f:
    for line in f:
      try:
        r = json.loads(line)
      except ValueError:
        continue
      if r.get('final'):
        final = r
      else:
        records.append(r)
  return records, final


# -- configs, grids and runs ----------------------------------------------------------------------
def config_file(name: str) -> pathlib.Path:
  return CONFIG_DIR / f'{name}.py'


def load_config(name: str):
  """`configs/<name>.py`'s get_config()."""
  spec = importlib.util.spec_from_file_location(f'ccl_jax_configs.{name}', config_file(name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _node(config, key: str):
  *path, last = key.split('.')
  node = config
  for part in path:
    if part not in node:
      raise UserError(f"no config key '{key}'")
    node = node[part]
  if last not in node:
    raise UserError(f"no config key '{key}'")
  return node, last


def get_key(config, key: str):
  node, last = _node(config, key)
  return node[last]


def set_key(config, key: str, value) -> None:
  node, last = _node(config, key)
  node[last] = value


def grid_points(grid: dict, section: str = '') -> list[dict]:
  """Every point of `grid` as {dotted key: value}: tied keys ('a,b') take one value; '{section}'
  is the rule's config section. No grid: one empty point (the config's own values)."""
  keys = list(grid)
  points = []
  for values in itertools.product(*(grid[k] for k in keys)):
    point = {}
    for key, value in zip(keys, values):
      for part in key.split(','):
        point[part.strip().replace('{section}', section)] = value
    points.append(point)
  return points or [{}]


def _rule_section(rule: str) -> str:
  from ccl_jax import config as config_lib

  _, owner, _ = config_lib.registries()
  return owner.get(('rule', rule), rule)


def _fmt_value(v) -> str:
  if isinstance(v, (tuple, list)):
    return ','.join(map(str, v))
  return str(v)


def _flag_value(v) -> str:
  """A value as `--config.key=` takes it."""
  if isinstance(v, (tuple, list)):
    return '(' + ','.join(map(str, v)) + (',' if len(v) == 1 else '') + ')'
  return str(v)


SLUG_SKIP = ('num_epochs', 'seed', 'data_dir', 'progress')  # in the name's suffix, or run control


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One training run: a config, overrides that differ from the file, a seed, a length."""

  config: str
  overrides: tuple[tuple[str, Any], ...]
  seed: int
  epochs: int
  workdir: str

  @property
  def label(self) -> str:
    extra = ' '.join(f'{k}={_fmt_value(v)}' for k, v in self.overrides if k not in SLUG_SKIP)
    return (
      f'{self.config}{" " + extra if extra else ""} seed {self.seed}, '
      f'{self.epochs} epoch{"s" * (self.epochs != 1)}'
    )

  def make_config(self, data_dir: str = ''):
    """The run's ConfigDict: the file, the overrides, seed, epochs, data_dir, no progress bar."""
    c = load_config(self.config)
    for key, value in self.overrides:
      set_key(c, key, value)
    c.seed, c.num_epochs, c.progress = self.seed, self.epochs, False
    if data_dir:
      c.data_dir = data_dir
    return c

  def command(self, data_dir: str = '') -> list[str]:
    """The same run as `python -m ccl_jax.main`."""
    args = [
      sys.executable,
      '-m',
      'ccl_jax.main',
      f'--config={config_file(self.config)}',
      f'--workdir={self.workdir}',
      f'--config.seed={self.seed}',
      f'--config.num_epochs={self.epochs}',
      '--config.progress=False',
    ]
    if data_dir:
      args.append(f'--config.data_dir={data_dir}')
    return args + [f'--config.{k}={_flag_value(v)}' for k, v in self.overrides if k != 'num_epochs']


@dataclasses.dataclass
class CellPlan:
  """A cell's runs: per grid point, one RunSpec per seed; `status` says why there are none."""

  row: str
  column: str
  cell: Cell
  status: str = ''  # '' or 'no config yet' or 'bad config: ...'
  protocol_epochs: int | None = None
  epochs: int | None = None
  points: list[dict] = dataclasses.field(default_factory=list)
  runs: list[list[RunSpec]] = dataclasses.field(default_factory=list)  # per point, per seed
  point_errors: list[str] = dataclasses.field(default_factory=list)  # per point: '' or why
  selected: bool = True  # trained by this call (--rows/--columns)
  sweep: list[RunSpec] = dataclasses.field(default_factory=list)  # --grid_epochs: per point
  sweep_epochs: int | None = None


def _slug(config: str, overrides: list[tuple[str, Any]]) -> str:
  parts = [config] + [
    f'{k.removeprefix("optimizer.")}={_fmt_value(v)}' for k, v in overrides if k not in SLUG_SKIP
  ]
  return '+'.join(parts).replace('/', '_').replace(' ', '')


def plan_cell(
  row: str,
  column: str,
  cell: Cell,
  out: str,
  seeds: int,
  epochs: int | None,
  use_grid: bool,
  grid_epochs: int | None = None,
) -> CellPlan:
  """The runs of one cell (no files touched); with `grid_epochs`, also a one-seed sweep run of
  that length per grid point."""
  plan = CellPlan(row, column, cell)
  if not config_file(cell.config).exists():
    plan.status = 'no config yet'
    return plan
  try:
    base = load_config(cell.config)
    for key, value in cell.overrides.items():
      set_key(base, key, value)
    plan.protocol_epochs = int(base.num_epochs)
    plan.epochs = int(epochs or base.num_epochs)
    section = _rule_section(base.rule)
  except Exception as e:  # a config file that fails to run, or an override it lacks
    plan.status = f'bad config: {" ".join(str(e).split())[:200]}'
    return plan
  file_values = load_config(cell.config)
  plan.points = grid_points(cell.grid if use_grid else {}, section)
  for point in plan.points:
    merged = {**cell.overrides, **point}
    error, overrides = '', []
    for key, value in merged.items():
      try:
        if get_key(file_values, key) != value:
          overrides.append((key, value))
      except UserError as e:
        error = f'{e} in configs/{cell.config}.py'
    slug = _slug(cell.config, overrides)
    if not error:  # a value the config's validation refuses (e.g. a grid value out of range)
      error = _invalid(RunSpec(cell.config, tuple(overrides), int(base.seed), plan.epochs, ''))
    plan.point_errors.append(error)

    def run(seed: int, n: int, overrides=tuple(overrides), slug=slug) -> RunSpec:
      return RunSpec(
        cell.config, overrides, seed, n, os.path.join(out, 'runs', slug, f'seed{seed}-ep{n}')
      )

    plan.runs.append([run(int(base.seed) + i, plan.epochs) for i in range(seeds)])
    if grid_epochs and len(plan.points) > 1:
      plan.sweep.append(run(int(base.seed), grid_epochs))
  plan.sweep_epochs = grid_epochs if plan.sweep else None
  return plan


def plan_table(
  table: Table,
  out: str,
  seeds: int,
  epochs: int | None = None,
  use_grid: bool = False,
  rows: tuple[str, ...] = (),
  columns: tuple[str, ...] = (),
  grid_epochs: int | None = None,
) -> list[CellPlan]:
  """Every cell's runs, in table order; cells outside `rows`/`columns` are read, not trained."""
  pick = lambda name, wanted: not wanted or name.lower() in {w.lower() for w in wanted}
  plans = []
  for row in table.rows:
    for column in table.columns:
      cell = table.cells.get((row, column))
      if cell is None:
        continue
      plan = plan_cell(row, column, cell, out, seeds, epochs, use_grid, grid_epochs)
      plan.selected = pick(row, rows) and pick(column, columns)
      plans.append(plan)
  return plans


def _invalid(spec: RunSpec) -> str:
  """'' if `spec`'s config validates, else the one-line reason."""
  from ccl_jax import config as config_lib

  try:
    config_lib.finalize(spec.make_config())
    return ''
  except Exception as e:
    return ' '.join(str(e).split())[:200]


# -- the state of a run ---------------------------------------------------------------------------
@dataclasses.dataclass
class RunState:
  state: str  # 'done' | 'partial' | 'not started' | 'stale' | 'bad config'
  detail: str = ''
  records: list[dict] = dataclasses.field(default_factory=list)
  final: dict | None = None


def run_state(spec: RunSpec, check_config: bool = True) -> RunState:
  """done (a final record of `spec.epochs` epochs), partial at epoch k, not started, or stale (the
  workdir holds a run of another config: it is neither trained nor reported)."""
  records, final = read_metrics(spec.workdir)
  if check_config and os.path.exists(os.path.join(spec.workdir, 'config.json')):
    stale = _changed(spec)
    if stale:
      return RunState('stale', f'made by another config ({", ".join(stale[:4])})', records)
  if final is not None and final.get('epoch') == spec.epochs:
    return RunState('done', '', records, final)
  if records or os.path.isdir(os.path.join(spec.workdir, 'checkpoints')):
    k = records[-1].get('epoch', 0) if records else 0
    return RunState('partial', f'partial at epoch {k}', records)
  return RunState('not started')


def _changed(spec: RunSpec) -> list[str]:
  from ccl_jax import checkpoint
  from ccl_jax import config as config_lib

  try:
    with open(os.path.join(spec.workdir, 'config.json')) as f:
      saved = json.load(f)
    now = checkpoint.config_to_json(config_lib.finalize(spec.make_config()))
    return config_lib.changed_keys(saved, now)
  except (OSError, ValueError, UserError) as e:
    return [f'unreadable: {e}']


# -- training -------------------------------------------------------------------------------------
def train_here(spec: RunSpec, data_dir: str) -> str:
  """Trains (or resumes) `spec` in this process; '' or the one-line reason it failed."""
  import jax

  from ccl_jax import train
  from ccl_jax import workdir as workdir_lib

  try:
    config = spec.make_config(data_dir)
    workdir_lib.prepare(spec.workdir)
    with workdir_lib.Lock(spec.workdir):
      train.train_and_evaluate(config, spec.workdir)
    return ''
  except UserError as e:
    return str(e)
  except Exception as e:  # a bug in one run must not stop the others; its traceback is printed
    traceback.print_exc()
    return f'{type(e).__name__}: {" ".join(str(e).split())[:300]}'
  finally:
    jax.clear_caches()
    gc.collect()


def accelerator_envs(jobs: int) -> list[dict[str, str]]:
  """Per job slot, the environment that pins it to one GPU when this machine has several (jobs
  beyond the GPU count share them, without preallocating memory); {} on CPU/TPU/one device."""
  probe = subprocess.run(
    [sys.executable, '-c', 'import jax; d = jax.local_devices(); print(d[0].platform, len(d))'],
    capture_output=True,
    text=True,
    env={**os.environ, 'XLA_PYTHON_CLIENT_PREALLOCATE': 'false'},
  )
  try:
    platform, n = probe.stdout.split()[-2], int(probe.stdout.split()[-1])
  except (IndexError, ValueError):
    platform, n = 'cpu', 1
  if platform not in ('gpu', 'cuda', 'rocm'):
    return [{} for _ in range(jobs)]
  visible = os.environ.get('CUDA_VISIBLE_DEVICES', '')
  ids = [v for v in visible.split(',') if v] or [str(i) for i in range(n)]
  shared = jobs > len(ids)
  return [
    {'CUDA_VISIBLE_DEVICES': ids[i % len(ids)]}
    | ({'XLA_PYTHON_CLIENT_PREALLOCATE': 'false'} if shared or len(ids) == 1 else {})
    for i in range(jobs)
  ]


def train_subprocess(spec: RunSpec, data_dir: str, env: dict[str, str]) -> str:
  """Runs `spec` as `python -m ccl_jax.main`, its output appended to `workdir/train.log`."""
  os.makedirs(spec.workdir, exist_ok=True)
  log = os.path.join(spec.workdir, 'train.log')
  with open(log, 'a') as f:
    f.write(f'$ {" ".join(spec.command(data_dir))}\n')
    f.flush()
    rc = subprocess.run(
      spec.command(data_dir), stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **env}
    ).returncode
  if rc == 0:
    return ''
  with open(log) as f:
    tail = [line.strip() for line in f if line.strip()]
  return f'exit {rc}: {tail[-1] if tail else "no output"} (log: {log})'


def train_runs(specs: list[RunSpec], jobs: int, data_dir: str) -> list[tuple[RunSpec, str]]:
  """Trains `specs` (J at once); returns (spec, error) of the failed ones."""
  failed = []
  n = len(specs)
  if jobs <= 1:
    for i, spec in enumerate(specs, 1):
      print(f'[{i}/{n}] training {spec.label} in {spec.workdir}', flush=True)
      error = train_here(spec, data_dir)
      if error:
        print(f'[{i}/{n}] failed: {spec.label}: {error}', flush=True)
        failed.append((spec, error))
    return failed
  slots: queue.Queue = queue.Queue()
  for env in accelerator_envs(jobs):
    slots.put(env)

  def one(i: int, spec: RunSpec) -> str:
    env = slots.get()
    try:
      where = f' on GPU {env["CUDA_VISIBLE_DEVICES"]}' if 'CUDA_VISIBLE_DEVICES' in env else ''
      # One write per line (newline included): the job threads print at the same time.
      print(
        f'[{i}/{n}] started {spec.label}{where} (log: {spec.workdir}/train.log)\n',
        end='',
        flush=True,
      )
      t0 = time.time()
      error = train_subprocess(spec, data_dir, env)
      what = f'failed: {error}' if error else f'finished in {time.time() - t0:.0f}s'
      print(f'[{i}/{n}] {what}: {spec.label}\n', end='', flush=True)
      return error
    finally:
      slots.put(env)

  with futures.ThreadPoolExecutor(jobs) as pool:
    done = [pool.submit(one, i, spec) for i, spec in enumerate(specs, 1)]
    for spec, fut in zip(specs, done):
      if fut.result():
        failed.append((spec, fut.result()))
  return failed


# -- FLOPs (ccl_table2) ---------------------------------------------------------------------------
def matmul_flops(jaxpr) -> float:
  """2 × the multiply-adds of every matmul and convolution in `jaxpr` (a Jaxpr or ClosedJaxpr),
  loop bodies × their trip count, the costlier branch of a cond: the paper's counting (its BP
  entries are exactly 2 FLOPs per MAC, SPEC §4.7). Elementwise work is left out."""
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name, params = eqn.primitive.name, eqn.params
    if name == 'dot_general':
      (contract, _), _ = params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
    elif name == 'conv_general_dilated':
      rhs, spec = eqn.invars[1].aval.shape, params['dimension_numbers'].rhs_spec
      per_output = rhs[spec[1]] * math.prod(rhs[d] for d in spec[2:])  # in/groups × kernel
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_output
    elif name == 'scan':
      total += params['length'] * matmul_flops(params['jaxpr'])
    elif name == 'cond':
      total += max(matmul_flops(b) for b in params['branches'])
    else:  # pjit, custom_vjp/jvp, remat, while (its body once: trip count unknown), ...
      for v in params.values():
        for sub in v if isinstance(v, (tuple, list)) else (v,):
          if hasattr(sub, 'eqns') or hasattr(getattr(sub, 'jaxpr', None), 'eqns'):
            total += matmul_flops(sub)
  return total


def step_mflops(config, xla: bool = True) -> dict[str, float]:
  """One training step at `config.batch_size`, in MFLOP per sample: `matmul` (`matmul_flops` of
  its jaxpr) and `xla` (XLA's cost analysis of the compiled step, elementwise work included; it
  counts a loop's body once)."""
  import jax
  import jax.numpy as jnp

  from ccl_jax import config as config_lib
  from ccl_jax import step, train
  from ccl_jax.rules.base import Task

  c = config_lib.finalize(config)
  shape, k = IMAGE_SHAPES[c.dataset]
  n = c.batch_size
  learner = step.build(c, Task(k, shape, 1000))
  images = jnp.zeros((n, *shape), jnp.float32)
  labels = jnp.arange(n, dtype=jnp.int32) % k
  state = learner.init(jax.random.PRNGKey(0), {'image': images, 'label': labels})
  idx = jnp.arange(n, dtype=jnp.int32)[None]
  chunk = train.make_chunk(learner.update)
  matmul = matmul_flops(jax.make_jaxpr(chunk)(state, images, labels, idx))
  if not xla:
    return {'matmul': matmul / n / 1e6}
  cost = jax.jit(chunk).lower(state, images, labels, idx).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {'matmul': matmul / n / 1e6, 'xla': float(cost.get('flops', float('nan'))) / n / 1e6}


# -- aggregation ----------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
  if not values:
    return None, None
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _of_run(st: RunState, fn) -> Any:
  return fn(st.final, st.records) if st.final else None


def choose(plan: CellPlan) -> tuple[int, list[dict], bool]:
  """(the chosen point's index, per point its score and finished selection runs, whether every
  point has finished them). A point's score is the mean `val_score` of its finished selection
  runs: its sweep run with `--grid_epochs`, else its seeds. The highest wins, ties go to the
  earlier point; with no score yet, point 0."""
  select_from = [[s] for s in plan.sweep] if plan.sweep else plan.runs
  points = []
  for point, specs, error in zip(plan.points, select_from, plan.point_errors):
    states = [run_state(s) for s in specs] if not error else []
    done = [st for st in states if st.state == 'done']
    scores = [v for v in (val_score(st.final, st.records) for st in done) if v is not None]
    points.append(
      {
        'point': point,
        'score': statistics.fmean(scores) if scores else None,
        'seeds_done': len(done),
        'error': error,
        'complete': bool(error) or len(done) == len(specs),
      }
    )
  scored = [i for i, p in enumerate(points) if p['score'] is not None]
  chosen = max(scored, key=lambda i: (points[i]['score'], -i)) if scored else 0
  return chosen, points, all(p['complete'] for p in points)


def summarize_cell(plan: CellPlan, metric: str, also: tuple[str, ...] = ()) -> dict:
  """One cell of TABLE.json: the chosen point's mean ± std over its finished seeds, beside the
  published value; every grid point's validation score."""
  cell = plan.cell
  out = {
    'row': plan.row,
    'column': plan.column,
    'config': cell.config,
    'overrides': cell.overrides,
    'published': cell.published,
    'published_pm': cell.pm,
    'source': cell.source,
    'note': cell.note,
    'epochs_protocol': plan.protocol_epochs,
    'epochs': plan.epochs,
    'seeds_asked': len(plan.runs[0]) if plan.runs else 0,
    'status': plan.status,
  }
  if plan.status:
    return out | {'mean': None, 'std': None, 'diff': None, 'seeds_done': 0}
  chosen, points, _ = choose(plan)
  error = plan.point_errors[chosen]
  runs = []
  for s in plan.runs[chosen]:
    st = run_state(s) if not error else RunState('bad config', error)
    value = functools.partial(_of_run, st)
    runs.append(
      {
        'seed': s.seed,
        'workdir': s.workdir,
        'state': st.state,
        'detail': st.detail,
        'epochs_run': st.final.get('epoch') if st.final else None,
        'value': value(METRICS[metric][3]),
        'val_score': value(val_score),
        **{name: value(METRICS[name][3]) for name in also},
      }
    )
  best = points[chosen] | {'runs': runs}
  finished = [r for r in best['runs'] if r['state'] == 'done']
  values = [r['value'] for r in finished if r['value'] is not None]
  mean, std = _mean_std(values)
  status = 'ok' if len(finished) == out['seeds_asked'] else ('partial' if finished else 'missing')
  out |= {
    'status': status,
    'mean': mean,
    'std': std,
    'diff': None if mean is None or cell.published is None else mean - cell.published,
    'values': values,
    'seeds_done': len(finished),
    'epochs_run': sorted({r['epochs_run'] for r in finished}),
    'grid': {
      'declared': bool(cell.grid),
      'swept': len(points) > 1,
      'sweep_epochs': plan.sweep_epochs,  # None: the points ran at full length, every seed
      'chosen': best['point'],
      'chosen_score': best['score'],
      'points': [{k: p[k] for k in ('point', 'score', 'seeds_done', 'error')} for p in points],
    },
    'runs': best['runs'],
    'states': [r['detail'] or r['state'] for r in best['runs']],
  }
  for name in also:
    m, s = _mean_std([r[name] for r in finished if r.get(name) is not None])
    pub = cell.also.get(name)
    out[name] = {
      'mean': m,
      'std': s,
      'published': pub,
      'diff': None if m is None or pub is None else m - pub,
    }
  return out


def protocol(table: Table, cells: list[dict], seeds: int, use_grid: bool) -> dict:
  """How this table's runs differ from the paper's protocol, and the one-line label saying so."""
  pairs = sorted(
    {(c['epochs'], c['epochs_protocol']) for c in cells if c.get('epochs') is not None},
    key=lambda p: (p[1], p[0]),
  )
  deviations = []
  changed = [f'{e} of {p}' for e, p in pairs if e != p]
  if changed:
    deviations.append(' / '.join(changed) + ' epochs')
  if table.seeds is None:
    seed_text = f'{seeds} seed{"s" * (seeds != 1)} (the paper does not state its count)'
  elif seeds < table.seeds:
    seed_text = f'{seeds} of {table.seeds} seeds'
    deviations.append(seed_text)
  else:
    seed_text = f'{seeds} seed{"s" * (seeds != 1)}'
  declared = any(c.get('grid', {}).get('declared') for c in cells) or any(
    cell.grid for cell in table.cells.values()
  )
  if declared and not use_grid:
    deviations.append(
      "no hyperparameter sweep: each config's own values (the paper chose them on validation "
      'from grids; `--grid` runs them)'
    )
  sweeps = sorted({(c.get('grid') or {}).get('sweep_epochs') or 0 for c in cells} - {0})
  if use_grid and sweeps:
    deviations.append(
      f'grids swept at {"/".join(map(str, sweeps))} epochs with one seed, then only the point '
      'chosen on validation trained at full length'
    )
  shortened = any(e < p for e, p in pairs) or (table.seeds is not None and seeds < table.seeds)
  epochs_text = ' / '.join(sorted({f'{e}' for e, _ in pairs}, key=int)) or '?'
  if deviations:
    label = (
      f"**{'Shortened' if shortened else 'Changed'} protocol, not the paper's**: "
      + '; '.join(deviations)
      + (f'; {seed_text}' if table.seeds is None else '')
      + '.'
    )
  else:
    label = (
      f'**Full protocol**: {epochs_text} epoch{"s" * (epochs_text != "1")}, {seed_text}'
      + ('; grids swept, chosen on validation' if declared else '')
      + '.'
    )
  return {
    'epochs': [list(p) for p in pairs],
    'seeds': seeds,
    'paper_seeds': table.seeds,
    'grid_declared': declared,
    'grid_swept': use_grid,
    'shortened': shortened,
    'deviations': deviations,
    'label': label,
  }


def summarize(
  table: Table, plans: list[CellPlan], seeds: int, use_grid: bool, command: str = ''
) -> dict:
  """TABLE.json's content, from the runs' metrics files only."""
  cells = [summarize_cell(p, table.metric, table.also) for p in plans]
  label, unit, _, _ = METRICS[table.metric]
  return {
    'table': table.name,
    'title': table.title,
    'metric': table.metric,
    'metric_label': label,
    'unit': unit,
    'also': list(table.also),
    'command': command,
    'written': time.strftime('%Y-%m-%d %H:%M:%S'),
    'protocol': protocol(table, cells, seeds, use_grid),
    'notes': list(table.notes),
    'rows': list(table.rows),
    'columns': list(table.columns),
    'cells': cells,
  }


def summarize_flops(table: Table, command: str = '') -> dict:
  """ccl_table2: each existing config's MFLOP per sample at batch 32, × BP, beside the paper's."""
  import jax

  cells = []
  for row in table.rows:
    for column in table.columns:
      cell = table.cells.get((row, column))
      if cell is None:
        continue
      plan = plan_cell(row, column, cell, '', 1, None, False)
      value, xla, status = None, None, plan.status
      if not status:
        try:
          counts = step_mflops(
            RunSpec(cell.config, tuple(cell.overrides.items()), 0, 1, '').make_config()
          )
          value, xla, status = counts['matmul'], counts['xla'], 'ok'
        except Exception as e:
          status = f'bad config: {" ".join(str(e).split())[:200]}'
      print(
        f'{row} / {column}: '
        + (status if value is None else f'{value:.2f} MFLOP per sample (XLA: {xla:.2f})'),
        flush=True,
      )
      cells.append(
        {
          'row': row,
          'column': column,
          'config': cell.config,
          'overrides': cell.overrides,
          'status': status,
          'mean': value,
          'std': None,
          'xla': xla,
          'published': cell.published,
          'published_pm': None,
          'diff': None if value is None or cell.published is None else value - cell.published,
          'source': cell.source,
          'note': cell.note,
        }
      )
  for c in cells:  # × BP on the same network, ours and the paper's
    bp = next((b for b in cells if b['row'] == 'BP' and b['column'] == c['column']), None)
    c['x_bp'] = c['mean'] / bp['mean'] if bp and bp['mean'] and c['mean'] is not None else None
    c['x_bp_published'] = (
      c['published'] / bp['published'] if bp and bp['published'] and c['published'] else None
    )
  return {
    'table': table.name,
    'title': table.title,
    'metric': table.metric,
    'metric_label': METRICS['mflops'][0],
    'unit': METRICS['mflops'][1],
    'also': [],
    'command': command,
    'written': time.strftime('%Y-%m-%d %H:%M:%S'),
    'backend': jax.default_backend(),
    'protocol': {'label': f'No training: XLA cost analysis on `{jax.default_backend()}`.'},
    'notes': list(table.notes),
    'rows': list(table.rows),
    'columns': list(table.columns),
    'cells': cells,
  }


# -- writing the table ----------------------------------------------------------------------------
def _f(v, fmt: str, unit: str = '') -> str:
  return '–' if v is None else f'{v:{fmt}}{unit}'


def _ours(c: dict, fmt: str) -> str:
  if c['mean'] is None:
    return '–'
  return _f(c['mean'], fmt) + (f' ± {_f(c["std"], fmt)}' if c.get('std') is not None else '')


def _paper(c: dict, fmt: str) -> str:
  if c['published'] is None:
    return '–'
  pm = c.get('published_pm')
  return _f(c['published'], fmt) + (f' ± {_f(pm, fmt)}' if pm is not None else '')


def _missing(c: dict) -> str:
  if c['status'] in ('no config yet',) or c['status'].startswith('bad config'):
    return c['status'].split(':')[0]
  states = sorted(set(c.get('states', [])))
  return 'missing (' + ', '.join(states) + ')' if states else 'missing'


def _matrix_cell(c: dict, fmt: str, also: list[str]) -> str:
  if c['mean'] is None:
    return _missing(c) + (f' · paper {_paper(c, fmt)}' if c['published'] is not None else '')
  text = _ours(c, fmt)
  if c['published'] is not None:
    text += f' (paper {_paper(c, fmt)}, Δ {c["diff"]:+{fmt}})'
  if c['status'] == 'partial':
    text += f' [{c["seeds_done"]} of {c["seeds_asked"]} seeds]'
  for name in also:
    a, (_, unit, afmt, _) = c.get(name) or {}, METRICS[name]
    if a.get('mean') is not None or a.get('published') is not None:
      text += f' · {_f(a.get("mean"), afmt, unit)} (paper {_f(a.get("published"), afmt, unit)})'
  return text


def _point_text(c: dict) -> str:
  grid = c.get('grid') or {}
  if not grid.get('swept'):
    return "config's own" + (' (grid not run)' if grid.get('declared') else '')
  point = ', '.join(
    f'{k.removeprefix("optimizer.")}={_fmt_value(v)}' for k, v in grid['chosen'].items()
  )
  tried = sum(1 for p in grid['points'] if p['seeds_done'])
  if grid['chosen_score'] is None:
    return f'none chosen yet (0 of {len(grid["points"])} points run)'
  at = f' at {grid["sweep_epochs"]} epochs' if grid.get('sweep_epochs') else ''
  return (
    f'{point} (val. {_f(grid["chosen_score"], ".4f")}{at}; '
    f'{tried} of {len(grid["points"])} points run)'
  )


def markdown(summary: dict) -> str:
  """TABLE.md: header with the protocol label, the rows × columns matrix, then every cell."""
  fmt = METRICS[summary['metric']][2]
  unit = summary['unit'].strip()
  also = summary.get('also', [])
  lines = [f'# {summary["table"]}: {summary["title"]}', '']
  if summary.get('command'):
    lines += [f'`{summary["command"]}` · written {summary["written"]}', '']
  lines += [summary['protocol']['label'], '']
  lines += [f'- {n}' for n in summary.get('notes', [])]
  lines += [
    f'- Cells: ours (mean ± std over finished seeds, {summary["metric_label"]}'
    + (f', {unit}' if unit else '')
    + ') and the published value with ours − published.',
    '',
  ]
  cells = {(c['row'], c['column']): c for c in summary['cells']}
  lines += ['| | ' + ' | '.join(summary['columns']) + ' |']
  lines += ['|---' * (len(summary['columns']) + 1) + '|']
  for row in summary['rows']:
    texts = [
      _matrix_cell(cells[row, col], fmt, also) if (row, col) in cells else '–'
      for col in summary['columns']
    ]
    lines.append(f'| {row} | ' + ' | '.join(texts) + ' |')
  lines += ['', '## Cells', '']
  if summary['metric'] == 'mflops':
    lines += [
      '| row | column | ours | × BP | paper | × BP (paper) | Δ | XLA count | config | source |'
    ]
    lines += ['|---' * 10 + '|']
    for c in summary['cells']:
      ours = _f(c['mean'], fmt) if c['mean'] is not None else _missing(c)
      lines.append(
        f'| {c["row"]} | {c["column"]} | {ours} | {_f(c.get("x_bp"), ".2f")} | '
        f'{_f(c["published"], fmt)} | {_f(c.get("x_bp_published"), ".2f")} | '
        f'{_f(c["diff"], "+" + fmt)} | {_f(c.get("xla"), fmt)} | `{c["config"]}` | {c["source"]} |'
      )
    return '\n'.join(lines) + '\n'
  head = ['row', 'column', 'ours', 'paper', 'Δ']
  for name in also:
    head += [f'{METRICS[name][0]} ours', 'paper']
  head += ['epochs run / protocol', 'seeds done / asked', 'hyperparameters', 'config', 'source']
  lines += ['| ' + ' | '.join(head) + ' |', '|---' * len(head) + '|']
  for c in summary['cells']:
    ours = _ours(c, fmt) if c['mean'] is not None else _missing(c)
    cols = [c['row'], c['column'], ours, _paper(c, fmt), _f(c['diff'], '+' + fmt)]
    for name in also:
      a, (_, u, afmt, _) = c.get(name) or {}, METRICS[name]
      cols += [_f(a.get('mean'), afmt, u), _f(a.get('published'), afmt, u)]
    run = '/'.join(map(str, c.get('epochs_run') or [])) or '–'
    config = f'`{c["config"]}`' + ''.join(
      f' {k}={_fmt_value(v)}' for k, v in c['overrides'].items() if k != 'num_epochs'
    )
    source = c['source'] + (f'; {c["note"]}' if c.get('note') else '')
    cols += [
      f'{run} / {_f(c["epochs_protocol"], "d")}',
      f'{c["seeds_done"]} / {c["seeds_asked"]}',
      _point_text(c) if c.get('grid') else '–',
      config,
      source,
    ]
    lines.append('| ' + ' | '.join(str(x) for x in cols) + ' |')
  return '\n'.join(lines) + '\n'


def write_outputs(summary: dict, out: str) -> tuple[str, str]:
  os.makedirs(out, exist_ok=True)
  md, js = (os.path.join(out, f'{summary["table"]}.{ext}') for ext in ('md', 'json'))
  with open(js, 'w') as f:
    json.dump(summary, f, indent=1, default=str)
  with open(md, 'w') as f:
    f.write(markdown(summary))
  return md, js


# -- the command ----------------------------------------------------------------------------------
def run_groups(plan: CellPlan) -> list[tuple[dict, list[RunSpec], str]]:
  """What `plan` trains now, as (point, runs, config error) groups: every point's seeds; with a
  sweep (`--grid_epochs`), each point's sweep run, then the chosen point's seeds once every sweep
  run has finished."""
  if not plan.sweep:
    return list(zip(plan.points, plan.runs, plan.point_errors))
  groups = [(p, [s], e) for p, s, e in zip(plan.points, plan.sweep, plan.point_errors)]
  chosen, _, complete = choose(plan)
  if complete:
    groups.append((plan.points[chosen], plan.runs[chosen], plan.point_errors[chosen]))
  return groups


def dry_run(plans: list[CellPlan]) -> int:
  """Prints every run and its state; returns how many would be trained."""
  todo = 0
  counts: dict[str, int] = {}
  for plan in plans:
    head = f'{plan.row} / {plan.column}: configs/{plan.cell.config}.py'
    head += ''.join(f' {k}={_fmt_value(v)}' for k, v in plan.cell.overrides.items())
    if plan.status:
      print(f'{head}: {plan.status}')
      continue
    print(head + ('' if plan.selected else ' (not selected: read only)'))
    groups = run_groups(plan)
    for i, (point, specs, error) in enumerate(groups):
      if point:
        what = 'chosen point' if plan.sweep and i == len(plan.sweep) else 'point'
        print(f'  {what} {", ".join(f"{k}={_fmt_value(v)}" for k, v in point.items())}')
      for spec in specs:
        st = RunState('bad config', error) if error else run_state(spec)
        text = st.detail or st.state
        if st.state == 'done':
          text += f' (test {_f(METRICS["accuracy"][3](st.final, st.records), ".2f")} %)'
        counts[st.state] = counts.get(st.state, 0) + 1
        todo += plan.selected and st.state in ('partial', 'not started')
        print(f'    seed {spec.seed}, {spec.epochs} epochs: {text}  [{spec.workdir}]')
    if plan.sweep and len(groups) == len(plan.sweep):
      print(
        f'  then the point chosen on validation: {len(plan.runs[0])} seeds × {plan.epochs} '
        'epochs, once every sweep run has finished'
      )
  print(
    f'{sum(counts.values())} runs: '
    + ', '.join(f'{n} {s}' for s, n in sorted(counts.items()))
    + f'; {todo} would be trained'
  )
  return todo


def collect(plans: list[CellPlan]) -> tuple[list[RunSpec], int, list[tuple[RunSpec, RunState]]]:
  """(the runs to train now, how many are done, those skipped with their state)."""
  todo, done, skipped = [], 0, []
  for plan in plans:
    if plan.status or not plan.selected:
      continue
    for _, specs, error in run_groups(plan):
      for spec in specs:
        st = RunState('bad config', error) if error else run_state(spec)
        if st.state == 'done':
          done += 1
        elif st.state in ('partial', 'not started'):
          todo.append(spec)
        else:
          skipped.append((spec, st))
  return todo, done, skipped


def _labels(text: str) -> tuple[str, ...]:
  return tuple(x.strip() for x in text.split(',') if x.strip())


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog='python -m ccl_jax.reproduce',
    description='Train every run of a published table (resuming, never redoing) and write '
    'OUT/TABLE.md and OUT/TABLE.json.',
  )
  p.add_argument('table', help='one of: ' + ', '.join(tables_lib.TABLES))
  p.add_argument('--seeds', type=int, default=None, help="seeds per cell (default: the paper's)")
  p.add_argument('--epochs', type=int, default=None, help="epochs per run (default: the config's)")
  p.add_argument('--data_dir', default='', help='tfds data_dir of the prepared datasets')
  p.add_argument('--out', default=DEFAULT_OUT, help='tables here, runs under OUT/runs/')
  p.add_argument('--jobs', type=int, default=1, help='runs at once (subprocesses when > 1)')
  p.add_argument('--grid', action='store_true', help="sweep the paper's grids, choose on val.")
  p.add_argument(
    '--grid_epochs',
    '--grid-epochs',
    type=int,
    default=None,
    help='with --grid: sweep each point for this many epochs (one seed), then train only the '
    'chosen point at full length',
  )
  p.add_argument('--rows', default='', help='train only these rows (comma-separated labels)')
  p.add_argument('--columns', default='', help='train only these columns')
  p.add_argument('--dry-run', '--dry_run', action='store_true', help='list runs, train nothing')
  p.add_argument(
    '--no-train', '--no_train', action='store_true', help='write the tables from finished runs only'
  )
  args = p.parse_args(argv)
  if args.table not in tables_lib.TABLES:
    sys.exit(f"error: unknown table '{args.table}'; choose one of {', '.join(tables_lib.TABLES)}")
  table = tables_lib.TABLES[args.table]
  for flag, given, known in (
    ('rows', args.rows, table.rows),
    ('columns', args.columns, table.columns),
  ):
    unknown = [x for x in _labels(given) if x.lower() not in {k.lower() for k in known}]
    if unknown:
      sys.exit(
        f'error: --{flag}: {", ".join(map(repr, unknown))} not in {args.table}; choose from '
        + ', '.join(known)
      )
  if args.grid_epochs is not None and not args.grid:
    sys.exit('error: --grid_epochs needs --grid')
  for name in ('seeds', 'epochs', 'jobs', 'grid_epochs'):
    if getattr(args, name) is not None and getattr(args, name) < 1:
      sys.exit(f'error: --{name} must be >= 1')
  return args


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  cpu_tuning.tune_allocator()  # runs trained in this process (--jobs 1) train as main's do
  from absl import logging

  logging.set_verbosity(logging.ERROR)  # JAX's backend probing and orbax's chatter
  table = tables_lib.TABLES[args.table]
  command = 'python -m ccl_jax.reproduce ' + shlex.join(argv)
  if not table.train:
    if args.dry_run:
      for (row, column), cell in table.cells.items():
        exists = config_file(cell.config).exists()
        print(f'{row} / {column}: configs/{cell.config}.py {"" if exists else "(no config yet)"}')
      print('no training: the FLOP count compiles each existing config once')
      return 0
    summary = summarize_flops(table, command)
    md, js = write_outputs(summary, args.out)
    print(f'wrote {md} and {js}')
    return 0
  seeds = args.seeds or table.seeds or 1
  plans = plan_table(
    table,
    args.out,
    seeds,
    args.epochs,
    args.grid,
    _labels(args.rows),
    _labels(args.columns),
    args.grid_epochs,
  )
  if args.dry_run:
    dry_run(plans)
    return 0
  todo, done, skipped = collect(plans)
  for spec, st in skipped:
    print(f'skipped {spec.label}: {st.state}: {st.detail} ({spec.workdir})')
  if args.no_train:
    todo = []
  print(f'{len(todo)} runs to train, {done} already done', flush=True)
  failed, tried = [], set()
  while todo:  # with --grid_epochs, a second round trains the points the sweeps chose
    failed += train_runs(todo, args.jobs, args.data_dir)
    tried |= {spec.workdir for spec in todo}
    todo = [spec for spec in collect(plans)[0] if spec.workdir not in tried]
    if todo:
      print(f'{len(todo)} runs at the points chosen on validation', flush=True)
  summary = summarize(table, plans, seeds, args.grid, command)
  md, js = write_outputs(summary, args.out)
  print(
    f'trained {len(tried) - len(failed)} runs ({done} already done, {len(failed)} failed, '
    f'{len(skipped)} skipped); wrote {md} and {js}'
  )
  print(summary['protocol']['label'].replace('**', ''))
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
