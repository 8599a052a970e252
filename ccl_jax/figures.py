"""The CCL paper's figures (SPEC §1.4) from runs: `python -m ccl_jax.figures RUN... --out DIR`.

- `kernels.png`: first-layer conv kernels of every conv run, side by side (paper Fig. 4);
- `reconstructions.png`: fixed test images and each autoencoder run's reconstruction (Fig. 5);
- `cka.png`: linear CKA between every forward activation and every feedback activation of each CCL
  run, on test images (Fig. 6);
- `weight_cosine.png`: cosine between each layer's forward and feedback weights vs epoch, from
  metrics.jsonl's `weight_angle/*` (every rule that logs them: CCL, FA, sign symmetry, KP, WM);
- `tsne.png`: t-SNE of the forward and (CCL) feedback features of layers 1, 3, 5 of fixed test
  images at the steps the runs saved (`config.snapshot_steps`, `snapshots.py`), coloured by
  class: rows layer × forward/feedback, columns each run's steps.

Each run is read from its workdir: `config.json`, the best-by-validation parameters of its newest
checkpoint, `metrics.jsonl` and `snapshots/`. A figure no run can feed is skipped with a line
saying why.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import sys

import numpy as np

N_IMAGES = 8  # reconstructions shown
N_KERNELS = 32  # first-layer kernels shown per run
CKA_BATCH = 256
TSNE_POINTS = 500  # t-SNE embeds at most this many snapshot images per panel


def _natural(s: str):
  return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', s)]


class LoadedRun:
  """A finished run: its config, rule, best parameters, test split and records."""

  def __init__(self, workdir: str):
    import jax
    import ml_collections

    from ccl_jax import config as config_lib
    from ccl_jax import snapshots, train

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
    # Compiled once per shape: run eagerly, each op of the nets compiled on its own.
    self.predict = jax.jit(self.rule.predict)
    self._features = jax.jit(functools.partial(snapshots.features, self.rule))
    self.test = run.data.test
    self.records = [r for r in run.log.records() if not r.get('final')]
    self.snapshots = snapshots.load(workdir)

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
    found = self._features(self.params, self.extra, images, labels)
    return None if found is None or found[1] is None else found


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
    out = np.asarray(r.predict(r.params, images, r.extra))
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
  import jax

  from ccl_jax import metrics as metrics_lib

  cka = jax.jit(metrics_lib.linear_cka)
  found = []
  for r in runs:
    x, y = r.test.images[:CKA_BATCH], r.test.labels[:CKA_BATCH]
    pairs = r.pairs(x, y)
    if pairs is not None:
      acts, signals = pairs
      m = np.array([[float(cka(a, s)) for a in acts] for s in signals])
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


def _embed(x: np.ndarray) -> tuple[np.ndarray | None, int]:
  """(2-D t-SNE of the rows of x, number of distinct rows). Repeated rows (CCL's classifier
  feedback features are its K class prototypes) are embedded once and share their point; fewer
  than 5 distinct rows, or non-finite ones, give no embedding. PCA init and a fixed seed; one
  thread (OpenMP threads oversubscribe a busy CPU: 3× slower on 2 shared cores)."""
  from sklearn.manifold import TSNE
  from threadpoolctl import threadpool_limits

  x = np.asarray(x, np.float64)
  if not np.all(np.isfinite(x)):
    return None, 0
  rows, inverse = np.unique(x, axis=0, return_inverse=True)
  if len(rows) < 5:
    return None, len(rows)
  tsne = TSNE(2, perplexity=min(30.0, (len(rows) - 1) / 3), init='pca', random_state=0)
  with threadpool_limits(1):
    xy = tsne.fit_transform(rows)
  return xy[inverse.ravel()], len(rows)


def tsne_figure(runs: list[LoadedRun], path: str) -> str | None:
  """One t-SNE per (layer, run, step) of the forward features (dots) and, where the rule has a
  feedback net, the feedback features of the same layer (outlined squares) embedded together,
  as in the CCL paper's Figure 3: aligned nets put each class's squares inside its dots."""
  found = [r for r in runs if r.snapshots]
  if not found:
    return None
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  # Rows: layer slots; columns: each run's steps, run after run.
  slots = max(len(r.snapshots[0]['layers']) for r in found)
  cols = [(r, snap) for r in found for snap in r.snapshots]
  classes = int(max(max(s['labels'].max() for s in r.snapshots) for r in found)) + 1
  cmap = plt.get_cmap('tab10' if classes <= 10 else 'tab20' if classes <= 20 else 'viridis')
  colour = dict(cmap=cmap, vmin=-0.5, vmax=classes - 0.5)
  fig, axes = plt.subplots(
    slots, len(cols), figsize=(2.4 * len(cols), 2.4 * slots + 1.0), squeeze=False
  )
  for i in range(slots):
    for j, (r, snap) in enumerate(cols):
      ax = axes[i][j]
      layers = snap['layers']
      if i >= len(layers):
        fig.delaxes(ax)  # a shallower net
        continue
      layer = layers[i]
      y = snap['labels'][:TSNE_POINTS]
      fwd = snap['forward'][layer][:TSNE_POINTS]
      fb = snap['feedback'].get(layer) if snap['feedback'] else None
      if fb is not None and fb.shape[1:] != fwd.shape[1:]:
        fb = None  # not in one feature space: nothing to embed jointly
      parts = [fwd] if fb is None else [fwd, fb[:TSNE_POINTS]]
      xy, distinct = _embed(np.concatenate(parts).reshape(sum(len(p) for p in parts), -1))
      title = f'{r.name} · step {snap["step"]}\nlayer {layer}'
      if xy is None:
        ax.text(0.5, 0.5, f'{distinct} distinct rows:\nno embedding', ha='center', fontsize=7)
      else:
        ax.scatter(xy[: len(fwd), 0], xy[: len(fwd), 1], c=y, s=3, **colour)
        if fb is not None:
          fb_xy, keep = np.unique(xy[len(fwd) :], axis=0, return_index=True)
          ax.scatter(
            fb_xy[:, 0], fb_xy[:, 1], c=y[keep], s=45, marker='s', edgecolors='k', **colour
          )
          title += f' · {len(fb_xy)} feedback pts'
      ax.set_xticks([])
      ax.set_yticks([])
      ax.set_title(title, fontsize=7)
  handles = [
    plt.Line2D([], [], ls='', marker='o', ms=4, color='grey', label='forward (test image)'),
    plt.Line2D([], [], ls='', marker='s', ms=6, mfc='grey', mec='k', label='feedback'),
  ]
  if classes <= 20:
    handles += [
      plt.Line2D([], [], ls='', marker='o', ms=5, color=cmap(k % cmap.N), label=str(k))
      for k in range(classes)
    ]
  fig.legend(handles=handles, loc='lower center', ncol=len(handles), fontsize=7)
  n = max(len(s['labels'][:TSNE_POINTS]) for r in found for s in r.snapshots)
  fig.suptitle(
    f"t-SNE of layer-l features of {n} fixed test images (dots) with the feedback net's "
    'features of the same layer (squares), one embedding per panel, coloured by class\n'
    '(layer l: the l-th hidden activation; step: training steps done; t-SNE axes have no units)',
    fontsize=9,
  )
  return _save(plt, fig, path, rect=(0, 0.5 / fig.get_figheight(), 1, 1))


def _save(plt, fig, path: str, rect=(0, 0, 1, 1)) -> str:
  fig.tight_layout(rect=rect)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


FIGURES = {
  'kernels': kernels_figure,
  'reconstructions': reconstructions_figure,
  'cka': cka_figure,
  'weight_cosine': weight_cosine_figure,
  'tsne': tsne_figure,
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
