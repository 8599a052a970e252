"""Plots of a run's metrics.jsonl (PNG), written to `workdir/plots/` at the end of every run."""

from __future__ import annotations

import json
import os


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
  panels = 3 if angle_keys else 2
  fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6))
  # Rules with local losses log their total as train_loss; compare the task loss with val/test.
  train_key = 'train_task_loss' if any('train_task_loss' in r for r in records) else 'train_loss'
  for key in (train_key, 'val_loss', 'test_loss'):
    axes[0].plot(epochs, [r.get(key) for r in records], label=key)
  axes[0].set(xlabel='epoch', ylabel='task loss', yscale='log')
  for key in ('train_accuracy', 'val_accuracy', 'test_accuracy'):
    if any(key in r for r in records):
      axes[1].plot(epochs, [r.get(key) for r in records], label=key)
  axes[1].set(xlabel='epoch', ylabel='accuracy')
  if angle_keys:
    for key in angle_keys:
      axes[2].plot(
        epochs,
        [r.get(key) for r in records],
        label=key,
        linestyle='-' if key.startswith('weight') else '--',
      )
    axes[2].set(xlabel='epoch', ylabel='degrees', ylim=(0, 95))
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle(title or os.path.basename(os.path.abspath(workdir)))
  fig.tight_layout()
  os.makedirs(os.path.join(workdir, 'plots'), exist_ok=True)
  path = os.path.join(workdir, 'plots', 'curves.png')
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
