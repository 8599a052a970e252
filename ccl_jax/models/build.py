"""Builds the forward and feedback Flax modules a config names."""

from __future__ import annotations

import math

import jax.numpy as jnp

from ccl_jax.errors import UserError
from ccl_jax.models import cnn, mlp

MODELS = ('mlp', 'cnn', 'vgg8b', 'vgg11b')  # vgg*: the local-loss rules' block nets (blocks.py)


def compute_dtype(config):
  """None (float32) or the config's `compute_dtype`, e.g. bfloat16 on accelerators."""
  name = config.get('compute_dtype', 'float32')
  return None if name == 'float32' else jnp.dtype(name)


def forward(config, task, local: bool, feedback: bool = False):
  """The forward net; `feedback=True` builds it from feedback-aware layers (FA, KP, WM, sign)."""
  common = dict(num_classes=task.num_classes, activation=config.activation,
                output_activation=config.output_activation, weight_init=config.init,
                local=local, feedback=feedback, use_bias=bool(config.get('use_bias', False)),
                dtype=compute_dtype(config))
  if config.model == 'mlp':
    return mlp.MLP(hidden=tuple(config.hidden), **common)
  if config.model == 'cnn':
    return cnn.CNN(channels=tuple(config.channels), **common)
  if config.model in MODELS:
    raise UserError(f"model '{config.model}' is built for the local-loss rules (global, pred, sim, "
                    f"predsim), not rule '{config.rule}'")
  raise UserError(f"unknown model '{config.model}'; choose one of {', '.join(MODELS)}")


def feedback(config, task):
  if config.model == 'mlp':
    return mlp.FeedbackMLP(hidden=tuple(config.hidden), input_dim=math.prod(task.image_shape),
                           activation=config.activation, weight_init=config.init,
                           dtype=compute_dtype(config))
  if config.model == 'cnn':
    return cnn.FeedbackCNN(channels=tuple(config.channels), image_shape=tuple(task.image_shape),
                           activation=config.activation, weight_init=config.init,
                           dtype=compute_dtype(config))
  raise UserError(f"model '{config.model}' has no feedback twin")
