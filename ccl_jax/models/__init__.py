"""Flax modules for every network, forward nets and their feedback twins, and their registry.

A model module declares its config section (`SETTINGS`, named `SECTION` or the model's name) and
builds its nets from a config: `forward(config, task, local, feedback)` and, where it has one,
the mirrored feedback twin `feedback(config, task)` (CCL).
"""

from __future__ import annotations

from ccl_jax.errors import UserError
from ccl_jax.models import blocks, cnn, mlp

REGISTRY = {
  'mlp': mlp,  # dense layers; the local-loss rules build it as Linear → BN blocks
  'cnn': cnn,  # the CCL paper's cnn_pool
  'vgg8b': blocks,  # the local-loss rules' VGG block nets (section 'vgg')
  'vgg11b': blocks,
}


def forward(config, task, local: bool, feedback: bool = False):
  """The forward net of `config.model`; `feedback=True` builds it from feedback-aware layers (FA,
  KP, WM, sign symmetry); `local=True` cuts every layer's input with stop_gradient."""
  module = REGISTRY[config.model]
  if not hasattr(module, 'forward'):
    raise UserError(
      f"model '{config.model}' is built for the local-loss rules (global, pred, "
      f"sim, predsim), not rule '{config.rule}'"
    )
  return module.forward(config, task, local=local, feedback=feedback)


def feedback(config, task):
  """The mirrored feedback twin of `config.model` (CCL)."""
  module = REGISTRY[config.model]
  if not hasattr(module, 'feedback'):
    raise UserError(f"model '{config.model}' has no feedback twin for rule '{config.rule}'")
  return module.feedback(config, task)
