"""`python -m ccl_jax.figures`: each figure drawn from two tiny real runs (BP and CCL on the
CIFAR-10 autoencoder), a PNG with the expected number of axes; the feature snapshots the t-SNE
figure reads (`config.snapshot_steps`)."""

import os

import numpy as np
import pytest

from ccl_jax import figures, snapshots, train

from conftest import DATA_DIR, load_config

# One parallel test worker for the whole file: its tests share a module fixture.
pytestmark = pytest.mark.xdist_group('figures')

TINY = dict(
  ae__widths=(4, 8, 8),
  train_subset=64,
  data__val_fraction=0.01,  # 500 validation images: the figures read the test split
  num_epochs=1,
  steps_per_call=0,
  scan_unroll=1,
  progress=False,
  snapshot_steps=(0, 1, 10**6),  # the last is never reached
)


@pytest.fixture(scope='module')
def drawn(tmp_path_factory):
  """{figure: number of axes} for the figures of a tiny BP run and a tiny CCL run."""
  if not (DATA_DIR / 'cifar10').is_dir():
    pytest.skip(f'no prepared cifar10 at {DATA_DIR} (set CCL_JAX_DATA_DIR to a prepared copy)')
  root = tmp_path_factory.mktemp('figures')
  monkeypatch = pytest.MonkeyPatch()
  monkeypatch.setattr(figures, 'TSNE_POINTS', 60)  # keeps the t-SNE panels cheap
  runs = []
  for rule in ('bp', 'ccl'):
    workdir = str(root / rule)
    train.train_and_evaluate(
      load_config(f'cifar10_ae_{rule}', data_dir=str(DATA_DIR), **TINY), workdir
    )
    runs.append(workdir)
  axes, save = {}, figures._save

  def counting_save(plt, fig, path, **kw):
    axes[os.path.basename(path)[: -len('.png')]] = len(fig.axes)
    return save(plt, fig, path, **kw)

  figures._save = counting_save
  try:
    made = figures.draw(runs, str(root / 'out'))
  finally:
    figures._save = save
    monkeypatch.undo()
  assert all(os.path.getsize(p) > 0 for p in made.values())
  return axes, dict(zip(('bp', 'ccl'), runs))


def test_kernels_figure(drawn):
  assert drawn[0]['kernels'] == 2  # one panel per run


def test_reconstructions_figure(drawn):
  assert drawn[0]['reconstructions'] == 3 * figures.N_IMAGES  # target, BP, CCL rows


def test_cka_figure(drawn):
  assert drawn[0]['cka'] == 2  # CCL's heat map and its colour bar (BP has no feedback net)


def test_weight_cosine_figure(drawn):
  assert drawn[0]['weight_cosine'] == 1  # CCL logs weight_angle/*, BP does not


def test_tsne_figure(drawn):
  # The autoencoder's 6 hidden activations: a panel per layer (1, 3, 5) and step reached (2) for
  # each run; CCL's panels embed forward and feedback features together, BP's forward only.
  axes, runs = drawn
  assert axes['tsne'] == 3 * (2 + 2)
  for rule, kinds in (('bp', {'forward'}), ('ccl', {'forward', 'feedback'})):
    snaps = snapshots.load(runs[rule])
    assert [s['step'] for s in snaps] == [0, 1]
    assert all({k for k in ('forward', 'feedback') if s[k]} == kinds for s in snaps)


def test_tsne_figure_skipped_without_snapshots(tmp_path):
  class NoSnapshots:
    snapshots = []

  assert figures.tsne_figure([NoSnapshots()], str(tmp_path / 'tsne.png')) is None
  assert not (tmp_path / 'tsne.png').exists()


def _files(workdir) -> dict[str, bytes]:
  folder = os.path.join(workdir, snapshots.FOLDER)
  return {n: open(os.path.join(folder, n), 'rb').read() for n in sorted(os.listdir(folder))}


def test_snapshots_exact_steps_shapes_and_resume(tmp_path):
  """An MLP run on digits (5 steps an epoch, one compiled call each): the snapshots of steps 0,
  2 (mid-call: the call is split there) and 5 have the right steps and shapes; a resumed run
  (one more epoch) keeps them byte for byte and adds step 7."""
  tiny = dict(
    dataset='digits',
    mlp__hidden=(12, 10, 8, 8, 6, 6),
    num_epochs=1,
    progress=False,
    snapshot_steps=(0, 2, 5, 7),
  )
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(load_config('mnist_mlp_ccl', **tiny), workdir)
  first = _files(workdir)
  assert list(first) == ['step_000000.npz', 'step_000002.npz', 'step_000005.npz']
  for s in snapshots.load(workdir):
    n = len(s['labels'])
    assert n == 360 and s['layers'] == [1, 3, 5]  # digits' 360 test images; 6 hidden layers
    assert s['forward'][1].shape == (n, 12) and s['forward'][5].shape == (n, 6)
    assert s['feedback'][3].shape == (n, 8)
    # CCL's classifier feedback features are its class prototypes: one row per label.
    assert len(np.unique(s['feedback'][1], axis=0)) == len(np.unique(s['labels']))
  assert [s['step'] for s in snapshots.load(workdir)] == [0, 2, 5]
  train.train_and_evaluate(load_config('mnist_mlp_ccl', **{**tiny, 'num_epochs': 2}), workdir)
  second = _files(workdir)
  assert list(second) == list(first) + ['step_000007.npz']
  assert all(second[n] == first[n] for n in first)  # kept, not rewritten


def test_snapshots_forward_only_for_bp(tmp_path):
  workdir = str(tmp_path / 'bp')
  config = load_config(
    'mnist_mlp_bp',
    dataset='digits',
    mlp__hidden=(8, 8),
    num_epochs=1,
    progress=False,
    snapshot_steps=(0, 3),
  )
  train.train_and_evaluate(config, workdir)
  snaps = snapshots.load(workdir)
  assert [s['step'] for s in snaps] == [0, 3]
  assert all(s['layers'] == [1, 2] and not s['feedback'] for s in snaps)  # the first two
  assert snaps[1]['forward'][2].shape == (360, 8)
