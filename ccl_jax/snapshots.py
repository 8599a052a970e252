"""Feature snapshots for the t-SNE figure: `config.snapshot_steps=(0, 100, ...)`.

At each requested global training step a run saves the forward activations (and, for CCL, the
feedback activations) of a fixed set of held-out images, the first `N_IMAGES` of the test split,
with their labels, to `WORKDIR/snapshots/step_<step>.npz`. Step 0 is before any training.

Layers are indexed as CCL pairs them: 0 is the input, l the l-th hidden activation (the
autoencoder's: enc_1.., dec_n..dec_2, then the reconstruction). Saved are `LAYERS` (1, 3, 5), or
the first three hidden layers of a net with fewer than five. Conv feature maps are 2×2
average-pooled until they have at most `MAX_DIM` values per image (then globally pooled if still
larger), so a snapshot stays a few MB.

Snapshots are exact: the training loop ends a compiled call at every requested step (one extra
compilation per new call length). Steps past the end of training are never reached. On resume
from step S, files of steps after S (written by the part of the run that is redone) are removed
and rewritten when the run gets there; files of steps up to S are kept, never rewritten. Only
process 0 writes.
"""

from __future__ import annotations

import glob
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

N_IMAGES = 500
LAYERS = (1, 3, 5)
MAX_DIM = 1024
FOLDER = 'snapshots'


def features(rule, params: dict, extra: dict, images, labels):
  """(forward activations, feedback activations or None), lists indexed like CCL's pairs (0 =
  the input); the feedback ones are CCL's: its autoencoder's twin run on the target image, or its
  classifier's class prototypes picked by label. None when the rule's net gives no hidden
  activations."""
  from ccl_jax.rules import counter_current

  if hasattr(rule, 'pairs'):  # CCL's autoencoder: the feedback net runs on the target image
    acts, signals, _ = rule.pairs(params, extra, images, False)
    return acts, signals
  if isinstance(rule, counter_current.CounterCurrent):  # the feedback net's class prototypes
    _, hiddens = rule.model.apply({'params': params['forward']}, images)
    prototypes = rule.feedback.apply({'params': params['feedback']}, jnp.eye(rule.task.num_classes))
    return [images] + hiddens, [g[labels] for g in prototypes]
  net = getattr(rule, 'eval_net', None)
  if net is not None and hasattr(net, 'forward'):  # target propagation: [x, h_1, .., logits]
    return [images] + net.forward(params['forward'], images)[1:-1], None
  model = getattr(rule, 'model', None)
  if model is None or not hasattr(model, 'apply'):
    return None
  from ccl_jax.rules import base

  variables = {'params': params['forward']}
  if getattr(model, 'feedback', None) is True:  # FA, KP, sign symmetry: layers that carry B
    variables['feedback'] = params['feedback']
  stats = extra if 'batch_stats' in (extra or {}) else {}
  (out, hiddens), _ = base.apply_net(model, variables, stats, images, False)
  if not isinstance(hiddens, (list, tuple)) or not all(hasattr(h, 'shape') for h in hiddens):
    return None  # the local-loss block nets return their heads' outputs instead
  acts = [images] + list(hiddens)
  return acts + [out] if rule.task.kind == 'reconstruction' else acts, None


def layers_of(n: int) -> tuple[int, ...]:
  """The layers saved of a net with n hidden activations: (1, 3, 5), or its first three."""
  return LAYERS if n >= max(LAYERS) else tuple(range(1, min(n, len(LAYERS)) + 1))


def pool(x: jax.Array) -> jax.Array:
  """(B, ...) features as (B, d) float32, conv maps average-pooled to d <= MAX_DIM."""
  x = x.astype(jnp.float32)
  while x.ndim == 4 and x[0].size > MAX_DIM and x.shape[1] % 2 == 0 and x.shape[2] % 2 == 0:
    b, h, w, c = x.shape
    x = x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
  if x.ndim == 4 and x[0].size > MAX_DIM:
    x = x.mean(axis=(1, 2))
  return x.reshape(x.shape[0], -1)


def make_fn(rule):
  """Jitted (params, extra, images, labels) -> {'forward_<l>': (N, d), 'feedback_<l>': ...};
  {} when the rule has no hidden activations to snapshot."""

  def fn(params, extra, images, labels):
    found = features(rule, params, extra, images, labels)
    if found is None:
      return {}
    acts, signals = found
    out = {}
    for l in layers_of(len(acts) - 1):
      out[f'forward_{l}'] = pool(acts[l])
      if signals is not None:
        out[f'feedback_{l}'] = pool(signals[l])
    return out

  return jax.jit(fn)


def path_of(workdir: str, step: int) -> str:
  return os.path.join(workdir, FOLDER, f'step_{step:06d}.npz')


def saved_steps(workdir: str) -> list[int]:
  found = glob.glob(os.path.join(workdir, FOLDER, 'step_*.npz'))
  return sorted(int(re.findall(r'step_(\d+)\.npz$', p)[0]) for p in found)


def load(workdir: str) -> list[dict]:
  """The run's snapshots, oldest first: {'step', 'labels', 'layers', 'forward': {l: (N, d)},
  'feedback': {l: (N, d)} (empty without feedback features)}."""
  out = []
  for step in saved_steps(workdir):
    with np.load(path_of(workdir, step)) as z:
      layers = [int(l) for l in z['layers']]
      out.append(
        {
          'step': int(z['step']),
          'labels': z['labels'],
          'layers': layers,
          'forward': {l: z[f'forward_{l}'] for l in layers},
          'feedback': {l: z[f'feedback_{l}'] for l in layers if f'feedback_{l}' in z},
        }
      )
  return out


class Snapshots:
  """The snapshots a run takes: which steps are left, and writing them."""

  def __init__(self, workdir: str, steps, rule, split, write: bool):
    self.workdir = workdir
    self.steps = sorted({int(s) for s in steps})
    self.write = write
    self.fn = make_fn(rule) if self.steps else None
    self.images = split.images[:N_IMAGES]
    self.labels = split.labels[:N_IMAGES]

  def truncate_after(self, step: int) -> None:
    """On resume from `step`: drop the files of later steps (that part of the run is redone)."""
    if self.write:
      for s in saved_steps(self.workdir):
        if s > step:
          os.remove(path_of(self.workdir, s))

  def next_after(self, step: int) -> int | None:
    """The first requested step after `step`, where a compiled call must end."""
    return next((s for s in self.steps if s > step), None)

  def maybe_save(self, state, step: int) -> str | None:
    """Saves the snapshot of `state` if `step` is requested and not saved yet."""
    path = path_of(self.workdir, step)
    if not self.write or step not in self.steps or os.path.exists(path):
      return None
    arrays = jax.device_get(
      self.fn(state.params, state.extra, jnp.asarray(self.images), jnp.asarray(self.labels))
    )
    if not arrays:
      print(f'snapshot at step {step}: this rule has no hidden activations to save')
      return None
    layers = sorted({int(k.split('_')[1]) for k in arrays})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + '.tmp.npz'
    np.savez_compressed(
      tmp,
      step=step,
      labels=self.labels,
      layers=np.array(layers),
      **{k: np.asarray(v) for k, v in arrays.items()},
    )
    os.replace(tmp, path)  # a kill never leaves half a file under the final name
    return path
