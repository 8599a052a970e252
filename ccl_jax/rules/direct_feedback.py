"""DFA, direct feedback alignment (Nøkland 2016; SPEC §4.1): the output error reaches every hidden
layer directly through a fixed random matrix, never through the layers above.

    δ_L = e = ∂ℓ/∂h_L,   δ_l = (e B_l) ⊙ φ'(a_l),   ΔW_l = −η · δ_l h_{l−1}ᵀ

B_l (d_L × n_l, `params['feedback']`, U(±scale·√(6/n_l)) as the reference's kaiming_uniform) is
never trained. The output layer takes its true gradient. Every layer's input is stop_gradient'd
and each hidden layer gets the surrogate loss Σ sg(e B_l) · h_l, whose gradient is exactly the
DFA update: one `jax.grad` gives every layer's. On the conv net the projection reaches every conv
block's (pooled) feature map. `drtp.py` is the same rule with e replaced by the one-hot target.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from ccl_jax import config as config_lib
from ccl_jax import metrics as metrics_lib
from ccl_jax import models
from ccl_jax.rules import base

SETTINGS = {'scale': config_lib.positive('B_l ~ U(±scale·√(6/n_l)), n_l the width of layer l', 1.0)}

# (outputs, labels, loss kind) -> the signal projected to the hidden layers, (batch, d_L).
Signal = Callable[[jax.Array, jax.Array, str], jax.Array]


def output_error(outputs: jax.Array, labels: jax.Array, loss: str) -> jax.Array:
  """e = ∂ℓ/∂h_L of the batch-mean task loss (softmax(h_L) − y*, over the batch size, for CE)."""
  return jax.grad(lambda o: base.task_loss(o, labels, loss))(outputs)


def uniform_feedback(rng, widths: list[tuple[int, ...]], out_dim: int, scale: float) -> dict:
  """{'layer_l': {'kernel': B_l (out_dim, n_l)}} with B_l ~ U(±scale·√(6/n_l))."""
  out = {}
  for l, shape in enumerate(widths):
    n = math.prod(shape)
    bound = scale * math.sqrt(6.0 / n)
    out[f'layer_{l + 1}'] = {
      'kernel': jax.random.uniform(
        jax.random.fold_in(rng, l), (out_dim, n), minval=-bound, maxval=bound
      )
    }
  return out


class DirectFeedback(base.Rule):
  """A forward net whose hidden layers learn from `signal` projected by fixed matrices B_l."""

  def __init__(self, config, task, batch_axis, signal: Signal, init_feedback: Callable):
    """`init_feedback(rng, hidden shapes, d_L)` draws the B tree."""
    super().__init__(config, task, batch_axis)
    self.model = models.forward(config, task, local=True)  # every layer's input cut
    self.backprop = models.forward(config, task, local=False)  # same parameters, for analysis
    self.signal = signal
    self.init_feedback = init_feedback

  def init_params(self, rng, images):
    model_rng, feedback_rng = jax.random.split(rng)
    forward = self.model.init(model_rng, images)['params']
    _, hiddens = jax.eval_shape(lambda: self.model.apply({'params': forward}, images))
    widths = [h.shape[1:] for h in hiddens]
    return {
      'forward': forward,
      'feedback': self.init_feedback(feedback_rng, widths, self.task.num_classes),
    }, {}

  def predict(self, params, images, extra=None):
    return self.model.apply({'params': params['forward']}, images)[0]

  def losses(self, forward: dict, feedback: dict, batch: base.Batch):
    """The task loss plus each hidden layer's surrogate Σ sg(signal B_l) · h_l."""
    out, hiddens = self.model.apply({'params': forward}, batch['image'])
    task = base.task_loss(out, batch['label'], self.config.loss)
    signal = jax.lax.stop_gradient(
      self.signal(jax.lax.stop_gradient(out), batch['label'], self.config.loss)
    )
    total = task
    for l, h in enumerate(hiddens):
      projected = signal @ feedback[f'layer_{l + 1}']['kernel']
      total = total + jnp.sum(jax.lax.stop_gradient(projected).reshape(h.shape) * h)
    return total, {'loss': task, 'accuracy': base.accuracy(out, batch['label'])}

  def gradients(self, state, batch, rng):
    grads, metrics = jax.grad(self.losses, has_aux=True)(
      state.params['forward'], state.params['feedback'], batch
    )
    return {'forward': grads, 'feedback': {}}, metrics, state.extra

  def analyze(self, state, batch):
    """update_angle/<layer>: ∠(this rule's update, BP's) per layer on the same batch."""
    forward, feedback = state.params['forward'], state.params['feedback']
    ours = jax.grad(lambda f: self.losses(f, feedback, batch)[0])(forward)
    bp = jax.grad(
      lambda f: base.task_loss(
        self.backprop.apply({'params': f}, batch['image'])[0], batch['label'], self.config.loss
      )
    )(forward)
    return metrics_lib.update_angles(ours, bp)


def make(config, task, batch_axis):
  scale = config.dfa.scale
  return DirectFeedback(
    config,
    task,
    batch_axis,
    output_error,
    lambda rng, widths, k: uniform_feedback(rng, widths, k, scale),
  )
