"""Weight and delta angles (and CCL's forward/feedback CKA) vs epoch for several runs, in one PNG.

    python experiments/plot_alignment.py RUN_DIR [RUN_DIR ...] --out alignment.png

Each RUN_DIR is a workdir with metrics.jsonl (and config.json, whose `rule` labels the run; pass
`label=RUN_DIR` to name it yourself). One colour per run; line style per layer.
"""

from __future__ import annotations

import argparse
import json
import os
import re

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

PANELS = (
  ('weight_angle/', 'weight angle ∠(W, B) (degrees)'),
  ('delta_angle/', 'delta angle ∠(δ_rule, δ_BP) (degrees)'),
  ('cka/', 'CKA(forward, feedback activations)'),
)  # CCL logs cka/; FA-type rules do not
STYLES = ('-', '--', ':', '-.')


def _natural(name: str) -> list:
  return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', name)]


def load_run(arg: str) -> tuple[str, list[dict]]:
  """(label, per-epoch records) of one run directory, given as DIR or LABEL=DIR."""
  label, _, path = arg.rpartition('=')
  if not label:
    cfg = os.path.join(path, 'config.json')
    label = (
      json.load(open(cfg)).get('rule', path) if os.path.exists(cfg) else os.path.basename(path)
    )
  records = []
  for line in open(os.path.join(path, 'metrics.jsonl')):
    try:
      r = json.loads(line)
    except ValueError:
      continue
    if not r.get('final') and 'epoch' in r:
      records.append(r)
  return label, records


def plot(runs: list[tuple[str, list[dict]]], out: str, title: str = '') -> None:
  present = {k for _, records in runs for r in records for k in r}
  panels = [p for p in PANELS if any(k.startswith(p[0]) for k in present)] or list(PANELS[:1])
  fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5.2), squeeze=False)
  colours = plt.rcParams['axes.prop_cycle'].by_key()['color']
  for ax, (prefix, ylabel) in zip(axes[0], panels):
    top = 0.0
    for i, (label, records) in enumerate(runs):
      keys = sorted({k for r in records for k in r if k.startswith(prefix)}, key=_natural)
      for j, key in enumerate(keys):
        pts = [(r['epoch'], r[key]) for r in records if key in r]
        if pts:
          top = max([top] + [v for _, v in pts if v is not None])
          ax.plot(
            *zip(*pts),
            STYLES[j % len(STYLES)],
            color=colours[i % len(colours)],
            marker='o' if len(pts) < 15 else None,
            ms=3,
            label=f'{label} {key[len(prefix) :]}',
          )
    ax.set_xlabel('epoch')
    ax.set_ylabel(ylabel)
    if prefix == 'cka/':
      ax.set_ylim(0, 1.05)
    else:
      ax.set_ylim(0, max(95, top + 5))
      ax.axhline(90, color='grey', lw=0.5)
    ax.grid(alpha=0.3)
    ax.legend(
      fontsize=7,
      ncol=2,
      loc='upper center',
      bbox_to_anchor=(0.5, -0.14),
      frameon=False,
      handlelength=3,
    )
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=120)
  plt.close(fig)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('runs', nargs='+', help='run workdirs (DIR or LABEL=DIR)')
  p.add_argument('--out', default='alignment.png')
  p.add_argument('--title', default='')
  a = p.parse_args()
  plot([load_run(r) for r in a.runs], a.out, a.title)
  print(f'wrote {a.out}')


if __name__ == '__main__':
  main()
