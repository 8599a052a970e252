"""BP: the forward net trained end to end by its task loss."""

from __future__ import annotations

import jax

from ccl_jax.models import build
from ccl_jax.rules import base


class Backprop(base.Rule):
  name = 'bp'

  def __init__(self, config, task, axis_name=None):
    super().__init__(config, task, axis_name)
    self.model = build.forward(config, task, local=False)

  def init_params(self, rng, images):
    return {'forward': self.model.init(rng, images)['params'], 'feedback': {}}, {}

  def predict(self, params, images, extra=None):
    return self.model.apply({'params': params['forward']}, images)[0]

  def loss(self, params, batch):
    out = self.predict(params, batch['image'])
    loss = base.task_loss(out, batch['label'], self.config.loss)
    return loss, {'loss': loss, 'accuracy': base.accuracy(out, batch['label'])}

  def loss_and_grads(self, state, batch, rng):
    grads, metrics = jax.grad(self.loss, has_aux=True)(state.params, batch)
    return grads, metrics, state.extra
