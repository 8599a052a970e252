"""Builds the forward and feedback Flax modules a config names."""

from __future__ import annotations

import math

from ccl_jax.errors import UserError
from ccl_jax.models import cnn, mlp

MODELS = ('mlp', 'cnn')


def forward(config, task, local: bool, feedback: bool = False):
  """The forward net; `feedback=True` builds it from feedback-aware layers (FA, KP, WM, sign)."""
  use_bias = bool(config.get('use_bias', False))
  if config.model == 'mlp':
    return mlp.MLP(hidden=tuple(config.hidden), num_classes=task.num_classes,
                   activation=config.activation, output_activation=config.output_activation,
                   weight_init=config.init, local=local, feedback=feedback, use_bias=use_bias)
  if config.model == 'cnn':
    return cnn.CNN(channels=tuple(config.channels), num_classes=task.num_classes,
                   activation=config.activation, output_activation=config.output_activation,
                   weight_init=config.init, local=local, feedback=feedback, use_bias=use_bias)
  raise UserError(f"unknown model '{config.model}'; choose one of {', '.join(MODELS)}")


def feedback(config, task):
  if config.model == 'mlp':
    return mlp.FeedbackMLP(hidden=tuple(config.hidden), input_dim=math.prod(task.image_shape),
                           activation=config.activation, weight_init=config.init)
  raise UserError(f"model '{config.model}' has no feedback twin")
