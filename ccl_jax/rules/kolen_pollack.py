"""Kolen-Pollack (SPEC §2): B receives exactly W's update, and the same decay.

    W ← κ·W + u,   B ← κ·B + u,   u = the forward optimizer's update (−η∇W for plain SGD)

(B has W's layout, so u is added as is: nothing is transposed), and W − B shrinks as κ^t whatever
the optimizer (momentum, clipping, schedules: B gets the same u).
κ = config.kp_decay (1 = the reference code's default: no decay). Only kernels with a B decay;
use kp_decay rather than optimizer.forward.weight_decay, which would decay W but not B.
"""

from __future__ import annotations

import jax
import optax

from ccl_jax import metrics as metrics_lib
from ccl_jax.errors import UserError
from ccl_jax.rules.feedback_alignment import FeedbackRule


class KolenPollack(FeedbackRule):
  name = 'kp'

  def __init__(self, config, task, axis_name=None):
    super().__init__(config, task, axis_name)
    if config.optimizer.forward.weight_decay:
      raise UserError(f'rule kp decays W and B together by config.kp_decay; set '
                      f'config.optimizer.forward.weight_decay=0 (it is '
                      f'{config.optimizer.forward.weight_decay}) and use config.kp_decay instead')
    if not 0.0 < config.kp_decay <= 1.0:
      raise UserError(f'config.kp_decay={config.kp_decay} must be in (0, 1]')

  def step_weights(self, params, updates):
    kappa = self.config.kp_decay
    feedback = params['feedback']
    paired = set(metrics_lib.leaves_by_path(feedback))

    def decay(path, w):
      return kappa * w if metrics_lib.names(path) in paired else w

    forward = optax.apply_updates(
        jax.tree_util.tree_map_with_path(decay, params['forward']), updates)
    feedback = jax.tree_util.tree_map_with_path(
        lambda path, b: kappa * b + metrics_lib.lookup(updates, metrics_lib.names(path)), feedback)
    return forward, feedback
