"""Flax modules for every network, forward nets and their feedback twins, and their registry.

A model module declares its config section (`SETTINGS`, named `SECTION` or the model's name) and
builds its nets from a config: `forward(config, task, local, feedback)` and, where it has one,
the mirrored feedback twin `feedback(config, task)` (CCL).
"""

from __future__ import annotations

from ccl_jax.errors import UserError
from ccl_jax.models import autoencoder, blocks, cnn, mlp, resnet

REGISTRY = {
  'mlp': mlp,  # dense layers; the local-loss rules build it as Linear → BN blocks
  'cnn': cnn,  # the CCL paper's cnn_pool
  'vgg8b': blocks,  # the local-loss rules' VGG block nets (section 'vgg')
  'vgg11b': blocks,
  'ae': autoencoder,  # CCL's convolutional autoencoder (task 'reconstruction', section 'ae')
  'resnet18': resnet,  # residual nets, ImageNet stem (section 'resnet')
  'resnet50': resnet,
  'resnet20': resnet,  # CIFAR stem
  'resnet56': resnet,
}


def task_kind(name: str) -> str:
  """What model `name` is trained and scored for: 'classification' (logits, accuracy) or
  'reconstruction' (the input image, pixel MSE); a model module says so in `TASK`."""
  return getattr(REGISTRY[name], 'TASK', 'classification')


def forward(config, task, local: bool, feedback: bool = False, axis_name: str | None = None):
  """The forward net of `config.model`; `feedback=True` builds it from feedback-aware layers (FA,
  KP, WM, sign symmetry); `local=True` cuts every layer's input with stop_gradient; `axis_name`
  (the data-parallel axis) gives nets with BatchNorm the global batch's statistics."""
  module = REGISTRY[config.model]
  if not hasattr(module, 'forward'):
    raise UserError(
      f"model '{config.model}' is built for the local-loss rules (global, pred, "
      f"sim, predsim), not rule '{config.rule}'"
    )
  return placed(module.forward(config, task, local=local, feedback=feedback), config, axis_name)


def feedback(config, task, axis_name: str | None = None):
  """The mirrored feedback twin of `config.model` (CCL)."""
  module = REGISTRY[config.model]
  if not hasattr(module, 'feedback'):
    raise UserError(f"model '{config.model}' has no feedback twin for rule '{config.rule}'")
  return placed(module.feedback(config, task), config, axis_name)


def placed(net, config, axis_name: str | None):
  """`net` with the run's placement fields where it has them: the data-parallel `axis_name` and
  `conv_impl` (how its convs and pools are computed, `config.conv_impl`)."""
  fields = {'axis_name': axis_name, 'conv_impl': config.get('conv_impl', 'auto')}
  fields = {k: v for k, v in fields.items() if v is not None and hasattr(net, k)}
  return net.clone(**fields) if fields else net
