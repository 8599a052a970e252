"""Shared config defaults and validation; every `configs/*.py` starts from `base()`."""

from __future__ import annotations

import ml_collections

from ccl_jax.errors import UserError


def optimizer(lr: float = 1.0, momentum: float = 0.0, weight_decay: float = 0.0,
              clip: float = 1.0, name: str = 'sgd') -> ml_collections.ConfigDict:
  """One tree's optimizer settings (see `optim.make`)."""
  return ml_collections.ConfigDict(dict(
      name=name, lr=lr, momentum=momentum, weight_decay=weight_decay, clip=clip,
      warmup_steps=0, schedule='constant', min_lr=0.0, b1=0.9, b2=0.999,
      grad_centralization=False))


def base() -> ml_collections.ConfigDict:
  """Defaults shared by all experiments: the CCL MLP on the embedded digits set."""
  c = ml_collections.ConfigDict()
  c.rule = 'ccl'
  c.model = 'mlp'
  c.hidden = (256, 256)        # hidden widths of the MLP
  c.activation = 'elu'
  c.output_activation = 'none'  # 'sigmoid' for the weight-transport reference MLP
  c.loss = 'ce'                # 'ce' or 'bce' (summed binary cross-entropy on sigmoid outputs)
  c.init = 'torch'             # 'torch' (U(±1/sqrt(fan_in))) or 'glorot_normal' (N(0, 1/(fan_in+fan_out)))
  c.dataset = 'digits'
  c.data_dir = ''              # tfds data_dir; '' = tfds default (~/tensorflow_datasets)
  c.cache_dir = '~/.cache/ccl_jax'  # decoded splits are cached here as .npz; '' = no cache
  c.batch_size = 64
  c.num_epochs = 20
  c.train_subset = 0           # use only the first N training examples; 0 = all
  c.val_fraction = 0.1
  c.shuffle = True
  c.seed = 2023
  c.loss_scale_c = 0.5         # CCL: weight of the layer-wise prototype losses
  c.optimizer = ml_collections.ConfigDict(dict(forward=optimizer(), feedback=optimizer()))
  c.parallel = 'none'          # 'none', 'pmap' or 'shard_map'
  c.steps_per_call = 0         # training steps fused into one compiled call; 0 = one epoch
  c.eval_batch_size = 1000
  c.checkpoint_every_epochs = 1
  c.checkpoint_every_steps = 0  # also save mid-epoch every N steps (0 = only at epoch ends)
  c.keep_checkpoints = 2
  c.force_retrain = False      # start over in a finished workdir (old files are moved aside)
  c.analysis_batch_size = 256  # batch used for the alignment metrics at each evaluation
  c.progress = True
  return c


RULE_LR_KEYS = ('forward', 'feedback')
PARALLEL = ('none', 'pmap', 'shard_map')


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises UserError naming the first bad value."""
  from ccl_jax import data, rules  # late import: avoid cycles
  if c.rule not in rules.names():
    raise UserError(f"unknown rule '{c.rule}'; choose one of {', '.join(rules.names())}")
  if c.dataset not in data.DATASETS:
    raise UserError(f"unknown dataset '{c.dataset}'; choose one of {', '.join(data.DATASETS)}")
  if c.parallel not in PARALLEL:
    raise UserError(f"unknown parallel mode '{c.parallel}'; choose one of {', '.join(PARALLEL)}")
  for key in ('batch_size', 'num_epochs', 'eval_batch_size'):
    if int(c[key]) <= 0:
      raise UserError(f'config.{key}={c[key]} must be positive')
  for tree in RULE_LR_KEYS:
    opt = c.optimizer[tree]
    if not opt.lr > 0:
      raise UserError(f'config.optimizer.{tree}.lr={opt.lr} must be positive')
    if opt.name not in ('sgd', 'adam'):
      raise UserError(f"config.optimizer.{tree}.name='{opt.name}' must be 'sgd' or 'adam'")
    if opt.schedule not in ('constant', 'cosine'):
      raise UserError(f"config.optimizer.{tree}.schedule='{opt.schedule}' must be 'constant' or 'cosine'")
  if not 0.0 <= c.val_fraction < 1.0:
    raise UserError(f'config.val_fraction={c.val_fraction} must be in [0, 1)')


MLP_HIDDEN = {'mnist': (256,) * 5, 'fashion_mnist': (256,) * 5,
              'cifar10': (1024,) * 3, 'cifar100': (1024,) * 3}


def reference_mlp(dataset: str, rule: str) -> ml_collections.ConfigDict:
  """SPEC §1.1: the CCL paper's ELU MLP and its settings (SGD lr 1/1, clip 1, batch 256, 100 epochs)."""
  c = base()
  c.rule = rule
  c.dataset = dataset
  c.hidden = MLP_HIDDEN[dataset]
  c.batch_size = 256
  c.num_epochs = 100
  c.seed = 2023
  c.optimizer.forward = optimizer(lr=1.0, clip=1.0)
  c.optimizer.feedback = optimizer(lr=1.0, clip=1.0)
  return c
