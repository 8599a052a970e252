"""What FA, sign symmetry, KP and WM share (SPEC §2): a forward net whose layers carry B.

The forward net is built from `layers.FeedbackDense/FeedbackConv`: the task loss's gradient for W
is exact, but the error reaches each layer's input through that layer's B (params['feedback'], in
W's layout) instead of W; B = W is backprop. B has no gradient and never goes through an optimizer:
the rules differ only in how B is set and moved, which each says in a small `Feedback` policy —
`init` (B before the first step) and `apply` (W and B after the forward optimizer's update).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import jax

from ccl_jax import metrics as metrics_lib
from ccl_jax import models, optim
from ccl_jax.rules import base


class Feedback(Protocol):
  """How a rule sets and moves B."""

  def init(self, rng: jax.Array, forward: dict, feedback: dict) -> dict:
    """B before the first step; `feedback` is B's random init (W's initializer, drawn anew)."""

  def apply(self, forward: dict, feedback: dict, updates: dict, state) -> tuple[dict, dict]:
    """(W, B) after a step: `updates` are the forward optimizer's; `state` the step's input."""


class Fixed:
  """B stays at its random init (feedback alignment)."""

  def init(self, rng, forward, feedback):
    del rng, forward
    return feedback

  def apply(self, forward, feedback, updates, state):
    del state
    return optim.apply_updates(forward, updates), feedback


class FeedbackWeights(base.Rule):
  """Task-loss gradients through B; the `Feedback` policy (built from the net) moves B."""

  def __init__(self, config, task, batch_axis, feedback: Callable[[object], Feedback]):
    super().__init__(config, task, batch_axis)
    self.model = models.forward(config, task, local=False, feedback=True)
    self.feedback = feedback(self.model)

  def init_params(self, rng, images):
    model_rng, feedback_rng = jax.random.split(rng)
    variables = self.model.init(model_rng, images)
    forward = variables['params']
    feedback = self.feedback.init(feedback_rng, forward, variables['feedback'])
    return {'forward': forward, 'feedback': feedback}, {}

  def predict(self, params, images, extra=None):
    variables = {'params': params['forward'], 'feedback': params['feedback']}
    return self.model.apply(variables, images)[0]

  def loss(self, forward: dict, feedback: dict, batch: base.Batch):
    out = self.predict({'forward': forward, 'feedback': feedback}, batch['image'])
    loss = base.task_loss(out, batch['label'], self.config.loss)
    return loss, {'loss': loss, 'accuracy': base.accuracy(out, batch['label'])}

  def gradients(self, state, batch, rng):
    feedback = state.params['feedback']
    grad, metrics = jax.grad(self.loss, has_aux=True)(state.params['forward'], feedback, batch)
    # B has no gradient: an empty tree, so no all-zero B-sized tensor is averaged across devices.
    return {'forward': grad, 'feedback': {}}, metrics, state.extra

  def apply_updates(self, params, updates, state):
    forward, feedback = self.feedback.apply(
      params['forward'], params['feedback'], updates['forward'], state
    )
    return {'forward': forward, 'feedback': feedback}

  def analyze(self, state, batch):
    """weight_angle/*, norm_ratio/* for every layer and delta_angle/* for every hidden layer."""
    forward, feedback = state.params['forward'], state.params['feedback']
    out = metrics_lib.weight_metrics(forward, feedback)
    out.update(
      metrics_lib.delta_angles(
        self.model,
        forward,
        feedback,
        batch['image'],
        lambda o: base.task_loss(o, batch['label'], self.config.loss),
      )
    )
    return out
