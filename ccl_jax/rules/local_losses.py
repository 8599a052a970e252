"""Local error signals (Nøkland & Eidnes 2019, SPEC §3): every block trains on its own loss.

Rules (`config.rule`), all on the same `models.blocks.BlockNet` (Linear/Conv → BN → φ → dropout):
- 'global':  the paper's baseline, backprop of the classifier's CE through every block;
- 'pred':    each block: CE of its zero-initialised linear head;
- 'sim':     each block: mean squared difference of the similarity matrices of its sim head's
             output and of the one-hot labels (over all B² pairs);
- 'predsim': each block (1−β)·pred + β·sim, and the classifier's CE scaled by (1−β).
With `local.bio` the labels are replaced by a fixed random 128-dim projection of the one-hot code:
pred heads are feedback-alignment layers trained by sigmoid BCE on the binarised code, sim
compares to the projected codes' similarity, and β defaults to 0.01 (0.99 otherwise).

Every block's input is stop_gradient'd (except under 'global'), so one gradient of the summed
losses is exactly each block's local gradient. Batch statistics live in `state.extra`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ccl_jax import config as config_lib
from ccl_jax import models
from ccl_jax.config import Setting
from ccl_jax.errors import UserError
from ccl_jax.models import blocks
from ccl_jax.parallel import BatchAxis
from ccl_jax.rules import base
from ccl_jax.state import stream

VARIANTS = {'global': (), 'pred': ('pred',), 'sim': ('sim',), 'predsim': ('pred', 'sim')}
MODELS = ('mlp', 'vgg8b', 'vgg11b')
SECTION = 'local'
SETTINGS = {
  'dropout': config_lib.fraction(
    'dropout after every block (the losses read the block before it)', 0.0
  ),
  'bio': Setting(False, "the 'bio' variants: fixed random label codes, FA pred heads"),
  'code_size': config_lib.positive('bio: size of the projected label code', 128),
  'beta': Setting(
    -1.0,
    "predsim's β in (1−β)·pred + β·sim; −1 = 0.99 (0.01 with bio)",
    check=lambda v: 0 <= v <= 1 or v == -1,
    must='in [0, 1] (or -1)',
  ),
  'dim_in_decoder': config_lib.positive(
    "conv blocks: the pred head's input is average-pooled down to at most this many features", 2048
  ),
}


def check(config) -> None:
  if config.model not in MODELS:
    raise UserError(f"rule '{config.rule}' runs on model {', '.join(MODELS)}, not '{config.model}'")
  if config.loss != 'ce':
    raise UserError(
      f"rule '{config.rule}' trains and evaluates by cross-entropy: set "
      f"config.loss='ce', not '{config.loss}'"
    )
  if config.local.bio and config.rule == 'global':
    raise UserError("config.local.bio=True needs a local rule (pred, sim or predsim), not 'global'")


class LocalLosses(base.Rule):
  def __init__(self, config, task, batch_axis=BatchAxis()):
    super().__init__(config, task, batch_axis)
    c = config.local
    self.heads = VARIANTS[config.rule]
    self.bio = bool(c.bio)
    self.beta = float(c.beta if c.beta >= 0 else (0.01 if self.bio else 0.99))
    net = blocks.make(
      config,
      task,
      num_pred=int(c.code_size) if self.bio else task.num_classes,
      dropout=c.dropout,
      bio=c.bio,
      dim_in_decoder=c.dim_in_decoder,
    )
    self.model = models.placed(net, config, batch_axis.name)

  def init_params(self, rng, images):
    params_rng, proj_rng = jax.random.split(rng)
    variables = self.model.init(
      {'params': params_rng}, images, train=False, local=bool(self.heads), heads=self.heads
    )
    variables = dict(variables)
    extra = {k: v for k, v in variables.items() if k != 'params'}
    if self.bio:
      # Fixed random projection of the one-hot label (K → code size), N(0, 1).
      extra['fixed'] = {
        **extra.get('fixed', {}),
        'label_projection': jax.random.normal(
          stream(proj_rng, 'projection'), (self.task.num_classes, int(self.config.local.code_size))
        ),
      }
    return {'forward': variables['params'], 'feedback': {}}, extra

  def predict(self, params, images, extra=None):
    return self.model.apply({'params': params['forward'], **(extra or {})}, images)[0]

  def label_codes(self, labels: jax.Array, extra: dict) -> jax.Array:
    """One-hot labels, or their fixed random projection under `bio`."""
    onehot = jax.nn.one_hot(labels, self.task.num_classes)
    return onehot @ extra['fixed']['label_projection'] if self.bio else onehot

  def losses(self, forward: dict, extra: dict, batch: base.Batch, rng: jax.Array):
    if self.batch_axis.name and self.config.local.dropout:
      # Each device draws its own masks, so with dropout a run depends on the device count.
      rng = jax.random.fold_in(rng, self.batch_axis.index())
    (logits, found), new_stats = self.model.apply(
      {'params': forward, **extra},
      batch['image'],
      train=True,
      local=bool(self.heads),
      heads=self.heads,
      rngs={'dropout': rng},
      mutable=['batch_stats'],
    )
    labels = batch['label']
    codes = self.label_codes(labels, extra)
    top = base.task_loss(logits, labels, 'ce')
    metrics = {'accuracy': base.accuracy(logits, labels), 'classifier_loss': top}
    total = (1.0 - self.beta if self.heads == ('pred', 'sim') else 1.0) * top
    if 'sim' in self.heads:  # the global batch's label similarity (gathered over devices)
      target_sim = blocks.similarity(self.batch_axis.rows(codes))
    for i, out in enumerate(found):
      parts = {}
      if 'pred' in out:
        if self.bio:
          parts['pred'] = optax.sigmoid_binary_cross_entropy(
            out['pred'], (codes > 0).astype(jnp.float32)
          ).mean()
        else:
          parts['pred'] = base.task_loss(out['pred'], labels, 'ce')
      if 'sim' in out:
        parts['sim'] = jnp.mean((out['sim'] - target_sim) ** 2)
      if len(parts) == 2:
        block_loss = (1.0 - self.beta) * parts['pred'] + self.beta * parts['sim']
      else:
        block_loss = sum(parts.values())
      total = total + block_loss
      metrics.update({f'{k}_loss/block_{i + 1}': v for k, v in parts.items()})
    metrics['loss'] = total
    return total, (metrics, {**extra, **new_stats})

  def gradients(self, state, batch, rng):
    grads, (metrics, extra) = jax.grad(self.losses, has_aux=True)(
      state.params['forward'], state.extra, batch, rng
    )
    return {'forward': grads, 'feedback': {}}, metrics, extra


make = LocalLosses
