"""Feedback alignment (SPEC §2): B fixed at its random init, of W's scale, drawn independently."""

from __future__ import annotations

from ccl_jax.rules import feedback_weights


def make(config, task, batch_axis):
  return feedback_weights.FeedbackWeights(
    config, task, batch_axis, lambda model: feedback_weights.Fixed()
  )
