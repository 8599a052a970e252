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
    self.model = models.forward(config, task, local=False, feedback=True, axis_name=batch_axis.name)
    self.feedback = feedback(self.model)

  def init_params(self, rng, images):
    model_rng, feedback_rng = jax.random.split(rng)
    variables = self.model.init(model_rng, images)
    forward = variables['params']
    feedback = self.feedback.init(feedback_rng, forward, variables['feedback'])
    extra = {'batch_stats': variables['batch_stats']} if 'batch_stats' in variables else {}
    return {'forward': forward, 'feedback': feedback}, extra

  def apply(self, forward: dict, feedback: dict, extra: dict, images, train: bool):
    variables = {'params': forward, 'feedback': feedback}
    (out, _), extra = base.apply_net(self.model, variables, extra, images, train)
    return out, extra

  def predict(self, params, images, extra=None):
    return self.apply(params['forward'], params['feedback'], extra or {}, images, False)[0]

  def loss(self, forward: dict, feedback: dict, extra: dict, batch: base.Batch):
    out, extra = self.apply(forward, feedback, extra, batch['image'], True)
    loss, metrics = base.objective(self.task, out, batch, self.config.loss)
    return loss, (metrics, extra)

  def gradients(self, state, batch, rng):
    feedback = state.params['feedback']
    grad, (metrics, extra) = jax.grad(self.loss, has_aux=True)(
      state.params['forward'], feedback, state.extra, batch
    )
    # B has no gradient: an empty tree, so no all-zero B-sized tensor is averaged across devices.
    return {'forward': grad, 'feedback': {}}, metrics, extra

  def apply_updates(self, params, updates, state):
    forward, feedback = self.feedback.apply(
      params['forward'], params['feedback'], updates['forward'], state
    )
    return {'forward': forward, 'feedback': feedback}

  def analyze(self, state, batch):
    """weight_angle/*, norm_ratio/* for every layer and delta_angle/* for every hidden layer."""
    forward, feedback = state.params['forward'], state.params['feedback']
    out = metrics_lib.weight_metrics(forward, feedback)
    if state.extra or self.task.kind != 'classification':
      return out  # delta angles assume a plain chain of feedback layers with a label loss
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
