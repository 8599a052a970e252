"""Kolen-Pollack (SPEC §2): B receives exactly W's update, and the same decay.

    W ← κ·W + u,   B ← κ·B + u,   u = the forward optimizer's update (−η∇W for plain SGD)

(B has W's layout, so u is added as is: nothing is transposed), and W − B shrinks as κ^t whatever
the optimizer (momentum, clipping, schedules: B gets the same u). κ = `kp.decay` (1 = the reference
code's default: no decay). Only kernels with a B decay; use kp.decay rather than
optimizer.forward.weight_decay, which would decay W but not B.
"""

from __future__ import annotations

import jax

from ccl_jax import metrics as metrics_lib
from ccl_jax import optim
from ccl_jax.config import Setting
from ccl_jax.errors import UserError
from ccl_jax.rules import feedback_weights

SETTINGS = {
  'decay': Setting(
    1.0,
    'κ in W ← κW + u, B ← κB + u (1 = no decay, as the reference)',
    check=lambda v: 0 < v <= 1,
    must='in (0, 1]',
  )
}


def check(config) -> None:
  if config.optimizer.forward.weight_decay:
    raise UserError(
      f'rule kp decays W and B together by config.kp.decay; set '
      f'config.optimizer.forward.weight_decay=0 (it is '
      f'{config.optimizer.forward.weight_decay}) and use config.kp.decay instead'
    )


class KolenPollack(feedback_weights.Fixed):
  def __init__(self, decay: float):
    self.decay = float(decay)

  def apply(self, forward, feedback, updates, state):
    del state
    kappa = self.decay
    paired = set(metrics_lib.leaves_by_path(feedback))

    def decay(path, w):
      return kappa * w if metrics_lib.names(path) in paired else w

    forward = optim.apply_updates(jax.tree_util.tree_map_with_path(decay, forward), updates)
    feedback = jax.tree_util.tree_map_with_path(
      lambda path, b: kappa * b + metrics_lib.lookup(updates, metrics_lib.names(path)), feedback
    )
    return forward, feedback


def make(config, task, batch_axis):
  decay = config.kp.decay
  return feedback_weights.FeedbackWeights(
    config, task, batch_axis, lambda model: KolenPollack(decay)
  )
