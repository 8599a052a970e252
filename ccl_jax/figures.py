"""The CCL paper's figures (SPEC §1.4) from runs: `python -m ccl_jax.figures RUN... --out DIR`.

- `kernels.png`: first-layer conv kernels of every conv run, side by side (paper Fig. 4);
- `reconstructions.png`: fixed test images and each autoencoder run's reconstruction (Fig. 5);
- `cka.png`: linear CKA between every forward activation and every feedback activation of each CCL
  run, on test images (Fig. 6);
- `weight_cosine.png`: cosine between each layer's forward and feedback weights vs epoch, from
  metrics.jsonl's `weight_angle/*` (every rule that logs them: CCL, FA, sign symmetry, KP, WM).

Each run is read from its workdir: `config.json`, the best-by-validation parameters of its newest
checkpoint, and `metrics.jsonl`. A figure no run can feed is skipped with a line saying why.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

import numpy as np

N_IMAGES = 8  # reconstructions shown
N_KERNELS = 32  # first-layer kernels shown per run
CKA_BATCH = 256


def _natural(s: str):
  return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', s)]


class LoadedRun:
  """A finished run: its config, rule, best parameters, test split and records."""

  def __init__(self, workdir: str):
    import jax
    import ml_collections

    from ccl_jax import config as config_lib
    from ccl_jax import train

    self.workdir = workdir
    with open(os.path.join(workdir, 'config.json')) as f:
      config = config_lib.finalize(ml_collections.ConfigDict(json.load(f)))
    self.config = config
    self.name = f'{config.rule} · {os.path.basename(os.path.normpath(workdir))}'
    run = train.build(config, workdir)
    restored = run.ckpt.restore({'state': run.state, 'best': run.best}, run.config_json)
    if restored is None:
      raise SystemExit(f'{workdir}: no checkpoint to read the parameters from')
    best = restored[0]['best']
    self.params = jax.device_get(best['params'])
    self.extra = jax.device_get(best['extra'])
    self.rule = run.learner.rule
    self.test = run.data.test
    self.records = [r for r in run.log.records() if not r.get('final')]

  @property
  def kind(self) -> str:
    return self.rule.task.kind

  def first_kernel(self) -> np.ndarray | None:
    """The first conv layer's kernel (kh, kw, in, out) of the forward net, if it has one."""
    forward = self.params['forward']
    for name in ('enc_1', 'layer_1', 'block_1'):
      node = forward.get(name)
      while isinstance(node, dict) and 'kernel' not in node and len(node) == 1:
        node = next(iter(node.values()))
      if isinstance(node, dict) and np.ndim(node.get('kernel')) == 4:
        return np.asarray(node['kernel'])
    return None

  def pairs(self, images: np.ndarray, labels: np.ndarray):
    """(forward activations, feedback activations) on a batch, for CCL runs; else None."""
    import jax.numpy as jnp

    rule = self.rule
    if hasattr(rule, 'pairs'):  # the autoencoder: the feedback net runs on the target image
      acts, signals, _ = rule.pairs(self.params, self.extra, jnp.asarray(images), False)
      return acts, signals
    if self.config.rule == 'ccl':  # classifiers: the feedback net's class prototypes, by label
      _, hiddens = rule.model.apply({'params': self.params['forward']}, jnp.asarray(images))
      eye = jnp.eye(rule.task.num_classes)
      prototypes = rule.feedback.apply({'params': self.params['feedback']}, eye)
      return [jnp.asarray(images)] + hiddens, [g[labels] for g in prototypes]
    return None


def _tiles(kernels: np.ndarray, n: int) -> np.ndarray:
  """Up to n kernels (kh, kw, c, out) as one image grid; each kernel scaled to [0, 1]."""
  k = kernels[..., :n]
  kh, kw, c, m = k.shape
  cols = int(math.ceil(math.sqrt(m)))
  rows = int(math.ceil(m / cols))
  grid = np.ones((rows * (kh + 1) - 1, cols * (kw + 1) - 1, 3))
  for i in range(m):
    t = k[..., i]
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-12)
    t = t if c == 3 else np.repeat(t[..., :1], 3, axis=-1)
    r, q = divmod(i, cols)
    grid[r * (kh + 1) : r * (kh + 1) + kh, q * (kw + 1) : q * (kw + 1) + kw] = t
  return grid


def _subplots(n: int, width: float, height: float):
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, n, figsize=(max(width * n, 6.5), height), squeeze=False)
  return plt, fig, list(axes[0])


def kernels_figure(runs: list[LoadedRun], path: str) -> str | None:
  found = [(r, r.first_kernel()) for r in runs]
  found = [(r, k) for r, k in found if k is not None]
  if not found:
    return None
  plt, fig, axes = _subplots(len(found), 3.2, 3.6)
  for ax, (r, k) in zip(axes, found):
    ax.imshow(_tiles(k, N_KERNELS), interpolation='nearest')
    kh, kw, c, m = k.shape
    ax.set_title(f'{r.name}\n{kh}×{kw}×{c}, first {min(N_KERNELS, m)} of {m}', fontsize=8)
    ax.set_axis_off()
  fig.suptitle(
    'First-layer conv kernels\n(forward net; each kernel min–max scaled to [0, 1])', fontsize=9
  )
  return _save(plt, fig, path)


def reconstructions_figure(runs: list[LoadedRun], path: str) -> str | None:
  found = [r for r in runs if r.kind == 'reconstruction']
  if not found:
    return None
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  images = found[0].test.images[:N_IMAGES]
  rows = [('target', images, None)]
  for r in found:
    out = np.asarray(r.rule.predict(r.params, images, r.extra))
    rows.append((r.name, out, float(np.mean((out - images) ** 2))))
  n = len(images)
  fig, axes = plt.subplots(len(rows), n, figsize=(1.3 * n, 1.45 * len(rows)), squeeze=False)
  for i, (label, imgs, mse) in enumerate(rows):
    for j in range(n):
      ax = axes[i][j]
      ax.imshow(np.clip(imgs[j], 0, 1).squeeze(), cmap='gray' if imgs.shape[-1] == 1 else None)
      ax.set_xticks([])
      ax.set_yticks([])
    text = label if mse is None else f'{label}\nMSE {mse:.4f}'
    axes[i][0].set_ylabel(text, fontsize=7, rotation=0, ha='right', va='center')
  fig.suptitle('Test-set reconstructions (pixels in [0, 1]; MSE over these images)')
  return _save(plt, fig, path)


def cka_figure(runs: list[LoadedRun], path: str) -> str | None:
  from ccl_jax import metrics as metrics_lib

  found = []
  for r in runs:
    x, y = r.test.images[:CKA_BATCH], r.test.labels[:CKA_BATCH]
    pairs = r.pairs(x, y)
    if pairs is not None:
      acts, signals = pairs
      m = np.array([[float(metrics_lib.linear_cka(a, s)) for a in acts] for s in signals])
      found.append((r, m))
  if not found:
    return None
  plt, fig, axes = _subplots(len(found), 4.2, 3.9)
  for ax, (r, m) in zip(axes, found):
    im = ax.imshow(m, vmin=0, vmax=1, cmap='viridis')
    ax.set_xticks(range(m.shape[1]), ['x'] + [f'a{i}' for i in range(1, m.shape[1])], fontsize=6)
    ax.set_yticks(range(m.shape[0]), [f'b{i}' for i in range(m.shape[0])], fontsize=6)
    ax.set(xlabel='forward activation (input → output)', ylabel='feedback activation, pair index')
    ax.set_title(r.name, fontsize=8)
    fig.colorbar(im, ax=ax, label='linear CKA')
  fig.suptitle(f'Forward vs feedback representations:\nlinear CKA on {CKA_BATCH} test images')
  return _save(plt, fig, path)


def weight_cosine_figure(runs: list[LoadedRun], path: str) -> str | None:
  found = []
  for r in runs:
    keys = sorted(
      {k for rec in r.records for k in rec if k.startswith('weight_angle/')}, key=_natural
    )
    if keys:
      found.append((r, keys))
  if not found:
    return None
  plt, fig, axes = _subplots(len(found), 4.2, 3.4)
  for ax, (r, keys) in zip(axes, found):
    epochs = [rec['epoch'] for rec in r.records]
    for k in keys:
      cos = [
        math.cos(math.radians(rec[k])) if rec.get(k) is not None else np.nan for rec in r.records
      ]
      ax.plot(epochs, cos, marker='o', ms=3, label=k.split('/', 1)[1])
    ax.set(xlabel='epoch', ylabel='cos(forward W, feedback B)', ylim=(-0.05, 1.05), title=r.name)
    ax.title.set_fontsize(8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
  fig.suptitle('Forward/feedback weight alignment per layer (cosine of vec W and vec B)')
  return _save(plt, fig, path)


def _save(plt, fig, path: str) -> str:
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


FIGURES = {
  'kernels': kernels_figure,
  'reconstructions': reconstructions_figure,
  'cka': cka_figure,
  'weight_cosine': weight_cosine_figure,
}


def draw(workdirs: list[str], out: str) -> dict[str, str]:
  """Draws every figure the runs can feed into `out`; returns {figure: path}."""
  os.makedirs(out, exist_ok=True)
  runs = [LoadedRun(w) for w in workdirs]
  made = {}
  for name, fn in FIGURES.items():
    path = fn(runs, os.path.join(out, f'{name}.png'))
    if path is None:
      print(f'{name}: skipped (no run has what it needs)')
    else:
      made[name] = path
      print(f'{name}: {path}')
  return made


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('runs', nargs='+', help='run workdirs')
  p.add_argument('--out', required=True, help='folder for the PNGs')
  args = p.parse_args(argv)
  for w in args.runs:
    if not os.path.isfile(os.path.join(w, 'config.json')):
      raise SystemExit(f'{w}: not a run workdir (no config.json)')
  draw(args.runs, args.out)


if __name__ == '__main__':
  main(sys.argv[1:])
