"""One tree's optax optimizer from its config block (SGD or Adam, clipping, decay, schedule)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ccl_jax import config as config_lib
from ccl_jax.config import Setting

SETTINGS = {
  'name': Setting('sgd', 'optimizer', choices=('sgd', 'adam')),
  'lr': config_lib.positive('peak learning rate', 1.0),
  'momentum': config_lib.fraction('SGD momentum (0 = none)', 0.0),
  'weight_decay': config_lib.non_negative('L2 weight decay, added before the lr scaling', 0.0),
  'clip': config_lib.non_negative("clip the tree's gradient to this global norm; 0 = off", 1.0),
  'warmup_steps': config_lib.non_negative('linear lr warm-up from 0 over N steps', 0),
  'schedule': Setting(
    'constant',
    "'constant', 'cosine' (to min_lr, per step) or 'step' (× decay_factor at each milestone)",
    choices=('constant', 'cosine', 'step'),
  ),
  'min_lr': config_lib.non_negative("the cosine schedule's final lr", 0.0),
  'milestones': Setting(
    (0.5, 0.75, 0.89, 0.94),
    "'step' schedule: where the lr drops, as fractions of the run",
    check=lambda v: all(0 < float(m) < 1 for m in v),
    must='fractions of the run in (0, 1)',
  ),
  'decay_factor': config_lib.positive("'step' schedule: the lr's factor at each milestone", 0.25),
  'b1': config_lib.fraction("Adam's β1", 0.9),
  'b2': config_lib.fraction("Adam's β2", 0.999),
  'grad_centralization': Setting(
    False, "subtract each output unit's mean from ≥2-D weight gradients"
  ),
}


def config(**overrides) -> ml_collections.ConfigDict:
  """One tree's optimizer settings: the defaults with `overrides`."""
  c = config_lib.section(SETTINGS)
  c.update(overrides)
  return c


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


def make(c, total_steps: int, factored: bool = False) -> optax.GradientTransformation:
  """(centralise) → clip → weight decay → SGD/Adam: decay is added before the lr scaling.

  `factored`: the tree's gradients may come as `LowRank` factors; a `plain_sgd` config then gets
  `low_rank_sgd`, the same step on the factors.
  """
  if factored and plain_sgd(c):
    return low_rank_sgd(schedule(c, total_steps), c.clip)
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
  return (
    c.name == 'sgd'
    and not c.momentum
    and not c.weight_decay
    and not c.get('grad_centralization', False)
  )


def low_rank_sgd(lr: optax.Schedule, clip: float) -> optax.GradientTransformation:
  """−lr · clip_by_global_norm(grads, clip) for gradients whose kernels are `LowRank` factors.

  The same update as `make(c)` for a `plain_sgd` config, as factors again (`LowRank(a, −s·d)`),
  so no gradient is ever written out: ‖aᵀd‖² = Σ (a aᵀ) ⊙ (d dᵀ) comes from K×K Gram matrices,
  and `apply_updates` adds each kernel's update in one fused pass (read W, write W).
  """
  f32 = lambda x: x.astype(jnp.float32)
  gram = lambda x: jnp.einsum('ki,li->kl', f32(x), f32(x), precision='highest')

  def init(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update(grads, state, params=None):
    del params
    rate = lr(state.count)
    scale = rate
    if clip and clip > 0:
      sq = sum(
        (jnp.sum(gram(g.a) * gram(g.d)) for g in jax.tree.leaves(grads, is_leaf=is_low_rank)),
        jnp.zeros((), jnp.float32),
      )
      norm = jnp.sqrt(jnp.maximum(sq, 0.0))
      scale = jnp.where(norm < clip, rate, rate * clip / norm)
    updates = jax.tree.map(lambda g: LowRank(g.a, g.d * -scale), grads, is_leaf=is_low_rank)
    return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init, update)


def apply_updates(params, updates):
  """`optax.apply_updates`, where a `LowRank` update of a kernel is added in one fused pass."""

  def one(w, u):
    if not is_low_rank(u):
      return optax.apply_updates(w, u)
    a, d = u.a.astype(w.dtype), u.d.astype(w.dtype)
    return w + jnp.sum(a[:, :, None] * d[:, None, :], axis=0)

  return jax.tree.map(one, params, updates, is_leaf=is_low_rank)
