"""CCL: counter-current learning with a mirrored feedback net (SPEC §1.1).

The forward net runs on the input, the feedback net on the K×K identity (one prototype per class
and layer). Each pair of activations at the same width is compared by a local loss; every layer's
input is stop_gradient'd, so one `jax.grad` of the summed losses gives exactly the local gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ccl_jax.models import build
from ccl_jax.rules import base


def prototype_loss(h: jax.Array, g: jax.Array, onehot: jax.Array, scale: float) -> jax.Array:
  """(256·c/d) · mean((h gᵀ − Y)²): forward activations h (B×d) against class prototypes g (K×d)."""
  d = h.shape[-1]
  return (256.0 * scale / d) * jnp.mean((h @ g.T - onehot) ** 2)


class CounterCurrent(base.Rule):
  name = 'ccl'

  def __init__(self, config, task, axis_name=None):
    super().__init__(config, task, axis_name)
    self.model = build.forward(config, task, local=True)
    self.feedback = build.feedback(config, task)

  def init_params(self, rng, images):
    f_rng, b_rng = jax.random.split(rng)
    eye = jnp.eye(self.task.num_classes)
    return {'forward': self.model.init(f_rng, images)['params'],
            'feedback': self.feedback.init(b_rng, eye)['params']}, {}

  def predict(self, params, images, extra=None):
    return self.model.apply({'params': params['forward']}, images)[0]

  def losses(self, params, batch) -> tuple[jax.Array, dict]:
    """Total loss = task loss + Σ_l layer loss; returns it with per-term metrics."""
    x, y = batch['image'], batch['label']
    out, hiddens = self.model.apply({'params': params['forward']}, x)
    prototypes = self.feedback.apply({'params': params['feedback']},
                                     jnp.eye(self.task.num_classes))  # computed once per step
    onehot = jax.nn.one_hot(y, self.task.num_classes)
    acts = [x.reshape(x.shape[0], -1)] + hiddens
    task = base.task_loss(out, y, self.config.loss)
    metrics = {'task_loss': task, 'accuracy': base.accuracy(out, y)}
    total = task
    for l, (h, g) in enumerate(zip(acts, prototypes)):
      term = prototype_loss(h, g, onehot, self.config.loss_scale_c)
      metrics[f'layer_loss/{l}'] = term
      total = total + term
    metrics['loss'] = total
    return total, metrics

  def loss_and_grads(self, state, batch, rng):
    grads, metrics = jax.grad(self.losses, has_aux=True)(state.params, batch)
    return grads, metrics, state.extra
