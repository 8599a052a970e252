"""Plots of runs' metrics.jsonl (PNG): one run's curves, written to `workdir/plots/` at the end of
every run (`plot_run`), and several runs compared on shared axes (`plot_runs`):

  python -m ccl_jax.report RUN_DIR... [--out FILE.png] [--keys KEY...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def read_records(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  out = []
  with open(path) as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except ValueError:
        pass
  return [r for r in out if not r.get('final')]


def plot_run(workdir: str, title: str = '') -> str:
  """Losses, accuracies and (when logged) per-layer alignment angles by epoch; returns the path."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  records = read_records(workdir)
  epochs = [r['epoch'] for r in records]
  angle_keys = sorted(
    {k for r in records for k in r if k.startswith(('weight_angle/', 'delta_angle/'))}
  )
  acc_keys = [
    k for k in ('train_accuracy', 'val_accuracy', 'test_accuracy') if any(k in r for r in records)
  ]  # none for an autoencoder
  panels = 1 + bool(acc_keys) + bool(angle_keys)
  fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6), squeeze=False)
  loss_ax, *more = axes[0]
  # Rules with local losses log their total as train_loss; compare the task loss with val/test.
  train_key = 'train_task_loss' if any('train_task_loss' in r for r in records) else 'train_loss'
  for key in (train_key, 'val_loss', 'test_loss'):
    loss_ax.plot(epochs, [r.get(key) for r in records], label=key)
  loss_ax.set(xlabel='epoch', ylabel='task loss', yscale='log')
  if acc_keys:
    acc_ax = more.pop(0)
    for key in acc_keys:
      acc_ax.plot(epochs, [r.get(key) for r in records], label=key)
    acc_ax.set(xlabel='epoch', ylabel='accuracy')
  if angle_keys:
    angle_ax = more.pop(0)
    for key in angle_keys:
      angle_ax.plot(
        epochs,
        [r.get(key) for r in records],
        label=key,
        linestyle='-' if key.startswith('weight') else '--',
      )
    angle_ax.set(xlabel='epoch', ylabel='degrees', ylim=(0, 95))
  for ax in axes[0]:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle(title or os.path.basename(os.path.abspath(workdir)))
  fig.tight_layout()
  os.makedirs(os.path.join(workdir, 'plots'), exist_ok=True)
  path = os.path.join(workdir, 'plots', 'curves.png')
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


# -- several runs on shared axes -------------------------------------------------------------------
DEFAULT_KEYS = ('val_accuracy', 'test_accuracy', 'val_loss', 'train_task_loss')
LOG_SCALE = ('loss', 'mse')


def default_keys(runs: dict[str, list[dict]]) -> list[str]:
  """Validation/test accuracy, validation and training task loss (`train_task_loss`, or
  `train_loss` for rules whose training loss is the task loss), then the weight angles."""
  present = {k for records in runs.values() for r in records for k in r}
  keys = [
    k for k in DEFAULT_KEYS if k in present or (k == 'train_task_loss' and 'train_loss' in present)
  ]
  angles = sorted(k for k in present if k.startswith('weight_angle/'))
  return keys + sorted(angles, key=lambda k: [int(t) if t.isdigit() else t for t in k.split('_')])


def run_labels(run_dirs: list[str]) -> list[str]:
  """Each run's folder path without the parts all runs share (so the legend stays short)."""
  parts = [os.path.normpath(os.path.abspath(d)).split(os.sep) for d in run_dirs]
  common = os.path.commonprefix(parts) if len(parts) > 1 else parts[0][:-1]
  return ['/'.join(p[len(common) :]) or p[-1] for p in parts]


def compare_figure(run_dirs: list[str], keys: list[str] | None = None):
  """A matplotlib Figure: one panel per key, one line per run (by epoch), shared colours."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from matplotlib.ticker import MaxNLocator

  runs = {d: read_records(d) for d in run_dirs}
  keys = list(keys or default_keys(runs))
  if not keys:
    raise ValueError('no metrics to draw in ' + ', '.join(run_dirs))
  cols = min(3, len(keys))
  rows = -(-len(keys) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
  colours = plt.rcParams['axes.prop_cycle'].by_key()['color']
  for i, key in enumerate(keys):
    ax = axes[i // cols][i % cols]
    for j, (label, records) in enumerate(zip(run_labels(run_dirs), runs.values())):
      use = key
      if key == 'train_task_loss' and not any(key in r for r in records):
        use = 'train_loss'  # a rule that minimises the task loss itself logs only train_loss
      pts = [(r['epoch'], r[use]) for r in records if r.get(use) is not None and 'epoch' in r]
      if pts:
        xs, ys = zip(*pts)
        ax.plot(
          xs, ys, label=label, color=colours[j % len(colours)], marker='o' if len(xs) < 3 else None
        )
    ax.set(title=key, xlabel='epoch')
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if any(w in key for w in LOG_SCALE) and ax.get_lines():
      ax.set_yscale('log')
    if key.startswith(('weight_angle/', 'delta_angle/', 'update_angle/')):
      ax.set(ylabel='degrees', ylim=(0, 95))
    ax.grid(alpha=0.3)
  for k in range(len(keys), rows * cols):
    axes[k // cols][k % cols].set_visible(False)
  handles, labels = [], []
  for ax in axes.flat:  # every run, even one absent from the first panel
    for h, l in zip(*ax.get_legend_handles_labels()):
      if l not in labels:
        handles.append(h)
        labels.append(l)
  ncol = min(len(labels), 4)
  fig.legend(handles, labels, loc='upper center', ncol=ncol, fontsize=10, frameon=False)
  fig.tight_layout(rect=(0, 0, 1, 1 - (0.06 + 0.035 * ((len(labels) - 1) // ncol)) / rows))
  return fig


def plot_runs(run_dirs: list[str], out: str, keys: list[str] | None = None) -> str:
  """Draws `run_dirs`' curves on shared axes into the PNG `out`; returns its path."""
  import matplotlib.pyplot as plt

  fig = compare_figure(run_dirs, keys)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return out


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(
    prog='python -m ccl_jax.report', description="Several runs' curves on shared axes, one PNG."
  )
  p.add_argument('run_dirs', nargs='+', metavar='RUN_DIR', help='workdirs holding metrics.jsonl')
  p.add_argument('--out', default='runs_compared.png', help='the PNG to write')
  p.add_argument('--keys', nargs='+', default=None, help='metrics.jsonl keys, one panel each')
  args = p.parse_args(argv)
  missing = [d for d in args.run_dirs if not os.path.isfile(os.path.join(d, 'metrics.jsonl'))]
  if missing:
    sys.exit(f'error: no metrics.jsonl in {", ".join(missing)}')
  try:
    print(plot_runs(args.run_dirs, args.out, args.keys))
  except ValueError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  main()
