"""BP: the forward net trained end to end by its task loss (the smallest rule: a template)."""

from __future__ import annotations

import jax

from ccl_jax import models
from ccl_jax.rules import base

MIXED_PRECISION = True  # supports config.compute_dtype='bfloat16'


class Backprop(base.Rule):
  def __init__(self, config, task, batch_axis=base.BatchAxis()):
    super().__init__(config, task, batch_axis)
    self.model = models.forward(config, task, local=False)

  def init_params(self, rng, images):
    return {'forward': self.model.init(rng, images)['params'], 'feedback': {}}, {}

  def predict(self, params, images, extra=None):
    return self.model.apply({'params': params['forward']}, images)[0]

  def loss(self, params, batch):
    out = self.predict(params, batch['image'])
    loss = base.task_loss(out, batch['label'], self.config.loss)
    return loss, {'loss': loss, 'accuracy': base.accuracy(out, batch['label'])}

  def gradients(self, state, batch, rng):
    grads, metrics = jax.grad(self.loss, has_aux=True)(state.params, batch)
    return grads, metrics, state.extra


make = Backprop
