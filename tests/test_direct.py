"""DFA and DRTP (SPEC §4.1-4.2): their identities with BP, locality, learning, exact resume."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccl_jax import step as step_lib
from ccl_jax import train
from ccl_jax.rules.base import Task, task_loss

from conftest import load_config

jax.config.update('jax_default_matmul_precision', 'highest')


def tiny(rule: str, hidden=(5,), dim=6, k=3, batch=8, seed=0):
  config = load_config(f'mnist_mlp_{rule}', dataset='digits', mlp__hidden=hidden)
  learner = step_lib.build(config, Task(num_classes=k, image_shape=(dim, 1, 1), total_steps=10))
  rng = np.random.default_rng(seed)
  batch = {
    'image': jnp.asarray(rng.normal(size=(batch, dim, 1, 1)), jnp.float32),
    'label': jnp.asarray(np.arange(batch) % k, jnp.int32),
  }
  return learner, learner.init(jax.random.PRNGKey(seed), batch), batch


def test_dfa_with_b_equal_to_the_output_weights_is_backprop_on_one_hidden_layer():
  learner, state, batch = tiny('dfa')
  rule = learner.rule
  forward = state.params['forward']
  feedback = {'layer_1': {'kernel': forward['layer_2']['kernel'].T}}  # B_1 = W_2ᵀ (d_L × n_1)
  ours = rule.gradients(
    state.replace(params={'forward': forward, 'feedback': feedback}), batch, None
  )[0]['forward']
  bp = jax.grad(
    lambda f: task_loss(rule.backprop.apply({'params': f}, batch['image'])[0], batch['label'], 'ce')
  )(forward)
  chex.assert_trees_all_close(ours, bp, atol=1e-6)
  angles = rule.analyze(state.replace(params={'forward': forward, 'feedback': feedback}), batch)
  assert all(float(v) < 0.1 for v in angles.values()), angles


def test_drtp_hidden_updates_ignore_everything_above_them():
  """DRTP: layer 1's update is the same whatever the layers above it and the output hold."""
  learner, state, batch = tiny('drtp', hidden=(5, 4))
  forward = state.params['forward']
  g = lambda f: learner.rule.gradients(
    state.replace(params={**state.params, 'forward': f}), batch, None
  )[0]['forward']
  changed = {
    **forward,
    'layer_2': {k: v * 3.0 + 0.1 for k, v in forward['layer_2'].items()},
    'layer_3': {k: v * -2.0 for k, v in forward['layer_3'].items()},
  }
  np.testing.assert_array_equal(g(changed)['layer_1']['kernel'], g(forward)['layer_1']['kernel'])


def test_dfa_hidden_update_is_the_projected_output_error_in_closed_form():
  """ΔW_1 = h_0ᵀ ((e B_1) ⊙ tanh'(a_1)): no weight above layer 1 enters, only the error e."""
  learner, state, batch = tiny('dfa', hidden=(5, 4))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), state.params)
  x = np.asarray(batch['image'], np.float64).reshape(8, -1)
  a1 = x @ p['forward']['layer_1']['kernel'] + p['forward']['layer_1']['bias']
  h1 = np.tanh(a1)
  h2 = np.tanh(h1 @ p['forward']['layer_2']['kernel'] + p['forward']['layer_2']['bias'])
  z = h2 @ p['forward']['layer_3']['kernel'] + p['forward']['layer_3']['bias']
  prob = np.exp(z - z.max(1, keepdims=True))
  prob /= prob.sum(1, keepdims=True)
  e = (prob - np.eye(3)[np.asarray(batch['label'])]) / 8
  delta1 = (e @ p['feedback']['layer_1']['kernel']) * (1 - h1**2)
  grads = learner.rule.gradients(state, batch, None)[0]['forward']
  np.testing.assert_allclose(grads['layer_1']['kernel'], x.T @ delta1, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(grads['layer_1']['bias'], delta1.sum(0), rtol=1e-4, atol=1e-7)


def test_drtp_is_dfa_with_the_error_replaced_by_the_target():
  from ccl_jax.rules import direct_feedback, drtp

  out = jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)), jnp.float32)
  y = jnp.asarray([0, 2, 1, 2])
  np.testing.assert_allclose(drtp.target_signal(out, y, 'ce'), np.eye(3)[[0, 2, 1, 2]] / 4)
  p = jax.nn.softmax(out)
  np.testing.assert_allclose(
    direct_feedback.output_error(out, y, 'ce'), (p - np.eye(3)[[0, 2, 1, 2]]) / 4, atol=1e-6
  )


def test_b_never_moves():
  learner, state, batch = tiny('drtp', hidden=(5, 4))
  new = jax.jit(learner.update)(state, batch)[0]
  chex.assert_trees_all_equal(new.params['feedback'], state.params['feedback'])
  assert not np.allclose(
    new.params['forward']['layer_1']['kernel'], state.params['forward']['layer_1']['kernel']
  )


@pytest.mark.parametrize('rule,threshold', [('dfa', 0.95), ('drtp', 0.95)])
def test_learns_digits_and_resumes_exactly(rule, threshold, tmp_path):
  """The Table-1 tanh MLP (256×5 hidden) on the embedded digits, 16 epochs (DFA 0.967, DRTP
  0.981 here): it learns, and 8+8 epochs resumed equal 16 straight."""
  config = lambda n: load_config(
    f'mnist_mlp_{rule}', dataset='digits', num_epochs=n, batch_size=64, progress=False
  )
  straight = train.train_and_evaluate(config(16), str(tmp_path / 'a'))
  assert straight['test_accuracy'] >= threshold, straight
  first = json.loads((tmp_path / 'a' / 'metrics.jsonl').read_text().splitlines()[0])
  assert any(k.startswith('update_angle/') for k in first), first
  train.train_and_evaluate(config(8), str(tmp_path / 'b'))
  resumed = train.train_and_evaluate(config(16), str(tmp_path / 'b'))
  same = ('test_accuracy', 'test_loss', 'best_epoch', 'best_val_loss', 'step')
  assert {k: resumed[k] for k in same} == {k: straight[k] for k in same}
