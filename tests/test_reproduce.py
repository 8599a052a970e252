"""`ccl_jax.reproduce`: aggregation and selection on hand-written metrics files, the smoke table end
to end (a second call trains nothing), TensorBoard event files, and the multi-run report."""

import glob
import hashlib
import json
import os
import struct
import warnings

import jax
import jax.numpy as jnp
import pytest

from ccl_jax import report, reproduce, train
from ccl_jax.tables import Cell, Table

# One parallel test worker for the whole file: its tests share a module fixture.
pytestmark = pytest.mark.xdist_group('reproduce')


def write_run(
  spec: reproduce.RunSpec, val: list[float], test: float, best_epoch: int | None = None
):
  """A finished run's metrics.jsonl: per-epoch val/test accuracy, then the final record."""
  os.makedirs(spec.workdir, exist_ok=True)
  best_epoch = best_epoch or len(val)
  with open(os.path.join(spec.workdir, 'metrics.jsonl'), 'w') as f:
    for e, v in enumerate(val, 1):
      rec = {
        'step': 10 * e,
        'epoch': e,
        'val_accuracy': v,
        'test_accuracy': test,
        'val_loss': 1 - v,
      }
      f.write(json.dumps(rec) + '\n')
    if len(val) == spec.epochs:
      final = {'step': 10 * len(val), 'epoch': len(val), 'final': True, 'test_accuracy': test}
      final |= {'best_epoch': best_epoch, 'best_val_loss': 1 - val[best_epoch - 1]}
      f.write(json.dumps(final) + '\n')


def test_aggregation_means_stds_missing_cells_and_shortened_label(tmp_path):
  table = Table(
    'hand',
    'hand-written',
    ('A', 'B'),
    ('x', 'y'),
    {
      ('A', 'x'): Cell('default', {'rule': 'bp'}, 90.0, 1.0, 'made up'),
      ('A', 'y'): Cell('no_such_config', {}, 50.0),
      ('B', 'x'): Cell('default', {}, 95.0),
      ('B', 'y'): Cell('default', {'rule': 'fa'}, 70.0),
    },
    'accuracy',
    seeds=5,
  )
  plans = reproduce.plan_table(table, str(tmp_path), seeds=2, epochs=2)
  by_cell = {(p.row, p.column): p for p in plans}
  a, partial = by_cell['A', 'x'].runs[0], by_cell['B', 'y'].runs[0]
  write_run(a[0], [0.7, 0.8], 0.80)
  write_run(a[1], [0.7, 0.8], 0.84)
  write_run(partial[0], [0.6, 0.7], 0.75)
  write_run(partial[1], [0.6], 0.70)  # interrupted after epoch 1
  summary = reproduce.summarize(table, plans, seeds=2, use_grid=False)
  cells = {(c['row'], c['column']): c for c in summary['cells']}
  ax = cells['A', 'x']
  assert ax['status'] == 'ok' and ax['seeds_done'] == 2 and ax['epochs_run'] == [2]
  assert ax['mean'] == pytest.approx(82.0)
  assert ax['std'] == pytest.approx(2.0 * 2**0.5)  # sample std of 80 and 84
  assert ax['diff'] == pytest.approx(-8.0)
  assert cells['A', 'y']['status'] == 'no config yet' and cells['A', 'y']['mean'] is None
  assert cells['B', 'x']['status'] == 'missing' and cells['B', 'x']['mean'] is None
  by = cells['B', 'y']
  assert by['status'] == 'partial' and by['seeds_done'] == 1 and by['mean'] == pytest.approx(75.0)
  assert by['std'] is None and 'partial at epoch 1' in by['states']
  assert summary['protocol']['shortened']
  md = reproduce.markdown(summary)
  assert 'Shortened protocol' in md and '2 of 20 epochs' in md and '2 of 5 seeds' in md
  assert '82.00 ± 2.83 (paper 90.00 ± 1.00, Δ -8.00)' in md
  assert 'no config yet' in md and 'missing (not started)' in md and '[1 of 2 seeds]' in md
  md_path, json_path = reproduce.write_outputs(summary, str(tmp_path))
  assert json.load(open(json_path))['cells'][0]['mean'] == pytest.approx(82.0)
  assert os.path.basename(md_path) == 'hand.md'


def test_selection_by_validation_never_by_test(tmp_path):
  grid = {'optimizer.forward.lr': (0.5, 1.0)}  # configs/default.py has lr 1.0
  table = Table(
    'sel',
    'selection',
    ('A',),
    ('x',),
    {('A', 'x'): Cell('default', {'num_epochs': 3}, grid=grid)},
    'error',
    seeds=2,
  )
  [plan] = reproduce.plan_table(table, str(tmp_path), seeds=2, use_grid=True)
  assert [p for p in plan.points] == [{'optimizer.forward.lr': 0.5}, {'optimizer.forward.lr': 1.0}]
  low, default = plan.runs
  assert (
    'forward.lr=0.5' in low[0].workdir
    and os.path.basename(os.path.dirname(default[0].workdir)) == 'default'
  )
  for spec in low:  # best test accuracy, worse validation accuracy
    write_run(spec, [0.5, 0.9, 0.6], test=0.99, best_epoch=2)
  for spec in default:  # better validation accuracy at the reported (best) epoch, worse test
    write_run(spec, [0.5, 0.95, 0.94], test=0.80, best_epoch=2)
  summary = reproduce.summarize(table, [plan], seeds=2, use_grid=True)
  [cell] = summary['cells']
  assert cell['grid']['chosen'] == {'optimizer.forward.lr': 1.0}
  assert cell['grid']['chosen_score'] == pytest.approx(0.95)
  assert cell['mean'] == pytest.approx(20.0)  # test error of the chosen point
  assert [p['score'] for p in cell['grid']['points']] == pytest.approx([0.9, 0.95])
  assert 'Full protocol' in summary['protocol']['label']
  # Without --grid only the config's own point runs, and the table says the grid was not run.
  [plain] = reproduce.plan_table(table, str(tmp_path), seeds=2)
  summary = reproduce.summarize(table, [plain], seeds=2, use_grid=False)
  assert summary['cells'][0]['mean'] == pytest.approx(20.0)
  assert 'no hyperparameter sweep' in summary['protocol']['label']
  assert "config's own (grid not run)" in reproduce.markdown(summary)


def test_two_stage_sweep_trains_only_the_point_chosen_on_validation(tmp_path, monkeypatch):
  """--grid_epochs: every point runs once, short; only the point chosen on validation then runs
  at full length for every seed, and the table's header says the sweep was shortened."""
  grid = {'optimizer.forward.lr': (0.5, 1.0)}
  table = Table(
    'two_stage',
    'two-stage selection',
    ('A',),
    ('x',),
    {('A', 'x'): Cell('default', {'num_epochs': 3}, 80.0, grid=grid)},
    'accuracy',
    seeds=2,
  )
  monkeypatch.setitem(reproduce.tables_lib.TABLES, 'two_stage', table)
  calls = []

  def fake_train(specs, jobs, data_dir):  # lr 0.5 validates better, lr 1.0 tests better
    calls.append([(s.seed, s.epochs, dict(s.overrides[1:])) for s in specs])  # [0]: num_epochs
    for s in specs:
      low = dict(s.overrides).get('optimizer.forward.lr') == 0.5
      write_run(
        s,
        [0.5, 0.9, 0.8][: s.epochs] if low else [0.5, 0.8, 0.7][: s.epochs],
        test=(0.70 if low else 0.99) + s.seed % 2 * 0.02,
      )
    return []

  monkeypatch.setattr(reproduce, 'train_runs', fake_train)
  argv = ['two_stage', '--grid', '--grid_epochs', '2', '--seeds', '2', '--out', str(tmp_path)]
  assert reproduce.main(argv) == 0
  lr = 'optimizer.forward.lr'
  assert calls == [  # round 1: one short run per point; round 2: the chosen point's seeds
    [(2023, 2, {lr: 0.5}), (2023, 2, {})],
    [(2023, 3, {lr: 0.5}), (2024, 3, {lr: 0.5})],
  ]
  [cell] = json.load(open(tmp_path / 'two_stage.json'))['cells']
  assert cell['grid']['chosen'] == {lr: 0.5} and cell['grid']['sweep_epochs'] == 2
  assert cell['grid']['chosen_score'] == pytest.approx(0.9)
  assert cell['mean'] == pytest.approx(71.0) and cell['epochs_run'] == [3]
  md = (tmp_path / 'two_stage.md').read_text()
  assert 'grids swept at 2 epochs with one seed' in md and 'Changed protocol' in md
  assert 'lr=0.5 (val. 0.9000 at 2 epochs; 2 of 2 points run)' in md
  calls.clear()
  assert reproduce.main(argv) == 0 and calls == []  # a second call trains nothing
  # Before any sweep run has finished, no point is named as chosen.
  [plan] = reproduce.plan_table(table, str(tmp_path / 'empty'), 2, None, True, grid_epochs=2)
  summary = reproduce.summarize(table, [plan], seeds=2, use_grid=True)
  assert 'none chosen yet (0 of 2 points run)' in reproduce.markdown(summary)
  # --grid_epochs alone is refused in one line
  with pytest.raises(SystemExit, match='--grid_epochs needs --grid'):
    reproduce.main(['two_stage', '--grid_epochs', '2'])


def test_bad_table_name_is_one_line():
  with pytest.raises(SystemExit) as e:
    reproduce.main(['nope'])
  assert str(e.value).startswith("error: unknown table 'nope'; choose one of ccl_table1,")
  assert '\n' not in str(e.value) and 'smoke' in str(e.value)


def test_matmul_flops_counts_loops_and_paper_bp():
  a, b = jnp.ones((32, 784)), jnp.ones((784, 256))
  f = lambda a, b: jax.lax.fori_loop(0, 3, lambda i, x: x + (a @ b).sum(), 0.0)
  assert reproduce.matmul_flops(jax.make_jaxpr(f)(a, b)) == 3 * 2 * 32 * 784 * 256
  config = reproduce.load_config('mnist_mlp_bp')
  config.batch_size = 32
  # SPEC §4.7: the paper's BP entry is exactly 2 FLOPs per MAC, 6P − 2·n0·n1 = 2.39 M
  assert reproduce.step_mflops(config, xla=False)['matmul'] == pytest.approx(2.39104)


def test_event_file_follows_metrics_log(tmp_path):
  log = train.MetricsLog(str(tmp_path), write=True)
  for step in (10, 20, 30):
    log.add({'step': step, 'epoch': step // 10, 'val_accuracy': step / 100})
  log.truncate_after(20)  # a resume from step 20: the log and the event file drop step 30
  log.add({'step': 30, 'epoch': 3, 'val_accuracy': 0.5})
  log.add({'step': 30, 'epoch': 3, 'final': True, 'test_accuracy': 0.4})
  [events] = glob.glob(str(tmp_path / 'events.out.tfevents.*'))
  scalars = read_scalars(events)
  assert scalars['val_accuracy'] == [(10, 0.1), (20, 0.2), (30, 0.5)]
  assert scalars['final/test_accuracy'] == [(30, pytest.approx(0.4))]


def read_scalars(path: str) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value)]} of a TensorBoard event file (TFRecord framing, Event protos)."""
  from tensorboardX.proto import event_pb2

  out, data = {}, open(path, 'rb').read()
  i = 0
  while i < len(data):
    (n,) = struct.unpack('<Q', data[i : i + 8])
    event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
    i += 12 + n + 4
    for v in event.summary.value:
      out.setdefault(v.tag, []).append((event.step, pytest.approx(v.simple_value)))
  return out


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
  """`reproduce smoke --seeds 2 --epochs 1` once (4 one-epoch runs on digits)."""
  out = tmp_path_factory.mktemp('reproduce')
  assert reproduce.main(['smoke', '--seeds', '2', '--epochs', '1', '--out', str(out)]) == 0
  return out


def _fingerprint(out) -> dict:
  files = glob.glob(str(out / 'runs' / '*' / '*' / 'metrics.jsonl'))
  steps = glob.glob(str(out / 'runs' / '*' / '*' / 'checkpoints' / '*'))
  return {f: hashlib.md5(open(f, 'rb').read()).hexdigest() for f in files} | {
    'steps': sorted(steps)
  }


def test_smoke_table_end_to_end_and_second_call_trains_nothing(smoke, capsys):
  summary = json.load(open(smoke / 'smoke.json'))
  cells = {c['row']: c for c in summary['cells']}
  assert set(cells) == {'BP', 'CCL'}
  for c in cells.values():
    assert c['status'] == 'ok' and c['seeds_done'] == 2 and c['epochs_run'] == [1]
    assert 50 < c['mean'] <= 100 and c['std'] is not None and len(c['values']) == 2
  md = (smoke / 'smoke.md').read_text()
  assert '| BP |' in md and '| CCL |' in md and 'Full protocol' in md
  before = _fingerprint(smoke)
  assert len(before) == 4 + 1 and len(before['steps']) == 4  # 4 runs, one checkpoint each
  capsys.readouterr()
  assert reproduce.main(['smoke', '--seeds', '2', '--epochs', '1', '--out', str(smoke)]) == 0
  assert 'trained 0 runs (4 already done' in capsys.readouterr().out
  assert _fingerprint(smoke) == before
  reproduce.main(['smoke', '--seeds', '3', '--epochs', '1', '--out', str(smoke), '--dry-run'])
  listing = capsys.readouterr().out
  assert listing.count(': done (test') == 4 and listing.count(': not started') == 2
  assert '2 would be trained' in listing


def test_each_run_writes_one_event_file(smoke):
  for workdir in glob.glob(str(smoke / 'runs' / '*' / '*')):
    [events] = glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))
    scalars = read_scalars(events)
    records, final = reproduce.read_metrics(workdir)
    assert scalars['val_accuracy'] == [(records[0]['step'], records[0]['val_accuracy'])]
    assert scalars['final/test_accuracy'] == [(final['step'], final['test_accuracy'])]


def test_report_draws_one_line_per_run(smoke, tmp_path):
  runs = sorted(glob.glob(str(smoke / 'runs' / '*' / '*')))
  fig = report.compare_figure(runs)
  panels = [ax for ax in fig.axes if ax.get_visible()]
  titles = [ax.get_title() for ax in panels]
  assert titles[:4] == ['val_accuracy', 'test_accuracy', 'val_loss', 'train_task_loss']
  assert all(len(ax.get_lines()) == len(runs) for ax in panels[:4])  # BP's train_loss included
  assert all(len(ax.get_lines()) == 2 for ax in panels[4:])  # CCL's weight angles only
  assert titles[4:] and all(t.startswith('weight_angle/') for t in titles[4:])
  assert len({line.get_label() for line in panels[0].get_lines()}) == len(runs)
  out = tmp_path / 'compare.png'
  report.main([*runs, '--out', str(out), '--keys', 'val_accuracy', 'val_loss'])
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert os.path.isfile(os.path.join(runs[0], 'plots', 'curves.png'))  # plot_run still works


@pytest.mark.parametrize(
  'extra,panels',
  [
    ({}, 1),  # an autoencoder: losses only, no empty accuracy panel
    ({'val_accuracy': 0.5}, 2),
    ({'val_accuracy': 0.5, 'weight_angle/layer_1': 40.0}, 3),
  ],
)
def test_run_curves_have_one_panel_per_kind_of_metric(extra, panels, tmp_path):
  records = [{'epoch': e, 'train_loss': 1 / e, 'val_loss': 1 / e, **extra} for e in (1, 2)]
  (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # an empty panel's legend() warns
    path = report.plot_run(str(tmp_path))
  width = struct.unpack('>I', open(path, 'rb').read()[16:20])[0]  # the PNG header's width
  assert width == panels * 5 * 110  # 5 inches a panel at 110 dpi
