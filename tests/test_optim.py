"""Optimizer construction: clip → weight decay → SGD order, per-tree clipping, schedules."""

import jax.numpy as jnp
import numpy as np
import optax

from ccl_jax import config as config_lib, optim


def test_sgd_clips_then_decays_then_scales():
  c = config_lib.optimizer(lr=0.5, weight_decay=0.1, clip=1.0)
  tx = optim.make(c, total_steps=10)
  params = {'a': jnp.array([1.0, -2.0]), 'b': jnp.array([[3.0]])}
  grads = {'a': jnp.array([3.0, 0.0]), 'b': jnp.array([[4.0]])}  # global norm 5
  updates, _ = tx.update(grads, tx.init(params), params)
  # Clipping scales the gradient to norm 1 first; decay is added after it, before the lr.
  want = {k: -0.5 * (grads[k] / 5.0 + 0.1 * params[k]) for k in params}
  for k in params:
    np.testing.assert_allclose(updates[k], want[k], rtol=1e-6)


def test_each_tree_is_clipped_on_its_own_norm():
  c = config_lib.optimizer(lr=1.0, clip=1.0)
  small = {'w': jnp.array([0.3, 0.4])}      # norm 0.5: untouched
  large = {'w': jnp.array([30.0, 40.0])}    # norm 50: scaled to 1
  for grads, scale in ((small, 1.0), (large, 1 / 50)):
    tx = optim.make(c, total_steps=1)
    updates, _ = tx.update(grads, tx.init(grads), grads)
    np.testing.assert_allclose(updates['w'], -scale * grads['w'], rtol=1e-6)


def test_warmup_then_cosine_schedule():
  c = config_lib.optimizer(lr=1.0)
  c.warmup_steps, c.schedule, c.min_lr = 10, 'cosine', 0.001
  s = optim.schedule(c, total_steps=110)
  np.testing.assert_allclose([s(0), s(5), s(10)], [0.0, 0.5, 1.0], atol=1e-6)
  np.testing.assert_allclose(s(60), 0.001 + (1 - 0.001) * 0.5, rtol=1e-5)   # half-way down
  np.testing.assert_allclose(s(110), 0.001, rtol=1e-4)


def test_momentum_and_adam_are_optax_sgd_and_adam():
  p = {'w': jnp.array([1.0, 2.0])}
  g = {'w': jnp.array([0.5, -0.25])}
  for c, ref in ((config_lib.optimizer(lr=0.1, momentum=0.9, clip=0), optax.sgd(0.1, 0.9)),
                 (config_lib.optimizer(lr=0.1, clip=0, name='adam'), optax.adam(0.1))):
    tx = optim.make(c, total_steps=5)
    s, r = tx.init(p), ref.init(p)
    for _ in range(3):
      u, s = tx.update(g, s, p)
      v, r = ref.update(g, r, p)
      np.testing.assert_allclose(u['w'], v['w'], rtol=1e-6)
