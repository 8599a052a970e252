"""BP: the forward net trained end to end by its task loss (the smallest rule: a template)."""

from __future__ import annotations

import jax

from ccl_jax import models
from ccl_jax.rules import base

MIXED_PRECISION = True  # supports config.compute_dtype='bfloat16'


class Backprop(base.Rule):
  def __init__(self, config, task, batch_axis=base.BatchAxis()):
    super().__init__(config, task, batch_axis)
    self.model = models.forward(config, task, local=False, axis_name=batch_axis.name)

  def init_params(self, rng, images):
    variables = self.model.init(rng, images)
    extra = {'batch_stats': variables['batch_stats']} if 'batch_stats' in variables else {}
    return {'forward': variables['params'], 'feedback': {}}, extra

  def predict(self, params, images, extra=None):
    return base.apply_net(self.model, {'params': params['forward']}, extra or {}, images, False)[0][
      0
    ]

  def loss(self, params, extra, batch):
    (out, _), extra = base.apply_net(
      self.model, {'params': params['forward']}, extra, batch['image'], True
    )
    loss, metrics = base.objective(self.task, out, batch, self.config.loss)
    return loss, (metrics, extra)

  def gradients(self, state, batch, rng):
    grads, (metrics, extra) = jax.grad(self.loss, has_aux=True)(state.params, state.extra, batch)
    return grads, metrics, extra


make = Backprop
