"""Feedback-weight rules (FA, sign symmetry, KP, WM): layers, identities, metrics, digits runs."""

from __future__ import annotations

import json

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccl_jax import config as config_lib
from ccl_jax import layers, metrics
from ccl_jax import step as step_lib
from ccl_jax.errors import UserError
from ccl_jax.rules.base import Task
from ccl_jax.train import train_and_evaluate

from conftest import load_config

KEYS = jax.random.split(jax.random.PRNGKey(0), 8)


def normal(seed: int, shape: tuple[int, ...]) -> jax.Array:
  """Test data from numpy: no jax PRNG program to compile for every new shape."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def labels_for(seed: int, n: int) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).integers(0, 10, n), jnp.int32)


def digits_config(rule: str, **overrides):
  """configs/default.py (ELU MLP 64-256-256-10 on digits, SGD lr 1, clip 1) with `rule`."""
  return load_config('default', rule=rule, progress=False, data__cache_dir='', **overrides)


def make_rule(rule: str, config=None, image_shape=(8, 8, 1), total_steps=100):
  config = config or digits_config(rule)
  r = step_lib.build(config, Task(10, image_shape, total_steps))
  x = normal(0, (16,) + image_shape)
  y = labels_for(1, 16)
  return r, {'image': x, 'label': y}


def small_cnn_config(rule: str):
  return load_config('mnist_cnn_fa', rule=rule, cnn__channels=(4, 8))


# -- layers ----------------------------------------------------------------------------------------
def test_dense_with_b_equal_w_is_backprop_exactly():
  x, w = normal(0, (5, 7)), normal(1, (7, 3))
  plain = jax.grad(lambda x, w: jnp.sum(jnp.tanh(x @ w) ** 2), (0, 1))(x, w)
  fb = jax.grad(lambda x, w: jnp.sum(jnp.tanh(layers.feedback_dense(x, w, w)) ** 2), (0, 1))(x, w)
  for a, b in zip(plain, fb):
    np.testing.assert_array_equal(a, b)


def test_conv_with_b_equal_w_is_backprop_exactly():
  x, w = normal(0, (2, 6, 6, 3)), normal(1, (3, 3, 3, 4))

  def loss(op):
    return lambda x, w: jnp.sum(jnp.tanh(op(x, w)) ** 2)

  plain = jax.grad(loss(layers.conv), (0, 1))(x, w)
  fb = jax.grad(loss(lambda x, w: layers.feedback_conv(x, w, w)), (0, 1))(x, w)
  for a, b in zip(plain, fb):
    np.testing.assert_array_equal(a, b)


def test_dense_vjp_is_the_hand_written_b_product():
  x, w = normal(0, (5, 7)), normal(1, (7, 3))
  b, g = normal(2, (7, 3)), normal(3, (5, 3))
  out, vjp = jax.vjp(layers.feedback_dense, x, w, b)
  dx, dw, db = vjp(g)
  chex.assert_trees_all_close(out, x @ w)
  chex.assert_trees_all_close(dx, g @ b.T, rtol=1e-6)  # error goes through B, not W
  chex.assert_trees_all_close(dw, x.T @ g, rtol=1e-6)  # W's gradient is BP's
  np.testing.assert_array_equal(db, jnp.zeros_like(b))


def test_few_rows_dot_has_the_plain_dot_gradient():
  """CCL's prototype layers form W's cotangent as K outer products: same value, same gradients."""
  x, w, g = normal(0, (10, 48)), normal(1, (48, 96)), normal(2, (10, 96))
  out, vjp = jax.vjp(layers.few_rows_dot, x, w)
  dx, dw = vjp(g)
  chex.assert_trees_all_close(out, x @ w)
  chex.assert_trees_all_close(dw, x.T @ g, rtol=1e-5, atol=1e-5)  # Σ_k x_kᵀ g_k
  chex.assert_trees_all_close(dx, g @ w.T, rtol=1e-5, atol=1e-5)

  def loss(dot_general):  # through flax's Dense(dot_general=...), as FeedbackMLP uses it
    dense = nn.Dense(96, use_bias=False, dot_general=dot_general)
    return lambda p: jnp.sum(jnp.tanh(dense.apply({'params': p}, x)) * g)

  params = {'kernel': w}
  chex.assert_trees_all_close(
    jax.grad(loss(layers.few_rows_dot_general))(params),
    jax.grad(loss(jax.lax.dot_general))(params),
    rtol=1e-5,
    atol=1e-5,
  )


def test_conv_vjp_is_the_adjoint_of_the_feedback_conv():
  x, w = normal(0, (2, 6, 6, 3)), normal(1, (3, 3, 3, 4))
  b = normal(2, (3, 3, 3, 4))  # W's layout
  g, v = normal(3, (2, 6, 6, 4)), normal(4, (2, 6, 6, 3))
  dx, dw, db = jax.vjp(layers.feedback_conv, x, w, b)[1](g)
  # dx is the adjoint of v ↦ conv(v, B): <dx, v> = <g, conv(v, B)>
  chex.assert_trees_all_close(jnp.vdot(dx, v), jnp.vdot(g, layers.conv(v, b)), rtol=1e-4)
  chex.assert_trees_all_close(dw, jax.grad(lambda w: jnp.vdot(g, layers.conv(x, w)))(w), rtol=1e-6)
  np.testing.assert_array_equal(db, jnp.zeros_like(b))


def test_modules_keep_b_in_the_feedback_collection():
  v = layers.FeedbackConv(features=4).init(KEYS[0], jnp.ones((1, 5, 5, 3)))
  assert v['params']['kernel'].shape == (3, 3, 3, 4)
  assert v['feedback']['kernel'].shape == (3, 3, 3, 4)  # B has W's layout
  v = layers.FeedbackDense(features=4, use_bias=True).init(KEYS[0], jnp.ones((1, 3)))
  assert v['params']['kernel'].shape == (3, 4) and v['feedback']['kernel'].shape == (3, 4)


@pytest.mark.parametrize('model', ['mlp', 'cnn'])
def test_feedback_net_with_b_equal_w_matches_backprop(model):
  config = {'mlp': digits_config, 'cnn': small_cnn_config}[model]
  shape = (8, 8, 1)
  fa, batch = make_rule('fa', config('fa'), shape)
  bp, _ = make_rule('bp', config('bp'), shape)
  state = fa.init(KEYS[5], batch)
  params = state.params
  aligned = {
    'forward': params['forward'],
    'feedback': metrics.backprop_feedback(params['forward'], params['feedback']),
  }
  g_fa = jax.jit(jax.grad(lambda f: fa.rule.loss(f, aligned['feedback'], state.extra, batch)[0]))(
    params['forward']
  )
  g_bp = jax.jit(jax.grad(lambda f: bp.rule.loss({'forward': f}, state.extra, batch)[0]))(
    params['forward']
  )
  chex.assert_trees_all_close(g_fa, g_bp, rtol=1e-5, atol=1e-7)
  out = jax.jit(fa.rule.analyze)(state.replace(params=aligned), batch)
  for k, v in out.items():
    if 'angle' in k:
      assert float(v) < 0.1, (k, v)  # float32 arccos near 1 resolves ~0.03°
    else:
      np.testing.assert_allclose(float(v), 1.0, rtol=1e-5)


def test_fa_keeps_b_fixed_and_w_learns():
  r, batch = make_rule('fa')
  s0 = r.init(KEYS[2], batch)
  s = jax.jit(r.update)(s0, batch)[0]
  chex.assert_trees_all_equal(s.params['feedback'], s0.params['feedback'])
  assert not np.allclose(
    s.params['forward']['layer_1']['kernel'], s0.params['forward']['layer_1']['kernel']
  )
  # B has W's scale (same initializer), but is independent of it
  for _, w, b in metrics.feedback_pairs(s0.params['forward'], s0.params['feedback']):
    np.testing.assert_allclose(np.std(b), np.std(w), rtol=0.2)
    assert 80 < float(metrics.angle_degrees(w, b)) < 100


# -- rule identities -------------------------------------------------------------------------------
def test_kp_difference_decays_as_kappa_to_the_n():
  kappa, n = 0.9, 6
  c = digits_config('kp', kp__decay=kappa)
  c.optimizer.forward.momentum = 0.9  # B gets the applied update, so momentum keeps the identity
  r, batch = make_rule('kp', c)
  s0 = r.init(KEYS[2], batch)
  step = jax.jit(r.update)
  s = s0
  for _ in range(n):
    s = step(s, batch)[0]
  for (_, w0, b0), (_, w, b) in zip(
    metrics.feedback_pairs(s0.params['forward'], s0.params['feedback']),
    metrics.feedback_pairs(s.params['forward'], s.params['feedback']),
  ):
    want = kappa**n * (w0 - b0)
    np.testing.assert_allclose(w - b, want, atol=2e-6)
    assert not np.allclose(w, w0)


def test_kp_refuses_optimizer_weight_decay():
  c = digits_config('kp')
  c.optimizer.forward.weight_decay = 1e-4
  with pytest.raises(UserError, match='kp.decay'):
    config_lib.validate(c)


@pytest.mark.parametrize('sigmoid', [False, True])
def test_wm_mirror_phase_reduces_every_weight_angle(sigmoid):
  c = load_config('mnist_mlp_wm', dataset='digits') if sigmoid else digits_config('wm')
  c.mlp.hidden = (256, 256)  # the digits default's widths (their initializers are compiled already)
  c.wm.init_steps = 0
  r, batch = make_rule('wm', c)
  params, _ = r.rule.init_params(KEYS[3], batch['image'])
  before = metrics.weight_metrics(params['forward'], params['feedback'])
  c.wm.init_steps = 200
  r2, _ = make_rule('wm', c)
  params2, _ = r2.rule.init_params(KEYS[3], batch['image'])
  chex.assert_trees_all_equal(params2['forward'], params['forward'])  # the same fixed W
  after = metrics.weight_metrics(params2['forward'], params2['feedback'])
  for k in before:
    if k.startswith('weight_angle/'):
      assert float(after[k]) < float(before[k]) - 1.0, (k, before[k], after[k])


def test_wm_mirror_steps_are_deterministic_and_keyed_by_step():
  r, batch = make_rule('wm', digits_config('wm', wm__init_steps=3))
  s0 = r.init(KEYS[2], batch)
  chex.assert_trees_all_equal(s0.params['feedback'], r.init(KEYS[2], batch).params['feedback'])
  step = jax.jit(r.update)
  a = step(s0, batch)[0]
  chex.assert_trees_all_equal(a.params, step(s0, batch)[0].params)
  b = step(a, batch)[0]
  d1 = jax.tree.map(lambda x, y: x - y, a.params['feedback'], s0.params['feedback'])
  d2 = jax.tree.map(lambda x, y: x - y, b.params['feedback'], a.params['feedback'])
  assert not np.allclose(d1['layer_1']['kernel'], d2['layer_1']['kernel'])  # fresh noise per step


def test_wm_keep_norm_turns_b_toward_w_at_constant_norm():
  # The conv layers of a small CNN: plain mirror steps grow B (the sum
  # over positions); with keep_norm every B keeps its init norm and still turns toward Wᵀ.
  out = {}
  for keep in (False, True):
    c = small_cnn_config('wm')
    c.wm.keep_norm = keep
    c.wm.init_steps = 0
    r, batch = make_rule('wm', c, (8, 8, 1))
    p0, _ = r.rule.init_params(KEYS[3], batch['image'])
    c.wm.init_steps = 20
    r, _ = make_rule('wm', c, (8, 8, 1))
    p1, _ = r.rule.init_params(KEYS[3], batch['image'])
    out[keep] = [
      (b0, b1)
      for (_, _, b0), (_, _, b1) in zip(
        metrics.feedback_pairs(p0['forward'], p0['feedback']),
        metrics.feedback_pairs(p1['forward'], p1['feedback']),
      )
    ]
    before = metrics.weight_metrics(p0['forward'], p0['feedback'])
    after = metrics.weight_metrics(p1['forward'], p1['feedback'])
    for k in before:
      if k.startswith('weight_angle/'):
        assert float(after[k]) < float(before[k]) - 1.0, (keep, k, before[k], after[k])
  for b0, b1 in out[True]:
    np.testing.assert_allclose(np.linalg.norm(b1), np.linalg.norm(b0), rtol=1e-4)
  assert max(np.linalg.norm(b1) / np.linalg.norm(b0) for b0, b1 in out[False]) > 1.2


def test_wm_runs_on_conv_layers():
  c = small_cnn_config('wm')
  c.wm.init_steps = 2
  r, batch = make_rule('wm', c, (8, 8, 1))
  s = jax.jit(r.update)(r.init(KEYS[2], batch), batch)[0]
  assert np.isfinite(float(jax.jit(r.rule.analyze)(s, batch)['weight_angle/layer_1']))


@pytest.mark.parametrize('scale', [1.0, 0.0])
def test_sign_symmetry_b_is_sign_of_w_after_each_step(scale):
  r, batch = make_rule('sign_symmetry', digits_config('sign_symmetry', sign_symmetry__scale=scale))
  s = r.init(KEYS[2], batch)
  step = jax.jit(r.update)
  for i in range(3):
    if i:
      s = step(s, batch)[0]
    for _, w, b in metrics.feedback_pairs(s.params['forward'], s.params['feedback']):
      s_w = jnp.sign(w)
      want = s_w * (scale or jnp.mean(jnp.abs(w)))
      np.testing.assert_allclose(b, want, rtol=1e-6)


def test_kp_and_cnn_analyze_under_jit():
  r, batch = make_rule('kp', small_cnn_config('kp'), (8, 8, 1))
  s = jax.jit(r.update)(r.init(KEYS[2], batch), batch)[0]
  out = jax.jit(r.rule.analyze)(s, batch)
  assert set(out) == (
    {f'weight_angle/layer_{i}' for i in (1, 2, 3)}
    | {f'norm_ratio/layer_{i}' for i in (1, 2, 3)}
    | {f'delta_angle/layer_{i}' for i in (1, 2)}
  )
  assert all(v.shape == () for v in out.values())


def test_angle_degrees():
  a = jnp.array([[1.0, 0.0], [0.0, 0.0]])
  np.testing.assert_allclose(metrics.angle_degrees(a, 2 * a), 0.0, atol=1e-3)
  np.testing.assert_allclose(metrics.angle_degrees(a, -a), 180.0, atol=1e-3)
  np.testing.assert_allclose(metrics.angle_degrees(a, jnp.array([0.0, 1.0, 0.0, 0.0])), 90.0)


# -- whole runs on the digits default --------------------------------------------------------------
DIGITS_OVERRIDES = {'kp': {'kp.decay': 0.99}}  # KP: κ < 1 so W − B shrinks within 200 steps


@pytest.mark.parametrize('rule', ['fa', 'sign_symmetry', 'kp', 'wm'])
def test_digits_run_learns(rule, tmp_path):
  c = digits_config(
    rule, num_epochs=10, checkpoint_every_epochs=10, **DIGITS_OVERRIDES.get(rule, {})
  )
  final = train_and_evaluate(c, str(tmp_path))
  assert final['test_accuracy'] >= 0.85, final
  records = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert any(k.startswith('weight_angle/') for k in records[0])
  assert any(k.startswith('delta_angle/') for k in records[0])
  if rule == 'kp':
    assert min(r['weight_angle/layer_3'] for r in records if 'weight_angle/layer_3' in r) < 20.0


def test_delta_angle_is_against_backprop_of_the_rules_own_upstream_error():
  """SPEC §2: at hidden layer l, ∠(δ_l, (W_{l+1} δ_{l+1}) ⊙ φ'(z_l)) with δ_{l+1} the rule's own,
  checked against a NumPy computation on a 3-hidden-layer FA net (not against the full BP chain,
  which differs below the top hidden layer)."""
  fa, batch = make_rule('fa', digits_config('fa', mlp__hidden=(7, 6, 5)))
  state = fa.init(KEYS[4], batch)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), state.params)
  W = [p['forward'][f'layer_{i}']['kernel'] for i in range(1, 5)]
  B = [p['feedback'][f'layer_{i}']['kernel'] for i in range(1, 5)]
  elu = lambda z: np.where(z > 0, z, np.expm1(z))
  d_elu = lambda z: np.where(z > 0, 1.0, np.exp(z))
  x = np.asarray(batch['image'], np.float64).reshape(16, -1)
  zs, h = [], x
  for i, w in enumerate(W):
    zs.append(h @ w)
    h = elu(zs[-1]) if i < 3 else zs[-1]
  prob = np.exp(h - h.max(1, keepdims=True))
  prob /= prob.sum(1, keepdims=True)
  delta = (prob - np.eye(10)[np.asarray(batch['label'])]) / 16  # ∂ mean CE / ∂ logits
  angle = lambda a, b: np.degrees(
    np.arccos(np.clip(np.sum(a * b) / np.linalg.norm(a) / np.linalg.norm(b), -1, 1))
  )
  want, chain, bp = {}, {}, delta
  for l in (3, 2, 1):  # layer l's pre-activation z_l = zs[l - 1]; layer l + 1's B = B[l]
    rule_delta = (delta @ B[l].T) * d_elu(zs[l - 1])
    want[l] = angle(rule_delta, (delta @ W[l].T) * d_elu(zs[l - 1]))
    bp = (bp @ W[l].T) * d_elu(zs[l - 1])
    chain[l] = angle(rule_delta, bp)
    delta = rule_delta
  got = jax.jit(fa.rule.analyze)(state, batch)
  for l in (1, 2, 3):
    np.testing.assert_allclose(float(got[f'delta_angle/layer_{l}']), want[l], atol=0.05)
  assert abs(want[1] - chain[1]) > 0.5  # the two definitions do differ here


def test_random_streams_never_share_a_key():
  """Each stream folds its own id first and the step second, so no (stream, step) pair can give
  another's key (the augmentation key at step 22295 once equalled WM's at step 2566)."""
  from ccl_jax.state import STREAMS, stream

  rng = jax.random.PRNGKey(0)
  assert len(set(STREAMS.values())) == len(STREAMS)
  keys = {
    (name, s): tuple(np.asarray(jax.random.key_data(stream(rng, name, s))).tolist())
    for name in STREAMS
    for s in (0, 1, 2566, 0xA06, 0x5717, 22295)
  }
  assert len(set(keys.values())) == len(keys)
