"""Optimizers: clip → weight decay → SGD order, per-tree clipping, schedules, low-rank SGD."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ccl_jax import optim


def test_sgd_clips_then_decays_then_scales():
  c = optim.config(lr=0.5, weight_decay=0.1, clip=1.0)
  tx = optim.make(c, total_steps=10)
  params = {'a': jnp.array([1.0, -2.0]), 'b': jnp.array([[3.0]])}
  grads = {'a': jnp.array([3.0, 0.0]), 'b': jnp.array([[4.0]])}  # global norm 5
  updates, _ = tx.update(grads, tx.init(params), params)
  # Clipping scales the gradient to norm 1 first; decay is added after it, before the lr.
  want = {k: -0.5 * (grads[k] / 5.0 + 0.1 * params[k]) for k in params}
  for k in params:
    np.testing.assert_allclose(updates[k], want[k], rtol=1e-6)


def test_each_tree_is_clipped_on_its_own_norm():
  c = optim.config(lr=1.0, clip=1.0)
  small = {'w': jnp.array([0.3, 0.4])}  # norm 0.5: untouched
  large = {'w': jnp.array([30.0, 40.0])}  # norm 50: scaled to 1
  for grads, scale in ((small, 1.0), (large, 1 / 50)):
    tx = optim.make(c, total_steps=1)
    updates, _ = tx.update(grads, tx.init(grads), grads)
    np.testing.assert_allclose(updates['w'], -scale * grads['w'], rtol=1e-6)


def test_warmup_then_cosine_schedule():
  c = optim.config(lr=1.0)
  c.warmup_steps, c.schedule, c.min_lr = 10, 'cosine', 0.001
  s = optim.schedule(c, total_steps=110)
  np.testing.assert_allclose([s(0), s(5), s(10)], [0.0, 0.5, 1.0], atol=1e-6)
  np.testing.assert_allclose(s(60), 0.001 + (1 - 0.001) * 0.5, rtol=1e-5)  # half-way down
  np.testing.assert_allclose(s(110), 0.001, rtol=1e-4)


def test_momentum_and_adam_are_optax_sgd_and_adam():
  p = {'w': jnp.array([1.0, 2.0])}
  g = {'w': jnp.array([0.5, -0.25])}
  for c, ref in (
    (optim.config(lr=0.1, momentum=0.9, clip=0), optax.sgd(0.1, 0.9)),
    (optim.config(lr=0.1, clip=0, name='adam'), optax.adam(0.1)),
  ):
    tx = optim.make(c, total_steps=5)
    s, r = tx.init(p), ref.init(p)
    for _ in range(3):
      u, s = tx.update(g, s, p)
      v, r = ref.update(g, r, p)
      np.testing.assert_allclose(u['w'], v['w'], rtol=1e-6)


@pytest.mark.parametrize(
  'clip,gain,clipped', [(0.0, 1.0, False), (1e3, 1.0, False), (1.0, 1.0, True), (1.0, 0.01, False)]
)
def test_low_rank_sgd_is_the_optax_step_on_the_dense_gradient(clip, gain, clipped):
  rng = np.random.default_rng(0)
  params = {
    'a': {'kernel': jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)},
    'b': {'kernel': jnp.asarray(rng.normal(size=(3, 6)), jnp.float32)},
  }
  grads = {
    'a': {
      'kernel': optim.LowRank(
        *(jnp.asarray(gain * rng.normal(size=s), jnp.float32) for s in ((4, 6), (4, 5)))
      )
    },
    'b': {
      'kernel': optim.LowRank(
        *(jnp.asarray(gain * rng.normal(size=s), jnp.float32) for s in ((4, 3), (4, 6)))
      )
    },
  }
  dense = optim.densify(grads)
  np.testing.assert_allclose(
    dense['a']['kernel'], grads['a']['kernel'].a.T @ grads['a']['kernel'].d, rtol=1e-5, atol=1e-5
  )
  c = optim.config(lr=0.3, clip=clip)
  assert optim.plain_sgd(c)
  tx = optim.make(c, total_steps=10)
  updates, _ = tx.update(dense, tx.init(params), params)
  want = optax.apply_updates(params, updates)
  low = optim.make(c, total_steps=10, factored=True)  # optim.low_rank_sgd: updates as factors
  low_updates, low_state = low.update(grads, low.init(params), params)
  assert int(low_state.count) == 1  # the optax state advances
  got = optim.apply_updates(params, low_updates)
  norm = float(optax.tree.norm(dense))
  assert bool(clip and norm > clip) == clipped  # the cases do cover both sides of the clip
  for k in params:
    np.testing.assert_allclose(got[k]['kernel'], want[k]['kernel'], rtol=1e-5, atol=1e-5)


def test_only_plain_sgd_takes_the_low_rank_path():
  assert optim.plain_sgd(optim.config(clip=1.0))
  assert not optim.plain_sgd(optim.config(momentum=0.9))
  assert not optim.plain_sgd(optim.config(weight_decay=1e-4))
  assert not optim.plain_sgd(optim.config(name='adam'))
