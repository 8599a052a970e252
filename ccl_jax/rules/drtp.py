"""DRTP, direct random target projection (Frenkel et al. 2021; SPEC §4.2): DFA with the output
error replaced by the one-hot target, so each hidden layer learns from its label alone.

    δ_l = (y* B_l) ⊙ φ'(a_l)   (y* over the batch size: batch-mean updates, as every rule here)

B_l ~ N(mean, std²) (the CCL paper's grid: mean ∈ {0, 0.05}, std ∈ {0.01, 0.03, 0.1, 0.3}),
fixed. The output layer takes its own local error. No hidden update depends on the output or on
any layer above it.
"""

from __future__ import annotations

import math

import jax

from ccl_jax import config as config_lib
from ccl_jax.config import Setting
from ccl_jax.rules import direct_feedback

SETTINGS = {
  'mean': Setting(0.0, 'B_l ~ N(mean, std²)'),
  'std': config_lib.positive('B_l ~ N(mean, std²)', 0.1),
}


def target_signal(outputs, labels, loss):
  """y* / batch size: the one-hot target in place of DFA's output error."""
  del loss
  return jax.nn.one_hot(labels, outputs.shape[-1]) / outputs.shape[0]


def gaussian_feedback(rng, widths, out_dim: int, mean: float, std: float) -> dict:
  return {
    f'layer_{l + 1}': {
      'kernel': mean
      + std * jax.random.normal(jax.random.fold_in(rng, l), (out_dim, math.prod(shape)))
    }
    for l, shape in enumerate(widths)
  }


def make(config, task, batch_axis):
  mean, std = float(config.drtp.mean), float(config.drtp.std)
  return direct_feedback.DirectFeedback(
    config,
    task,
    batch_axis,
    target_signal,
    lambda rng, widths, k: gaussian_feedback(rng, widths, k, mean, std),
  )
