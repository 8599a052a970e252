"""Builds one tree's optax optimizer from its config block (SGD or Adam, clipping, decay, schedule)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def schedule(c, total_steps: int) -> optax.Schedule:
  """Constant or cosine learning rate, with optional linear warm-up."""
  warm = int(c.warmup_steps)
  if c.schedule == 'cosine':
    main = optax.cosine_decay_schedule(c.lr, max(1, total_steps - warm), alpha=c.min_lr / c.lr)
  else:
    main = optax.constant_schedule(c.lr)
  if warm:
    return optax.join_schedules([optax.linear_schedule(0.0, c.lr, warm), main], [warm])
  return main


def centralize_gradients() -> optax.GradientTransformation:
  """Gradient centralisation: subtract each output unit's mean from ≥2-D weight gradients."""
  def update(updates, state, params=None):
    del params
    def gc(g):
      if g.ndim < 2:
        return g
      return g - jnp.mean(g, axis=tuple(range(g.ndim - 1)), keepdims=True)
    return jax.tree.map(gc, updates), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make(c, total_steps: int) -> optax.GradientTransformation:
  """clip → (centralise) → weight decay → SGD/Adam: decay is added before the lr scaling."""
  parts = []
  if c.get('grad_centralization', False):
    parts.append(centralize_gradients())
  if c.clip and c.clip > 0:
    parts.append(optax.clip_by_global_norm(c.clip))
  if c.weight_decay:
    parts.append(optax.add_decayed_weights(c.weight_decay))
  lr = schedule(c, total_steps)
  if c.name == 'adam':
    parts.append(optax.adam(lr, b1=c.b1, b2=c.b2))
  else:
    parts.append(optax.sgd(lr, momentum=c.momentum or None))
  return optax.chain(*parts)
