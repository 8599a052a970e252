"""Target propagation, DTP / DRL / L-DRL / FW-DTP (SPEC §4.3-4.6): the identities each rule's
targets and feedback loss must satisfy, the compiled feedback steps, learning and exact resume."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ccl_jax import step as step_lib
from ccl_jax import train
from ccl_jax.errors import UserError
from ccl_jax.rules import target_prop
from ccl_jax.rules.base import Task, task_loss

from conftest import load_config

jax.config.update('jax_default_matmul_precision', 'highest')

RULES = ('dtp', 'drl', 'ldrl', 'fwdtp')
TRAINED = ('dtp', 'drl', 'ldrl')


def section(rule: str) -> str:
  return 'fwdtp' if rule == 'fwdtp' else 'tp'


def tiny(rule: str, hidden=(5, 4), dim=6, k=3, batch=8, seed=0, **overrides):
  """A small TP net on a random batch; no pre-training unless `overrides` asks for it."""
  if rule != 'fwdtp':
    overrides = {'tp__pretrain_steps': 0, **overrides}
  config = load_config(f'mnist_mlp_{rule}', dataset='digits', mlp__hidden=hidden, **overrides)
  learner = step_lib.build(config, Task(num_classes=k, image_shape=(dim, 1, 1), total_steps=10))
  rng = np.random.default_rng(seed)
  data = {
    'image': jnp.asarray(rng.normal(size=(batch, dim, 1, 1)), jnp.float32),
    'label': jnp.asarray(np.arange(batch) % k, jnp.int32),
  }
  return learner, learner.init(jax.random.PRNGKey(seed), data), data


def with_feedback(state, feedback):
  return state.replace(params={**state.params, 'feedback': feedback})


def bp_gradients(rule, forward, batch):
  return jax.grad(
    lambda f: task_loss(rule.net.forward(f, batch['image'])[-1], batch['label'], 'ce')
  )(forward)


@pytest.mark.parametrize('rule', RULES)
def test_no_output_error_means_no_update(rule):
  """β = 0 gives τ_L = h_L, so every τ_l = h_l and no layer moves (FW-DTP-BN: N(h) = h up to
  its 1e-12 eps)."""
  largest = {}
  for beta in (0.0, 0.1):
    learner, state, batch = tiny(rule, **{f'{section(rule)}__beta': beta})
    grads = learner.rule.gradients(state, batch, jax.random.PRNGKey(1))[0]['forward']
    largest[beta] = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads))
  assert largest[0.0] < 1e-6 and largest[0.1] > 1e-3, largest


@pytest.mark.parametrize('rule', TRAINED)
def test_linear_layers_with_transposed_feedback_give_backprops_direction(rule):
  """f_l(u) = u W_l, g_l(u) = u W_lᵀ: τ_l − h_l = −β ∂ℓ/∂h_l, so each layer's update is exactly
  2β × BP's (ℓ per example, the update a batch mean)."""
  beta = 0.05
  learner, state, batch = tiny(rule, mlp__activation='none', tp__beta=beta)
  forward = state.params['forward']
  transposed = {k: {'kernel': forward[k]['kernel'].T} for k in state.params['feedback']}
  ours = learner.rule.gradients(with_feedback(state, transposed), batch, None)[0]['forward']
  bp = bp_gradients(learner.rule, forward, batch)
  chex.assert_trees_all_close(ours, jax.tree.map(lambda g: 2 * beta * g, bp), rtol=1e-4, atol=1e-7)
  angles = learner.rule.analyze(with_feedback(state, transposed), batch)
  assert all(float(v) < 0.1 for k, v in angles.items() if k.startswith('update_angle')), angles


def test_exact_inverse_feedback_gives_gauss_newton_targets():
  """f_l linear, square, invertible and g_l = f_l⁻¹: τ_l − h_l = −β e W_L⁻¹ ⋯ W_{l+1}⁻¹."""
  beta = 0.1
  learner, state, batch = tiny('dtp', hidden=(4, 4), dim=4, k=4, mlp__activation='none')
  rule, forward = learner.rule, state.params['forward']
  inverse = {k: {'kernel': jnp.linalg.inv(forward[k]['kernel'])} for k in state.params['feedback']}
  h = rule.net.forward(forward, batch['image'])
  taus = target_prop.targets(rule.net, inverse, h, beta, batch['label'], 'ce')
  e = jax.nn.softmax(h[-1]) - jax.nn.one_hot(batch['label'], 4)
  delta = -beta * e
  for l in range(3, 0, -1):
    np.testing.assert_allclose(taus[l] - h[l], delta, atol=2e-5)
    delta = delta @ jnp.linalg.inv(forward[f'layer_{l}']['kernel'])


def test_ldrl_feedback_optimum_is_the_forward_transpose():
  """Linear layers: L-DRL's expected feedback gradient (over σ², `tp.scale_by_noise`) is Q − Wᵀ,
  so it vanishes at Q = Wᵀ, and its feedback steps drive Q there."""
  learner, state, batch = tiny(
    'ldrl',
    batch=4096,
    mlp__activation='none',
    tp__scale_by_noise=True,
    tp__noise=0.1,
    tp__pretrain_steps=1000,  # W never moves
    **{'optimizer.feedback.lr': 0.1},
  )
  rule, forward = learner.rule, state.params['forward']
  h = rule.net.forward(forward, batch['image'])
  grad = lambda fb: jax.grad(rule.feedback_objective, argnums=1)(
    rule.net, fb, forward, h, jax.random.PRNGKey(3)
  )
  transposed = {k: {'kernel': forward[k]['kernel'].T} for k in state.params['feedback']}
  zeros = jax.tree.map(jnp.zeros_like, transposed)
  at_optimum, at_zero = optax.tree.norm(grad(transposed)), optax.tree.norm(grad(zeros))
  assert at_optimum < 0.1 * at_zero, (at_optimum, at_zero)

  def distance(fb):
    return optax.tree.norm(jax.tree.map(jnp.subtract, fb, transposed)) / optax.tree.norm(transposed)

  update = jax.jit(learner.update)
  start = distance(state.params['feedback'])
  for _ in range(20):  # 20 × K = 100 feedback steps
    state = update(state, batch)[0]
  assert distance(state.params['feedback']) < 0.1 * start, (
    distance(state.params['feedback']),
    start,
  )
  assert float(rule.analyze(state, batch)['weight_angle/layer_2']) < 5


@pytest.mark.parametrize('scaled', [False, True])
def test_drl_loss_vanishes_for_an_exact_inverse(scaled):
  """Every layer linear, square and invertible with V_l = W_l⁻¹: the noisy sample comes back
  exactly, so the DRL loss is 0 (and it is not for a perturbed V)."""
  learner, state, batch = tiny(
    'drl',
    hidden=(4, 4),
    dim=4,
    k=4,
    mlp__activation='none',
    tp__noise=0.1,
    tp__scale_by_noise=scaled,
  )
  rule, forward = learner.rule, state.params['forward']
  inverse = {k: {'kernel': jnp.linalg.inv(forward[k]['kernel'])} for k in state.params['feedback']}
  h = rule.net.forward(forward, batch['image'])
  loss = lambda fb: float(rule.feedback_objective(rule.net, fb, forward, h, jax.random.PRNGKey(5)))
  assert loss(inverse) < 1e-8
  assert loss(jax.tree.map(lambda v: v * 1.1, inverse)) > 1e-5


def test_fwdtp_feedback_stays_bitwise_fixed():
  learner, state, batch = tiny('fwdtp')
  update = jax.jit(learner.update)
  new = state
  for _ in range(3):
    new = update(new, batch)[0]
  chex.assert_trees_all_equal(new.params['feedback'], state.params['feedback'])
  assert not np.allclose(
    new.params['forward']['layer_1']['kernel'], state.params['forward']['layer_1']['kernel']
  )
  assert not jax.tree.leaves(learner.rule.gradients(state, batch, None)[0]['feedback'])


@pytest.mark.parametrize('rule', TRAINED)
def test_k_feedback_steps_run_inside_one_compiled_update(rule):
  """The K feedback steps are a loop in the update's jaxpr (not K dispatches), each through the
  feedback optimizer: Adam's step count advances by K per update."""
  learner, state, batch = tiny(
    rule, tp__feedback_steps=3, **{'optimizer.feedback.name': 'adam', 'optimizer.feedback.lr': 1e-3}
  )
  jaxpr = str(jax.make_jaxpr(learner.update)(state, batch))
  assert 'while[' in jaxpr or 'scan[' in jaxpr
  new, metrics = jax.jit(learner.update)(state, batch)
  counts = [
    int(s.count)
    for s in jax.tree.leaves(
      new.opt_state['feedback'], is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState)
    )
    if isinstance(s, optax.ScaleByAdamState)
  ]
  assert counts == [3], counts
  assert np.isfinite(float(metrics['feedback_loss']))
  assert not np.allclose(
    new.params['feedback']['layer_2']['kernel'], state.params['feedback']['layer_2']['kernel']
  )


@pytest.mark.parametrize('optimizer', [{}, {'name': 'adam', 'weight_decay': 0.1}])
def test_pretraining_steps_move_only_the_feedback(optimizer):
  """During pre-training the forward tree does not step at all: with Adam and weight decay its
  parameters and optimizer state (moments, count) stay bitwise, so training starts fresh."""
  overrides = {f'optimizer.forward.{k}': v for k, v in optimizer.items()}
  learner, state, batch = tiny('dtp', tp__pretrain_steps=2, **overrides)
  update = jax.jit(learner.update)
  one = update(state, batch)[0]
  chex.assert_trees_all_equal(one.params['forward'], state.params['forward'])
  chex.assert_trees_all_equal(one.opt_state['forward'], state.opt_state['forward'])
  assert not np.allclose(
    one.params['feedback']['layer_2']['kernel'], state.params['feedback']['layer_2']['kernel']
  )
  three = update(update(one, batch)[0], batch)[0]
  assert not np.allclose(
    three.params['forward']['layer_1']['kernel'], state.params['forward']['layer_1']['kernel']
  )


@pytest.mark.parametrize(
  'overrides',
  [{'mlp__use_bias': True}, {'model': 'cnn'}, {'optimizer.feedback.schedule': 'cosine'}],
)
def test_bad_settings_stop_in_one_line(overrides):
  from ccl_jax import config as config_lib

  config = load_config('mnist_mlp_dtp', dataset='digits', **overrides)
  with pytest.raises(UserError):
    config_lib.finalize(config)


@pytest.mark.parametrize(
  'rule,threshold', [('dtp', 0.95), ('drl', 0.95), ('ldrl', 0.95), ('fwdtp', 0.95)]
)
def test_learns_digits(rule, threshold, tmp_path):
  """The Table-1 tanh MLP (256×5 hidden) on the embedded digits, 8 epochs of batch 64 (the
  trained-feedback rules' first 20 steps, one epoch, train only V): it learns and logs its
  alignment (test accuracy here: DTP 0.969, DRL 0.978, L-DRL 0.981, FW-DTP-BN 0.972)."""
  config = load_config(
    f'mnist_mlp_{rule}', dataset='digits', num_epochs=8, batch_size=64, progress=False
  )
  final = train.train_and_evaluate(config, str(tmp_path))
  assert final['test_accuracy'] >= threshold, final
  first = json.loads((tmp_path / 'metrics.jsonl').read_text().splitlines()[0])
  assert any(k.startswith('update_angle/') for k in first), first
  if rule in TRAINED:
    assert 'recon_error/layer_2' in first and 'train_feedback_loss' in first, first


@pytest.mark.heavy
@pytest.mark.parametrize('rule', RULES)
def test_resumes_exactly(rule, tmp_path):
  """2+2 epochs resumed equal 4 straight (a narrow net; the pre-training steps span the break)."""
  overrides = {} if rule == 'fwdtp' else {'tp__pretrain_steps': 50}
  config = lambda n: load_config(
    f'mnist_mlp_{rule}',
    dataset='digits',
    mlp__hidden=(32, 16),
    num_epochs=n,
    batch_size=64,
    progress=False,
    **overrides,
  )
  straight = train.train_and_evaluate(config(4), str(tmp_path / 'a'))
  train.train_and_evaluate(config(2), str(tmp_path / 'b'))
  resumed = train.train_and_evaluate(config(4), str(tmp_path / 'b'))
  same = ('test_accuracy', 'test_loss', 'best_epoch', 'best_val_loss', 'step')
  assert {k: resumed[k] for k in same} == {k: straight[k] for k in same}
