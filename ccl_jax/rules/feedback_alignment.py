"""Feedback alignment and sign symmetry (SPEC §2), and the base every feedback-weight rule shares.

The forward net is built from `layers.FeedbackDense/FeedbackConv`: the task loss's gradient for W
is exact, but the error reaches each layer's input through that layer's B (params['feedback'])
instead of W (B has W's layout; B = W is backprop). Rules differ only in how B is set and moved, through three hooks:
`init_feedback` (before the first step), `step_weights` (applies the forward update; KP also moves
B there) and `post_update` (after each step; sign symmetry, WM). B never goes through the
feedback optimizer: it has no gradient and only the forward optimizer is applied.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ccl_jax import metrics as metrics_lib
from ccl_jax.models import build
from ccl_jax.rules import base
from ccl_jax.state import TrainState


class FeedbackRule(base.Rule):
  """FA: B fixed at its random init (W's initializer, same scale, drawn independently)."""
  name = 'fa'

  def __init__(self, config, task, axis_name=None):
    super().__init__(config, task, axis_name)
    self.model = build.forward(config, task, local=False, feedback=True)

  # -- hooks --------------------------------------------------------------------------------------
  def init_feedback(self, rng: jax.Array, forward: dict, feedback: dict) -> dict:
    """B before the first step; `feedback` is the random init."""
    del rng, forward
    return feedback

  def step_weights(self, params: dict, updates: dict) -> tuple[dict, dict]:
    """Applies the forward optimizer's `updates` to W; returns (forward, feedback)."""
    return optax.apply_updates(params['forward'], updates), params['feedback']

  # -- Rule interface -----------------------------------------------------------------------------
  def init_params(self, rng, images):
    model_rng, feedback_rng = jax.random.split(rng)
    variables = self.model.init(model_rng, images)
    forward = variables['params']
    feedback = self.init_feedback(feedback_rng, forward, variables['feedback'])
    return {'forward': forward, 'feedback': feedback}, {}

  def apply_model(self, params: dict, images: jax.Array) -> jax.Array:
    return self.model.apply({'params': params['forward'], 'feedback': params['feedback']}, images)[0]

  def predict(self, params, images, extra=None):
    return self.apply_model(params, images)

  def loss(self, forward: dict, feedback: dict, batch: base.Batch):
    out = self.apply_model({'forward': forward, 'feedback': feedback}, batch['image'])
    loss = base.task_loss(out, batch['label'], self.config.loss)
    return loss, {'loss': loss, 'accuracy': base.accuracy(out, batch['label'])}

  def loss_and_grads(self, state, batch, rng):
    feedback = state.params['feedback']
    grad, metrics = jax.grad(self.loss, has_aux=True)(state.params['forward'], feedback, batch)
    # B has no gradient: an empty tree, so no all-zero B-sized tensor is averaged across devices.
    return {'forward': grad, 'feedback': {}}, metrics, state.extra

  def apply_gradients(self, state: TrainState, grads: dict, extra: dict) -> TrainState:
    """Only the forward optimizer runs; B moves by `step_weights` and `post_update`."""
    updates, forward_opt = self.tx['forward'].update(
        grads['forward'], state.opt_state['forward'], state.params['forward'])
    forward, feedback = self.step_weights(state.params, updates)
    return state.replace(step=state.step + 1, params={'forward': forward, 'feedback': feedback},
                         opt_state={**state.opt_state, 'forward': forward_opt}, extra=extra)

  def analyze(self, state, batch):
    """weight_angle/*, norm_ratio/* for every layer and delta_angle/* for every hidden layer."""
    forward, feedback = state.params['forward'], state.params['feedback']
    out = metrics_lib.weight_metrics(forward, feedback)
    out.update(metrics_lib.delta_angles(
        self.model, forward, feedback, batch['image'],
        lambda o: base.task_loss(o, batch['label'], self.config.loss)))
    return out


class SignSymmetry(FeedbackRule):
  """B = sign(W)·s (in W's layout), recomputed from W before the first step and after every step.

  s = config.sign_scale, or (when it is 0) the layer's mean |W|, so that B has W's scale.
  """
  name = 'sign_symmetry'

  def sign_feedback(self, forward: dict, feedback: dict) -> dict:
    def one(path, _):
      w = jax.lax.stop_gradient(metrics_lib.lookup(forward, metrics_lib.names(path)))
      scale = self.config.sign_scale or jnp.mean(jnp.abs(w))
      return jnp.sign(w) * scale
    return jax.tree_util.tree_map_with_path(one, feedback)

  def init_feedback(self, rng, forward, feedback):
    return self.sign_feedback(forward, feedback)

  def post_update(self, state):
    feedback = self.sign_feedback(state.params['forward'], state.params['feedback'])
    return state.replace(params={**state.params, 'feedback': feedback})
