"""CCL on the convolutional autoencoder (SPEC §1.3): rule 'ccl' on a 'reconstruction' model.

The forward autoencoder runs on the image, its mirrored feedback twin on the target (the same
image). Pair l compares the forward net's l-th activation A with the feedback net's B of the same
shape: intermediate pairs by H·c·(MSE(A, B) + MSE(Ã, B̃)), Ã each channel map centred and
L2-normalised over space, H the pair's height; the two end pairs (the input against the feedback
net's image, the reconstruction against the target) by H·c·MSE alone (c = `ccl.loss_scale`, 1 in
the reference, which weighs both terms alike). Every layer's input is stop_gradient'd, so one
`jax.grad` of the summed losses gives each pair's gradient to its own forward and feedback layer
only. Both nets' BatchNorm statistics live in `state.extra`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ccl_jax import layers, models
from ccl_jax import metrics as metrics_lib
from ccl_jax.parallel import BatchAxis
from ccl_jax.rules import base


def unit_maps(x: jax.Array) -> jax.Array:
  """Each channel map of x (B, H, W, C) centred and L2-normalised over space (eps 1e-8)."""
  x = x.astype(jnp.float32)
  x = x - x.mean(axis=(1, 2), keepdims=True)
  return x / (jnp.sqrt(jnp.sum(x * x, axis=(1, 2), keepdims=True)) + 1e-8)


def pair_loss(a: jax.Array, b: jax.Array, scale: float, end: bool = False) -> jax.Array:
  """H·c·MSE(A, B), plus H·c·MSE(Ã, B̃) unless `end` (A, B: (B, H, W, C))."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  loss = jnp.mean((a - b) ** 2)
  if not end:
    loss = loss + jnp.mean((unit_maps(a) - unit_maps(b)) ** 2)
  return a.shape[1] * scale * loss


class CounterCurrentAE(base.Rule):
  def __init__(self, config, task, batch_axis=BatchAxis()):
    super().__init__(config, task, batch_axis)
    self.c = config.ccl
    self.model = models.forward(config, task, local=True, axis_name=batch_axis.name)
    self.feedback = models.feedback(config, task, axis_name=batch_axis.name)

  def init_params(self, rng, images):
    f_rng, b_rng = jax.random.split(rng)
    f, b = self.model.init(f_rng, images), self.feedback.init(b_rng, images)
    extra = {
      tree: {'batch_stats': v['batch_stats']}
      for tree, v in (('forward', f), ('feedback', b))
      if 'batch_stats' in v
    }
    return {'forward': f['params'], 'feedback': b['params']}, extra

  def predict(self, params, images, extra=None):
    stats = (extra or {}).get('forward', {})
    return base.apply_net(self.model, {'params': params['forward']}, stats, images, False)[0][0]

  def pairs(self, params, extra, images, train):
    """The forward activations [x, enc_1.., dec_n..dec_2, reconstruction], the feedback signals
    (the same shapes) and the updated statistics."""
    (out, hiddens), f_stats = base.apply_net(
      self.model, {'params': params['forward']}, extra.get('forward', {}), images, train
    )
    signals, b_stats = base.apply_net(
      self.feedback, {'params': params['feedback']}, extra.get('feedback', {}), images, train
    )
    stats = {k: v for k, v in (('forward', f_stats), ('feedback', b_stats)) if v}
    return [images] + hiddens + [out], signals, stats

  def losses(self, params, extra, batch):
    """Σ_l pair loss l, with per-pair metrics and the reconstruction MSE."""
    acts, signals, stats = self.pairs(params, extra, batch['image'], True)
    last = len(acts) - 1
    metrics, total = {}, 0.0
    for l, (a, b) in enumerate(zip(acts, signals)):
      term = pair_loss(a, b, self.c.loss_scale, end=l in (0, last))
      metrics[f'layer_loss/{l}'] = term
      total = total + term
    metrics['mse'] = jnp.mean((acts[-1] - batch['image']) ** 2)
    metrics['loss'] = total
    return total, (metrics, stats)

  def gradients(self, state, batch, rng):
    grads, (metrics, extra) = jax.grad(self.losses, has_aux=True)(state.params, state.extra, batch)
    return base.loss_warmup(grads, state.step, int(self.c.loss_warmup_steps)), metrics, extra

  def analyze(self, state, batch):
    """cka/pair_l: linear CKA between the forward and feedback activations of pair l (the end
    pairs included); weight_angle/<layer> = ∠(W adjoint, V) in degrees and norm_ratio/<layer>
    = ‖V‖/‖W‖ for each forward conv W and its mirror V (same name)."""
    acts, signals, _ = self.pairs(state.params, state.extra, batch['image'], False)
    out = {
      f'cka/pair_{l}': metrics_lib.linear_cka(a, b) for l, (a, b) in enumerate(zip(acts, signals))
    }
    forward, feedback = state.params['forward'], state.params['feedback']
    adjoints = {n: {'kernel': layers.adjoint_kernel(p['kernel'])} for n, p in forward.items()}
    mirrors = {n: {'kernel': feedback[n]['kernel']} for n in forward}
    out.update(metrics_lib.weight_metrics(adjoints, mirrors))
    return out
