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
      milestones=(0.5, 0.75, 0.89, 0.94), decay_factor=0.25,
      grad_centralization=False))


def base() -> ml_collections.ConfigDict:
  """Defaults shared by all experiments: the CCL MLP on the embedded digits set."""
  c = ml_collections.ConfigDict()
  c.rule = 'ccl'
  c.model = 'mlp'
  c.hidden = (256, 256)        # hidden widths of the MLP
  c.channels = (128, 128, 256, 256, 512)  # conv widths of model='cnn' (one block per entry)
  c.use_bias = False           # biases in the MLP / CNN layers
  c.activation = 'elu'
  c.output_activation = 'none'  # 'sigmoid' for the weight-transport reference MLP
  c.loss = 'ce'                # 'ce' or 'bce' (summed binary cross-entropy on sigmoid outputs)
  c.init = 'torch'             # 'torch' (U(±1/sqrt(fan_in))) or 'glorot_normal' (N(0, 1/(fan_in+fan_out)))
  c.dataset = 'digits'
  c.normalize = 'mean_std'     # 'mean_std' (the dataset's per-channel stats), 'imagenet' or 'unit' (pixels/255)
  c.data_dir = ''              # tfds data_dir; '' = tfds default (~/tensorflow_datasets)
  c.cache_dir = '~/.cache/ccl_jax'  # decoded splits are cached here as .npz; '' = no cache
  c.batch_size = 64
  c.num_epochs = 20
  c.train_subset = 0           # use only the first N training examples; 0 = all
  c.augment_pad = 0            # on-device random crop: pad each side by this, crop back (0 = off)
  c.augment_flip = False       # on-device random horizontal flip
  c.augment_padding = 'zero'   # crop padding: 'zero' (the channel mean) or 'edge'
  c.val_fraction = 0.1
  c.shuffle = True
  c.seed = 2023
  c.loss_scale_c = 0.5         # CCL: weight of the layer-wise prototype losses
  c.ccl_self_scale = 0.5       # CCL on the CNN: weight s of the ĤĤᵀ and ĜĜᵀ decorrelation terms
  c.loss_warmup_steps = 0      # CCL on the CNN: the loss scaled by step/N over the first N steps
  c.ccl_filter_target = 0.0    # CCL on the CNN: samples with p(true) above this skip the pair losses (0 = off)
  # FA / sign symmetry / KP / WM (SPEC §2); the feedback optimizer is not used by these rules.
  c.sign_scale = 0.0           # sign symmetry: B = sign(W)·s; s = this, or mean|W| per layer if 0
  c.kp_decay = 1.0             # KP: κ in W ← κW − η∇W, B ← κB − η∇W (1 = no decay, as the reference)
  c.wm_lr = 0.01               # WM: η_m in B += η_m · x yᵀ (summed over the mirror batch)
  c.wm_noise = 0.05            # WM: mirror input x ~ U(−a, a)
  c.wm_batch = 128             # WM: mirror batch size
  c.wm_decay = 0.0             # WM: B ← (1 − λ)·B before each mirror step (0 = none, as the reference)
  c.wm_init_steps = -1         # WM: mirror steps before training; −1 = one epoch's worth of batches
  # Local error signals (SPEC §3): rules global, pred, sim, predsim on models mlp, vgg8b, vgg11b.
  c.dropout = 0.0              # dropout after every block (local losses read the block before it)
  c.bio = False                # the 'bio' variants: fixed random label codes, FA pred heads
  c.bio_code_size = 128        # bio: size of the projected label code
  c.local_beta = -1.0          # predsim's β in (1−β)·pred + β·sim; −1 = 0.99 (0.01 with bio)
  c.dim_in_decoder = 2048      # conv blocks: pred head input is average-pooled down to ≤ this
  c.feat_mult = 1.0            # vgg8b/vgg11b: conv widths × this
  c.optimizer = ml_collections.ConfigDict(dict(forward=optimizer(), feedback=optimizer()))
  c.parallel = 'none'          # 'none', 'pmap' or 'shard_map'
  c.steps_per_call = 0         # training steps fused into one compiled call; 0 = one epoch
  c.compute_dtype = 'float32'  # 'bfloat16': bf16 matmuls with float32 parameters (accelerators)
  c.scan_unroll = 1            # lax.scan unroll of those steps; 0 = inline them all (conv nets on CPU)
  c.eval_batch_size = 1000
  c.checkpoint_every_epochs = 1
  c.checkpoint_every_steps = 0  # also save mid-epoch every N steps (0 = only at epoch ends)
  c.keep_checkpoints = 2
  c.force_retrain = False      # start over in a finished workdir (old files are moved aside)
  c.analysis_batch_size = 256  # batch used for the alignment metrics at each evaluation
  c.progress = True
  return c


PARALLEL = ('none', 'pmap', 'shard_map')


def _choice(c, key: str, options) -> None:
  if c[key] not in options:
    raise UserError(f"config.{key}='{c[key]}' is not one of {', '.join(map(str, options))}")


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises UserError naming the first bad value."""
  from ccl_jax import data, rules  # late import: avoid cycles
  from ccl_jax.models import build, mlp
  from ccl_jax.rules.base import LOSSES, TREES
  if c.rule not in rules.names():
    raise UserError(f"unknown rule '{c.rule}'; choose one of {', '.join(rules.names())}")
  if c.dataset not in data.DATASETS:
    raise UserError(f"unknown dataset '{c.dataset}'; choose one of {', '.join(data.DATASETS)}")
  _choice(c, 'model', build.MODELS)
  _choice(c, 'parallel', PARALLEL)
  _choice(c, 'activation', tuple(mlp.ACTIVATIONS))
  _choice(c, 'output_activation', tuple(mlp.ACTIVATIONS))
  _choice(c, 'init', mlp.INITS)
  _choice(c, 'loss', LOSSES)
  _choice(c, 'normalize', ('mean_std', 'unit', 'imagenet'))
  if int(c.loss_warmup_steps) < 0 or (c.loss_warmup_steps and (c.rule, c.model) != ('ccl', 'cnn')):
    raise UserError(f'config.loss_warmup_steps={c.loss_warmup_steps} must be >= 0, and is used '
                    f"by rule 'ccl' on model 'cnn' only")
  if not 0.0 <= c.ccl_filter_target < 1.0 or (c.ccl_filter_target
                                             and (c.rule, c.model) != ('ccl', 'cnn')):
    raise UserError(f'config.ccl_filter_target={c.ccl_filter_target} must be in [0, 1), and is '
                    f"used by rule 'ccl' on model 'cnn' only")
  _choice(c, 'compute_dtype', ('float32', 'bfloat16'))
  _choice(c, 'augment_padding', ('zero', 'edge'))
  if c.compute_dtype != 'float32' and c.rule not in ('bp', 'ccl'):
    raise UserError(f"config.compute_dtype='{c.compute_dtype}' is supported by rules bp and ccl "
                    f"only, not '{c.rule}' (its feedback layers compute in float32)")
  for key in ('batch_size', 'num_epochs', 'eval_batch_size', 'checkpoint_every_epochs',
              'keep_checkpoints', 'analysis_batch_size'):
    if int(c[key]) <= 0:
      raise UserError(f'config.{key}={c[key]} must be positive')
  for key in ('train_subset', 'steps_per_call', 'scan_unroll', 'checkpoint_every_steps',
              'augment_pad'):
    if int(c[key]) < 0:
      raise UserError(f'config.{key}={c[key]} must be >= 0')
  for key, widths in (('hidden', c.hidden), ('channels', c.channels)):
    if not widths or any(int(w) <= 0 for w in widths):
      raise UserError(f'config.{key}={tuple(widths)} must be a non-empty list of positive widths')
  for tree in TREES:
    opt = c.optimizer[tree]
    if not opt.lr > 0:
      raise UserError(f'config.optimizer.{tree}.lr={opt.lr} must be positive')
    if opt.name not in ('sgd', 'adam'):
      raise UserError(f"config.optimizer.{tree}.name='{opt.name}' must be 'sgd' or 'adam'")
    if opt.schedule not in ('constant', 'cosine', 'step'):
      raise UserError(f"config.optimizer.{tree}.schedule='{opt.schedule}' must be 'constant', "
                      f"'cosine' or 'step'")
    if opt.schedule == 'step' and not all(0 < float(m) < 1 for m in opt.milestones):
      raise UserError(f'config.optimizer.{tree}.milestones={tuple(opt.milestones)} must be '
                      f'fractions of the run in (0, 1)')
  if not 0.0 <= c.dropout < 1.0:
    raise UserError(f'config.dropout={c.dropout} must be in [0, 1)')
  if not (0.0 <= c.local_beta <= 1.0 or c.local_beta == -1):
    raise UserError(f'config.local_beta={c.local_beta} must be in [0, 1] (or -1 for the default)')
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


SIGMOID_MLP_HIDDEN = {'mnist': (500,), 'fashion_mnist': (500,), 'cifar10': (1000,),
                      'cifar100': (1000,), 'digits': (64,)}
SIGMOID_MLP_LR = {'bp': 0.2, 'fa': 0.2, 'sign_symmetry': 0.2, 'wm': 0.05, 'kp': 0.3}


def reference_sigmoid_mlp(dataset: str, rule: str) -> ml_collections.ConfigDict:
  """SPEC §2: the weight-transport paper's sigmoid MLP (one hidden layer, sigmoid outputs, summed
  BCE, N(0, 1/(fan_in+fan_out)) init, no biases, plain SGD, batch 128, 400 epochs, no shuffling,
  pixels/255) with the reference learning rates (sign symmetry, not in the reference, uses FA's)."""
  c = base()
  c.rule = rule
  c.dataset = dataset
  c.model = 'mlp'
  c.hidden = SIGMOID_MLP_HIDDEN[dataset]
  c.activation = 'sigmoid'
  c.output_activation = 'sigmoid'
  c.loss = 'bce'
  c.init = 'glorot_normal'
  c.use_bias = False
  c.normalize = 'unit'
  c.shuffle = False
  c.batch_size = 128
  c.num_epochs = 400
  c.seed = 2023
  lr = SIGMOID_MLP_LR[rule]
  c.optimizer.forward = optimizer(lr=lr, clip=0.0)
  c.optimizer.feedback = optimizer(lr=lr, clip=0.0)  # unused by fa/sign/kp/wm (B has its own rule)
  return c


def _cnn(dataset: str, rule: str, channels: tuple[int, ...]) -> ml_collections.ConfigDict:
  c = base()
  c.rule, c.dataset, c.model, c.channels, c.activation = rule, dataset, 'cnn', channels, 'elu'
  c.steps_per_call, c.scan_unroll = 8, 0  # inlined steps: XLA:CPU convs are slow inside loops
  return c


def small_cnn(dataset: str, rule: str) -> ml_collections.ConfigDict:
  """A narrow `cnn_pool` body (SPEC §1.2: 5 × [Conv3×3 → ELU → MaxPool 2] → Dense) for quick
  conv-layer runs of the feedback-weight rules: SGD with momentum, batch 128, 2 epochs."""
  c = _cnn(dataset, rule, (8, 16, 16, 32, 32))
  c.batch_size = 128
  c.num_epochs = 2
  c.optimizer.forward = optimizer(lr=0.02, momentum=0.9, clip=1.0)
  c.optimizer.feedback = optimizer(lr=0.02, momentum=0.9, clip=1.0)  # unused by fa/sign/kp/wm
  return c


LOCAL_MLP_HIDDEN = {'mnist': (1024,) * 3, 'fashion_mnist': (1024,) * 3, 'digits': (256,) * 3,
                    'cifar10': (3000,) * 3, 'cifar100': (3000,) * 3}


def local_losses(dataset: str, rule: str, model: str = 'mlp', bio: bool = False,
                 feat_mult: float = 1.0) -> ml_collections.ConfigDict:
  """SPEC §3: Nøkland & Eidnes' blocks (BN, ReLU — LeakyReLU 0.01 for sim/predsim), Adam lr 5e-4
  (3e-4 for nets widened by feat_mult > 1) without clipping, ×0.25 at 50/75/89/94 % of 100 epochs
  (MNISTs) or 50/75/87.5/93.75 % of 400 (CIFAR), batch 128; random crops (pad 2 for the MNISTs,
  4 for CIFAR) and flips (Fashion-MNIST, CIFAR) on device; dropout 0.1 (CIFAR VGG: 0.2; bio: 0.05).
  As everywhere in this package, 10 % of the training set is held out for model selection."""
  c = base()
  c.rule = rule
  c.dataset = dataset
  c.model = model
  c.hidden = LOCAL_MLP_HIDDEN[dataset]
  c.activation = 'leaky_relu' if rule in ('sim', 'predsim') else 'relu'
  c.batch_size = 128
  c.num_epochs = 100
  c.seed = 2023
  c.bio = bio
  c.feat_mult = feat_mult
  c.dim_in_decoder = 1024 if dataset in ('mnist', 'fashion_mnist') else 2048
  cifar = dataset.startswith('cifar')
  c.dropout = 0.05 if bio else 0.2 if cifar and model != 'mlp' else 0.1
  wide = feat_mult > 1
  c.augment_pad = 2 if dataset in ('mnist', 'fashion_mnist') else 4 if cifar else 0
  c.augment_flip = dataset in ('fashion_mnist', 'cifar10', 'cifar100')
  c.optimizer.forward = optimizer(name='adam', lr=3e-4 if wide else 5e-4, clip=0.0)
  c.optimizer.forward.schedule = 'step'
  if cifar:
    c.num_epochs = 400
    c.optimizer.forward.milestones = (0.5, 0.75, 0.875, 0.9375)
  c.optimizer.feedback = optimizer(name='adam', lr=5e-4, clip=0.0)  # unused: no feedback tree
  return c


def reference_cnn(dataset: str, rule: str) -> ml_collections.ConfigDict:
  """SPEC §1.2: the CCL paper's `cnn_pool` (5 × [Conv3×3 → ELU → MaxPool 2], channels
  128-128-256-256-512, Linear 512→K, no biases), edge-padded crops of 4 and flips on device.
  CCL: SGD lr 1/1, momentum 0.5, wd 1e-6, gradient centralisation, clip 1, batch 128, a 100-step
  loss warm-up, cosine to 0.001 over 100 epochs (per step, not per epoch). BP: SGD lr 0.03,
  momentum 0.5, wd 1e-5, lr warm-up 200, batch 256, cosine over 100 epochs. ImageNet mean/std
  normalisation. The reference's optional `filter_target` is `ccl_filter_target` (off)."""
  c = _cnn(dataset, rule, (128, 128, 256, 256, 512))
  c.num_epochs = 100
  c.seed = 2023
  c.augment_pad, c.augment_flip, c.augment_padding = 4, True, 'edge'
  c.normalize = 'imagenet'
  if rule == 'bp':
    c.batch_size = 256
    opt = optimizer(lr=0.03, momentum=0.5, weight_decay=1e-5, clip=0.0)
    opt.warmup_steps = 200
  else:
    c.batch_size = 128
    c.loss_scale_c = 1.0
    c.loss_warmup_steps = 100
    opt = optimizer(lr=1.0, momentum=0.5, weight_decay=1e-6, clip=1.0)
    opt.grad_centralization = True
  opt.schedule, opt.min_lr = 'cosine', 0.001 if rule != 'bp' else 0.0
  c.optimizer.forward = opt
  c.optimizer.feedback = ml_collections.ConfigDict(opt.to_dict())
  return c
