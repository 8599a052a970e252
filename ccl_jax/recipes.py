"""Training recipes that several configs share (each config names its rule and net)."""

from __future__ import annotations

import ml_collections

from ccl_jax import config as config_lib


def akrout_imagenet(rule: str, model: str) -> ml_collections.ConfigDict:
  """Akrout et al. 2019's ImageNet recipe for `rule` on a ResNet (`model`: resnet18, resnet50).

  They trained torchvision ResNets with the PyTorch ImageNet example: SGD, momentum 0.9, lr 0.1
  for batch 256, ×0.1 every 30 of 90 epochs, weight decay 1e-4 on every parameter, random-resized
  crop 224 + flip; test: the centre 224 crop of the image resized to 256. Assumptions where the
  paper is silent are marked below; the rules share BP's hyperparameters (the paper compares them
  under one recipe).
  """
  c = config_lib.base()
  c.rule = rule
  c.dataset = 'imagenet2012'
  c.model = model
  c.pipeline = 'stream'
  c.parallel = 'shard_map'  # every local device (and host), data-parallel; BN over the batch
  if rule == 'bp':
    c.compute_dtype = 'bfloat16'  # bf16 convs, f32 parameters (FA/SS/KP/WM: float32 only)
  c.resnet.width_mult = 1.0
  c.resnet.zero_init_residual = False  # torchvision's default, which the example used
  c.batch_size = 256
  c.num_epochs = 90
  c.data.resized_crop = 224  # train: scale 0.08-1, ratio 3/4-4/3; test: centre 87.5 % → 224
  c.data.flip = True
  c.data.val_fraction = 0.01  # assumption: 12.8k training images held out for model selection
  c.data.workers = 16  # JPEG decode + crop processes per host; raise it if devices wait
  c.data.threads = 8  # per process and worker; evaluation decodes in these threads only
  c.data.prefetch = 2
  weight_decay = 0.0001
  if rule == 'kp':
    # KP decays W and B together (kp.decay) instead of weight decay. Assumption: a constant
    # κ = 1 − lr·wd = 0.99999 (as configs/cifar10_resnet20_kp.py): PyTorch's decay, coupled with
    # momentum 0.9, shrinks weights by ~lr·wd/(1 − 0.9) = 1e-4, 1e-5, 1e-6 a step in the three
    # lr phases; 1e-5 is their geometric mean. Biases and BN parameters are not decayed under KP.
    c.kp.decay = 0.99999
    weight_decay = 0.0
  if rule == 'wm':
    c.wm.keep_norm = True  # B keeps its norm: summed conv mirror steps would grow it each step
    # Mirror settings: the package defaults, the reference code's (η_m 0.01, noise U(±0.05),
    # mirror batch 128, no decay on B, one epoch's worth of mirror steps first). Assumption: the
    # same on ImageNet (the paper's ImageNet mirror values were not available here).
  c.optimizer.forward.update(
    name='sgd',
    lr=0.1,
    momentum=0.9,
    weight_decay=weight_decay,
    clip=0.0,
    schedule='step',
    milestones=(1 / 3, 2 / 3),  # epochs 30 and 60
    decay_factor=0.1,
  )
  c.steps_per_call = 4
  c.eval_batch_size = 500
  c.checkpoint_every_steps = 1000  # ~1/5 epoch: a preempted run loses little
  return c
