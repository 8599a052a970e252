"""`python -m ccl_jax.figures`: each figure drawn from two tiny real runs (BP and CCL on the
CIFAR-10 autoencoder), a PNG with the expected number of axes."""

import os

import pytest

from ccl_jax import figures, train

from conftest import DATA_DIR, load_config

TINY = dict(
  ae__widths=(4, 8, 8),
  train_subset=64,
  num_epochs=1,
  steps_per_call=0,
  scan_unroll=1,
  progress=False,
)


@pytest.fixture(scope='module')
def drawn(tmp_path_factory):
  """{figure: number of axes} for the figures of a tiny BP run and a tiny CCL run."""
  if not (DATA_DIR / 'cifar10').is_dir():
    pytest.skip(f'no prepared cifar10 at {DATA_DIR} (set CCL_JAX_DATA_DIR to a prepared copy)')
  root = tmp_path_factory.mktemp('figures')
  runs = []
  for rule in ('bp', 'ccl'):
    workdir = str(root / rule)
    train.train_and_evaluate(
      load_config(f'cifar10_ae_{rule}', data_dir=str(DATA_DIR), **TINY), workdir
    )
    runs.append(workdir)
  axes, save = {}, figures._save

  def counting_save(plt, fig, path):
    axes[os.path.basename(path)[: -len('.png')]] = len(fig.axes)
    return save(plt, fig, path)

  figures._save = counting_save
  try:
    made = figures.draw(runs, str(root / 'out'))
  finally:
    figures._save = save
  assert all(os.path.getsize(p) > 0 for p in made.values())
  return axes


def test_kernels_figure(drawn):
  assert drawn['kernels'] == 2  # one panel per run


def test_reconstructions_figure(drawn):
  assert drawn['reconstructions'] == 3 * figures.N_IMAGES  # target, BP, CCL rows


def test_cka_figure(drawn):
  assert drawn['cka'] == 2  # CCL's heat map and its colour bar (BP has no feedback net)


def test_weight_cosine_figure(drawn):
  assert drawn['weight_cosine'] == 1  # CCL logs weight_angle/*, BP does not
