"""Builds one tree's optax optimizer from its config block (SGD or Adam, clipping, decay, schedule)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


def schedule(c, total_steps: int) -> optax.Schedule:
  """Constant, cosine, or step ('step': × decay_factor at each milestone, given as fractions of
  the run) learning rate, with optional linear warm-up."""
  warm = int(c.warmup_steps)
  if c.schedule == 'cosine':
    main = optax.cosine_decay_schedule(c.lr, max(1, total_steps - warm), alpha=c.min_lr / c.lr)
  elif c.schedule == 'step':
    at = sorted({max(1, round(float(m) * (total_steps - warm))) for m in c.milestones})
    main = optax.piecewise_constant_schedule(c.lr, {s: float(c.decay_factor) for s in at})
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
  """(centralise) → clip → weight decay → SGD/Adam: decay is added before the lr scaling."""
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


class LowRank(NamedTuple):
  """A dense kernel's gradient kept as its factors: Σ_k a_kᵀ d_k = aᵀ d, a (K, in), d (K, out).

  CCL's feedback kernels see K class prototypes per step, so their gradients have rank ≤ K.
  Averaging over devices is exact on the factors when `a` is the same on every device.
  """
  a: jax.Array
  d: jax.Array

  def dense(self) -> jax.Array:
    return jnp.einsum('ki,kj->ij', self.a, self.d, precision='highest').astype(jnp.float32)


def is_low_rank(x) -> bool:
  return isinstance(x, LowRank)


def densify(grads):
  """The same gradients with every `LowRank` leaf written out as its dense kernel."""
  return jax.tree.map(lambda g: g.dense() if is_low_rank(g) else g, grads, is_leaf=is_low_rank)


def plain_sgd(c) -> bool:
  """Whether `make(c)` is SGD with at most clipping and a schedule: what `low_rank_sgd` computes."""
  return (c.name == 'sgd' and not c.momentum and not c.weight_decay
          and not c.get('grad_centralization', False))


def low_rank_sgd(params, grads, lr: jax.Array, clip: float):
  """params − lr · clip_by_global_norm(grads, clip), grads' kernels given as `LowRank` factors.

  The same update as `make(c)` for a `plain_sgd` config, without ever writing a gradient to
  memory: ‖aᵀd‖² = Σ (a aᵀ) ⊙ (d dᵀ) comes from K×K Gram matrices, and each kernel's update
  is one fused pass over it (read W, write W) instead of gradient, norm and update passes.
  """
  f32 = lambda x: x.astype(jnp.float32)
  gram = lambda x: jnp.einsum('ki,li->kl', f32(x), f32(x), precision='highest')
  scale = lr
  if clip and clip > 0:
    sq = sum((jnp.sum(gram(g.a) * gram(g.d)) for g in jax.tree.leaves(grads, is_leaf=is_low_rank)),
             jnp.zeros((), jnp.float32))
    norm = jnp.sqrt(jnp.maximum(sq, 0.0))
    scale = jnp.where(norm < clip, lr, lr * clip / norm)

  def step(w, g):
    a, d = g.a.astype(w.dtype), (g.d * scale).astype(w.dtype)
    return w - jnp.sum(a[:, :, None] * d[:, None, :], axis=0)
  return jax.tree.map(step, params, grads, is_leaf=is_low_rank)
