"""Sign symmetry (SPEC §2): B = sign(W)·s in W's layout, recomputed before the first step and after
every step; s = `sign_symmetry.scale`, or the layer's mean |W| when it is 0 (B has W's scale)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ccl_jax import metrics as metrics_lib
from ccl_jax import optim
from ccl_jax.config import Setting
from ccl_jax.rules import feedback_weights

SETTINGS = {
  'scale': Setting(
    0.0, "B = sign(W)·scale; 0 = the layer's mean |W|", check=lambda v: v >= 0, must='>= 0'
  )
}


class SignFeedback:
  def __init__(self, scale: float):
    self.scale = float(scale)

  def signs(self, forward: dict, feedback: dict) -> dict:
    def one(path, _):
      w = jax.lax.stop_gradient(metrics_lib.lookup(forward, metrics_lib.names(path)))
      return jnp.sign(w) * (self.scale or jnp.mean(jnp.abs(w)))

    return jax.tree_util.tree_map_with_path(one, feedback)

  def init(self, rng, forward, feedback):
    del rng
    return self.signs(forward, feedback)

  def apply(self, forward, feedback, updates, state):
    del state
    forward = optim.apply_updates(forward, updates)
    return forward, self.signs(forward, feedback)


def make(config, task, batch_axis):
  scale = config.sign_symmetry.scale
  return feedback_weights.FeedbackWeights(
    config, task, batch_axis, lambda model: SignFeedback(scale)
  )
