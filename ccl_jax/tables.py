"""Every published table `ccl_jax.reproduce` regenerates, as plain data: rows × columns of cells.

A `Cell` names the experiment config (`configs/<config>.py`) and the overrides that make it the
paper's run, the published value with its ± and where it came from (`../shared/SPEC.md`), and
optionally the paper's hyperparameter grid. A cell whose config file does not exist yet shows as
"no config yet"; a (row, column) pair with no cell at all is not part of the paper's table.
Values are in the table's unit: accuracy and error in %, MSE as is, MFLOP per sample.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Cell:
  """One published number and the run that reproduces it."""

  config: str  # configs/<config>.py
  overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # dotted key -> value
  published: float | None = None  # the paper's mean, in the table's unit (None: not published)
  pm: float | None = None  # the paper's ± (None: not stated)
  source: str = ''  # where `published` comes from
  # The paper's sweep: dotted key -> values; 'k1,k2' sets several keys to one value;
  # '{section}' stands for the rule's config section. Run only with `reproduce --grid`.
  grid: dict[str, tuple] = dataclasses.field(default_factory=dict)
  also: dict[str, float] = dataclasses.field(default_factory=dict)  # published extra metrics
  note: str = ''


@dataclasses.dataclass(frozen=True)
class Table:
  """Rows × columns of cells, one metric (plus optional extra ones) per cell."""

  name: str
  title: str
  rows: tuple[str, ...]
  columns: tuple[str, ...]
  cells: dict[tuple[str, str], Cell]
  metric: str  # 'accuracy' | 'error' | 'mse' | 'mflops' (see reproduce.METRICS)
  seeds: int | None  # the paper's seeds per cell (None: not stated); the default --seeds
  also: tuple[str, ...] = ()  # extra metrics per cell, e.g. 'output_angle'
  train: bool = True  # False: computed from the configs without training (FLOPs)
  notes: tuple[str, ...] = ()


# -- CCL paper (Kao & Hariharan 2024), Table 1: MLPs, test accuracy % (SPEC §1.1, §4) ------------
T1_DATASETS = {
  'MNIST': 'mnist',
  'Fashion-MNIST': 'fashion_mnist',
  'CIFAR-10': 'cifar10',
  'CIFAR-100': 'cifar100',
}
T1_SOURCE = 'CCL paper Table 1 (SPEC §1.1, §4)'
T1 = {  # row -> (rule, published per column, or None where the paper has no row)
  'BP': ('bp', ((98.19, 0.10), (89.58, 0.25), (50.03, 0.31), (22.55, 0.19))),
  'FA': ('fa', ((96.96, 0.05), (87.38, 0.12), (45.76, 0.38), (22.13, 0.41))),
  'DFA': ('dfa', ((97.27, 0.06), (87.35, 0.99), (42.86, 1.94), (19.87, 1.50))),
  'DTP': ('dtp', None),
  'DRL': ('drl', ((93.05, 0.24), (83.40, 0.18), (42.09, 0.27), (19.94, 0.28))),
  'L-DRL': ('ldrl', ((93.29, 0.21), (83.60, 0.20), (42.19, 0.30), (19.96, 0.27))),
  'FW-DTP': ('fwdtp', ((97.20, 0.16), (87.78, 0.47), (45.91, 0.60), (21.09, 0.31))),
  'DRTP': ('drtp', ((92.16, 0.18), (82.03, 0.56), (33.85, 0.43), (15.53, 0.33))),
  'CCL': ('ccl', ((98.13, 0.10), (88.58, 0.29), (52.73, 0.59), (21.76, 0.22))),
}
# The paper's grids (App. 6.1, SPEC §1.1 and §4.0); the chosen values are not reported.
BP_GRID = {
  'optimizer.forward.lr': (0.4, 0.2, 0.1, 0.05, 0.02, 0.01),
  'optimizer.forward.clip': (0.5, 1.0),
}
GRIDS = {
  'bp': BP_GRID,
  'fa': BP_GRID,
  'dfa': BP_GRID,  # the paper gives no DFA grid: BP/FA's (an assumption)
  'ccl': {
    'optimizer.forward.lr,optimizer.feedback.lr': (0.2, 0.5, 1.0, 1.5, 2.0),
    'optimizer.forward.clip,optimizer.feedback.clip': (0.5, 1.0),
  },
  'drtp': {
    'optimizer.forward.lr': (0.01, 0.03, 0.1, 0.3),
    'drtp.mean': (0.0, 0.05),
    'drtp.std': (0.01, 0.03, 0.1, 0.3),
  },
  'fwdtp': {
    'optimizer.forward.lr': (0.3, 1.0, 3.0),
    '{section}.beta': (1e-3, 3e-3, 1e-2, 3e-2, 0.1),
  },
}
GRIDS['dtp'] = GRIDS['drl'] = GRIDS['ldrl'] = {
  **GRIDS['fwdtp'],
  'optimizer.feedback.lr': (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
}
OFFICIAL = {  # the official code run unchanged on this machine (SPEC §1.1)
  ('BP', 'MNIST'): 97.68,
  ('CCL', 'MNIST'): 98.05,
  ('BP', 'CIFAR-10'): 47.77,
  ('CCL', 'CIFAR-10'): 35.57,
}


def _table1_cells() -> dict[tuple[str, str], Cell]:
  cells = {}
  for row, (rule, values) in T1.items():
    for i, (column, ds) in enumerate(T1_DATASETS.items()):
      value, pm = values[i] if values else (None, None)
      config, overrides, note = f'{ds}_mlp_{rule}', {}, ''
      if rule == 'fa':  # configs/*_mlp_fa.py are Akrout's sigmoid 784-500-10 nets, not Table 1's
        config, overrides = f'{ds}_mlp_bp', {'rule': 'fa'}
        note = "FA on the BP row's network (no Table-1 FA config of its own)"
      if (row, column) in OFFICIAL:
        note = f'official code run here: {OFFICIAL[row, column]:.2f}'
      cells[row, column] = Cell(
        config,
        overrides,
        value,
        pm,
        T1_SOURCE if values else 'DTP has no row in Table 1 (SPEC §4.0)',
        GRIDS[rule],
        note=note,
      )
  return cells


CCL_TABLE1 = Table(
  'ccl_table1',
  'CCL paper Table 1: MLP test accuracy (%)',
  tuple(T1),
  tuple(T1_DATASETS),
  _table1_cells(),
  'accuracy',
  seeds=5,
  notes=(
    'MNIST/Fashion-MNIST 784-256×5-10, CIFAR 3072-1024×3-K; SGD, batch 256, 100 epochs; test '
    'accuracy of the parameters with the lowest validation loss.',
    "The paper picked each rule's hyperparameters on validation from grids (SPEC §1.1, §4.0) "
    'and does not report the values chosen: `--grid` runs those grids.',
  ),
)

# -- CCL paper Table 2: MFLOP per sample of one training step at batch 32 (SPEC §4.7) ------------
T2 = {  # row -> (rule, (MNIST, CIFAR-10) published MFLOP, or None)
  'BP': ('bp', (2.39, 25.23)),
  'DTP': ('dtp', (48.69, 485.59)),
  'DRL': ('drl', (125.73, 833.81)),
  'L-DRL': ('ldrl', (82.45, 770.36)),
  'FWDTP-BN': ('fwdtp', (18.06, 170.08)),
  'CCL': ('ccl', (2.55, 27.89)),
  'DFA': ('dfa', None),
  'DRTP': ('drtp', None),
}
CCL_TABLE2 = Table(
  'ccl_table2',
  'CCL paper Table 2: MFLOP per sample of one training step at batch 32',
  tuple(T2),
  ('MNIST', 'CIFAR-10'),
  {
    (row, column): Cell(
      f'{ds}_mlp_{rule}',
      {'batch_size': 32},
      values[i] if values else None,
      None,
      'CCL paper Table 2, torch.profiler (SPEC §4.7)'
      if values
      else 'not in Table 2 ("similar to BP"); SPEC §4.7 derives ≈ 0.8× BP',
    )
    for row, (rule, values) in T2.items()
    for i, (column, ds) in enumerate((('MNIST', 'mnist'), ('CIFAR-10', 'cifar10')))
  },
  'mflops',
  seeds=None,
  train=False,
  notes=(
    'Ours: 2 × the multiply-adds of every matmul and convolution in one training step '
    "(`train.make_chunk` of the rule's update, its jaxpr; loops × their trip count), per "
    "sample; SPEC §4.7 finds the paper's BP entries are exactly this count (torch.profiler).",
    "XLA count: XLA's cost analysis of the compiled step on this backend, elementwise work "
    'included; it counts a loop body once, so rules with inner loops (the TP feedback steps) '
    'are undercounted there.',
  ),
)

# -- CCL paper Table 3: the 5-layer CNN (`cnn_pool`), test accuracy % (SPEC §1.2) ----------------
T3_SOURCE = 'CCL paper Table 3 (SPEC §1.2)'
CCL_TABLE3 = Table(
  'ccl_table3',
  'CCL paper Table 3: 5-layer CNN test accuracy (%)',
  ('BP', 'CCL'),
  ('CIFAR-10', 'CIFAR-100'),
  {
    ('BP', 'CIFAR-10'): Cell('cifar10_cnn_bp', {}, 87.12, 1.76, T3_SOURCE),
    ('BP', 'CIFAR-100'): Cell('cifar100_cnn_bp', {}, 51.92, 0.48, T3_SOURCE),
    ('CCL', 'CIFAR-10'): Cell('cifar10_ccl', {}, 82.94, 0.53, T3_SOURCE),
    ('CCL', 'CIFAR-100'): Cell('cifar100_cnn_ccl', {}, 56.29, 0.25, T3_SOURCE),
  },
  'accuracy',
  seeds=None,
  notes=('cnn_pool 128-128-256-256-512, crops + flips, cosine schedule, 100 epochs.',),
)

# -- CCL paper §4.4: the STL-10 convolutional autoencoder, test pixel MSE (SPEC §1.3) -------------
AE_SOURCE = 'CCL paper, STL-10 autoencoder (SPEC §1.3)'
CCL_AUTOENCODER = Table(
  'ccl_autoencoder',
  'CCL paper: STL-10 convolutional autoencoder, test pixel MSE',
  ('BP', 'CCL'),
  ('STL-10',),
  {
    ('BP', 'STL-10'): Cell('stl10_ae_bp', {}, 0.0059, 0.0001, AE_SOURCE),
    ('CCL', 'STL-10'): Cell('stl10_ae_ccl', {}, 0.0086, 0.0001, AE_SOURCE),
  },
  'mse',
  seeds=None,
)

# -- Akrout et al. 2019: weight transport, sigmoid MLPs (SPEC §2) ---------------------------------
WT_SOURCE = 'Akrout et al. 2019 reference code logs, 400 epochs (SPEC §2)'
WT = {  # row -> (config suffix, MNIST (acc, angle), CIFAR-10 (acc, angle))
  'BP': ('sigmoid_bp', (98.50, None), (48.18, None)),
  'FA': ('mlp_fa', (97.80, 40.0), (42.96, 46.5)),
  'sign symmetry': ('mlp_sign_symmetry', (None, None), (None, None)),
  'KP': ('mlp_kp', (98.45, 3.6), (47.57, 2.0)),
  'WM': ('mlp_wm', (98.49, 3.8), (46.20, 9.7)),
}
WEIGHT_TRANSPORT = Table(
  'weight_transport',
  'Akrout et al. 2019: weight transport, test accuracy (%) and output-layer weight angle (°)',
  tuple(WT),
  ('MNIST', 'CIFAR-10'),
  {
    (row, column): Cell(
      f'{ds}_{suffix}',
      {},
      pub[0],
      None,
      WT_SOURCE if pub[0] is not None else 'not in the reference logs',
      also={'output_angle': pub[1]} if pub[1] is not None else {},
    )
    for row, (suffix, *pubs) in WT.items()
    for (column, ds), pub in zip((('MNIST', 'mnist'), ('CIFAR-10', 'cifar10')), pubs)
  },
  'accuracy',
  seeds=1,
  also=('output_angle',),
  notes=(
    'Sigmoid MLP 784-500-10 / 3072-1000-10, summed BCE, plain SGD at the reference learning '
    "rates, batch 128, 400 epochs. The angle is the output layer's ∠(Wᵀ, B) at the last epoch.",
  ),
)

# -- Nøkland & Eidnes 2019: local error signals, test ERROR % (SPEC §3) ---------------------------
LL_SOURCE = 'Nøkland & Eidnes 2019 (SPEC §3)'
LL = {  # row -> (config prefix, global / pred / sim / predsim test error %)
  'MNIST MLP': ('mnist_mlp', (0.75, 0.68, 0.80, 0.62)),
  'MNIST VGG8b': ('mnist_vgg8b', (0.26, 0.40, 0.65, 0.31)),
  'Fashion-MNIST MLP': ('fashion_mnist_mlp', (8.37, 8.60, 9.70, 8.54)),
  'Fashion-MNIST VGG8b': ('fashion_mnist_vgg8b', (4.53, 5.66, 5.12, 4.65)),
  'CIFAR-10 MLP': ('cifar10_mlp', (33.56, 32.33, 33.48, 30.93)),
  'CIFAR-10 VGG8b': ('cifar10_vgg8b', (5.99, 8.40, 7.16, 5.58)),
  'CIFAR-10 VGG11b': ('cifar10_vgg11b', (5.56, 8.39, 6.70, 5.30)),
  'CIFAR-100 MLP': ('cifar100_mlp', (62.57, 58.87, 62.46, 56.88)),
  'CIFAR-100 VGG8b': ('cifar100_vgg8b', (26.24, 29.32, 32.64, 24.07)),
}
LL_RULES = {'global (BP)': 'global', 'pred': 'pred', 'sim': 'sim', 'predsim': 'predsim'}
LOCAL_LOSSES = Table(
  'local_losses',
  'Nøkland & Eidnes 2019: local error signals, test error (%)',
  tuple(LL),
  tuple(LL_RULES),
  {
    (row, column): Cell(f'{prefix}_{rule}', {}, values[i], None, LL_SOURCE)
    for row, (prefix, values) in LL.items()
    for i, (column, rule) in enumerate(LL_RULES.items())
  },
  'error',
  seeds=None,
  notes=(
    'Adam 5e-4, lr × 0.25 at 50/75/89/94 % (100 epochs, MNISTs) or 50/75/87.5/93.75 % (400 '
    'epochs, CIFAR), batch 128, crops (and flips); error = 100 − test accuracy.',
  ),
)

# -- smoke: the pipeline end to end in seconds (no published numbers) -----------------------------
SMOKE = Table(
  'smoke',
  'Smoke test: BP and CCL on the embedded digits, 1 epoch, test accuracy (%)',
  ('BP', 'CCL'),
  ('digits',),
  {
    ('BP', 'digits'): Cell('default', {'rule': 'bp', 'num_epochs': 1}, source='none: a smoke test'),
    ('CCL', 'digits'): Cell(
      'default', {'rule': 'ccl', 'num_epochs': 1}, source='none: a smoke test'
    ),
  },
  'accuracy',
  seeds=1,
  notes=('configs/default.py (ELU MLP 64-256-256-10) with the rule overridden, 1 epoch.',),
)

TABLES = {
  t.name: t
  for t in (
    CCL_TABLE1,
    CCL_TABLE2,
    CCL_TABLE3,
    CCL_AUTOENCODER,
    WEIGHT_TRANSPORT,
    LOCAL_LOSSES,
    SMOKE,
  )
}
