"""Core: CCL locality and loss value, BP gradients, learning on digits and MNIST, CLI errors."""

import json
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccl_jax import optim, rules, train
from ccl_jax import step as step_lib
from ccl_jax.rules.base import Task

from conftest import ROOT, load_config

jax.config.update('jax_default_matmul_precision', 'highest')


def tiny(rule: str, hidden=(5, 4), dim=6, k=3, batch=7, seed=0):
  config = load_config('default', rule=rule, mlp__hidden=hidden)
  task = Task(num_classes=k, image_shape=(dim, 1, 1), total_steps=10)
  r = step_lib.build(config, task)
  rng = np.random.default_rng(seed)
  batch = {
    'image': jnp.asarray(rng.normal(size=(batch, dim, 1, 1)), jnp.float32),
    'label': jnp.asarray(rng.integers(0, k, batch), jnp.int32),
  }
  return r, r.init(jax.random.PRNGKey(seed), batch), batch


def nonzero_leaves(tree) -> set[str]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(k) for k, v in flat if np.any(np.asarray(v) != 0)}


def test_ccl_each_loss_term_trains_only_its_own_pair():
  r, state, batch = tiny('ccl', hidden=(5, 4, 4))

  def term(name):
    return lambda p: r.rule.losses(p, batch)[1][name]

  # Pair 0 (input vs g_0) trains only V_1; pair l trains W_l and V_{l+1}; CE trains only W_L.
  expect = {
    'layer_loss/0': {"['feedback']['layer_1']['kernel']"},
    'layer_loss/1': {"['forward']['layer_1']['kernel']", "['feedback']['layer_2']['kernel']"},
    'layer_loss/2': {"['forward']['layer_2']['kernel']", "['feedback']['layer_3']['kernel']"},
    'layer_loss/3': {"['forward']['layer_3']['kernel']", "['feedback']['layer_4']['kernel']"},
    'task_loss': {"['forward']['layer_4']['kernel']"},
  }
  grads = {name: jax.grad(term(name))(state.params) for name in expect}
  for name, want in expect.items():
    assert nonzero_leaves(grads[name]) == want, name
  # The rule's update uses the sum: it equals the sum of the per-term gradients, so changing one
  # term (here: dropping it) leaves every other layer's gradient unchanged.
  total = optim.densify(r.rule.gradients(state, batch, jax.random.PRNGKey(0))[0])
  chex.assert_trees_all_close(total, jax.tree.map(lambda *g: sum(g), *grads.values()), atol=1e-6)
  without_1 = jax.tree.map(lambda a, b: a - b, total, grads['layer_loss/1'])
  for leaf in expect['layer_loss/2'] | expect['task_loss']:
    a = dict(
      (jax.tree_util.keystr(k), v) for k, v in jax.tree_util.tree_flatten_with_path(total)[0]
    )
    b = dict(
      (jax.tree_util.keystr(k), v) for k, v in jax.tree_util.tree_flatten_with_path(without_1)[0]
    )
    np.testing.assert_array_equal(a[leaf], b[leaf])


def test_ccl_loss_matches_hand_computation():
  r, state, batch = tiny('ccl', hidden=(5, 4), dim=6, k=3)
  p = jax.tree.map(np.asarray, state.params)
  x = np.asarray(batch['image']).reshape(7, 6).astype(np.float64)
  y = np.eye(3)[np.asarray(batch['label'])]
  elu = lambda v: np.where(v > 0, v, np.expm1(v))
  W1, W2, W3 = (p['forward'][f'layer_{i}']['kernel'] for i in (1, 2, 3))
  V1, V2, V3 = (p['feedback'][f'layer_{i}']['kernel'] for i in (1, 2, 3))
  h1 = elu(x @ W1)
  h2 = elu(h1 @ W2)
  z = h2 @ W3
  g2 = elu(np.eye(3) @ V3)
  g1 = elu(g2 @ V2)
  g0 = g1 @ V1
  logp = z - np.log(np.exp(z).sum(1, keepdims=True))
  ce = -(logp * y).sum(1).mean()
  c = 0.5
  want = ce + sum(
    256 * c / h.shape[1] * np.mean((h @ g.T - y) ** 2) for h, g in ((x, g0), (h1, g1), (h2, g2))
  )
  got, metrics = r.rule.losses(state.params, batch)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  np.testing.assert_allclose(float(metrics['task_loss']), ce, rtol=1e-5)


def test_bp_gradient_equals_end_to_end_grad():
  r, state, batch = tiny('bp', hidden=(5, 4))

  def loss(p):
    h = batch['image'].reshape(7, -1)
    for i in (1, 2):
      h = jax.nn.elu(h @ p[f'layer_{i}']['kernel'])
    z = h @ p['layer_3']['kernel']
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), batch['label'][:, None], 1))

  grads, _, _ = r.rule.gradients(state, batch, jax.random.PRNGKey(0))
  chex.assert_trees_all_close(grads['forward'], jax.grad(loss)(state.params['forward']), atol=1e-6)


@pytest.mark.parametrize('rule', ['bp', 'ccl'])
def test_default_config_learns_digits(rule, tmp_path):
  final = train.train_and_evaluate(load_config('default', rule=rule, progress=False), str(tmp_path))
  assert final['test_accuracy'] >= 0.90, final
  assert (tmp_path / 'plots' / 'curves.png').stat().st_size > 10_000  # the run's curves, drawn
  # The reported parameters are those of the epoch with the lowest validation loss.
  epochs = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()][:-1]
  best = min(epochs, key=lambda r: r['val_loss'])
  assert (final['best_epoch'], final['best_val_loss']) == (best['epoch'], best['val_loss'])
  assert final['test_accuracy'] == best['test_accuracy']
  if rule == 'ccl':  # SPEC §1.4's alignment metrics are logged at every evaluation
    assert 0 < epochs[-1]['cka/pair_1'] <= 1 and 0 <= epochs[-1]['weight_angle/layer_2'] <= 180


@pytest.mark.parametrize('rule,floor', [('bp', 0.92), ('ccl', 0.85)])
def test_one_mnist_epoch_learns(rule, floor, data_dir, tmp_path):
  config = load_config(f'mnist_mlp_{rule}', data_dir=data_dir, num_epochs=1, progress=False)
  final = train.train_and_evaluate(config, str(tmp_path))
  assert final['test_accuracy'] >= floor, final


def run_main(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, '-m', 'ccl_jax.main', *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )


@pytest.mark.parametrize(
  'flag,needle',
  [
    ('--config.rule=no_such_rule', 'no_such_rule'),
    ('--config.dataset=no_such_set', 'no_such_set'),
    ('--config.no_such_key=1', 'no_such_key'),
    ('--config.optimizer.feedback.lr=-0.5', 'optimizer.feedback.lr=-0.5'),
    ('--config.dataset=mnist --config.data_dir=/no/such/dir', '/no/such/dir'),
    ('--config=configs/no_such_config.py', 'no_such_config.py'),
    ('--config.mlp.init=he', "init='he'"),
    ('--config.mlp.activation=gelu', "activation='gelu'"),
    ('--config.loss=mse', "loss='mse'"),
    ('--config.checkpoint_every_epochs=0', 'checkpoint_every_epochs=0'),
    ('--config.steps_per_call=-1', 'steps_per_call=-1'),
    ('--config.rule=predsim --config.model=cnn', "not 'cnn'"),
    ('--config.model=vgg8b', "not rule 'ccl'"),
    ('--config.rule=global --config.local.bio=True', "not 'global'"),
    (
      '--config.optimizer.forward.schedule=step --config.optimizer.forward.milestones=(0.5,2)',
      'milestones=(0.5, 2)',
    ),
  ],
)
def test_bad_input_gives_one_line_error(flag, needle, tmp_path):
  out = run_main(f'--workdir={tmp_path}', *flag.split())
  assert out.returncode != 0
  assert 'Traceback' not in out.stderr + out.stdout
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and needle in lines[0], out.stderr


def test_ccl_phased_gradient_equals_grad_of_the_summed_loss():
  r, state, batch = tiny('ccl', hidden=(5, 4, 4))
  grads, metrics, _ = r.rule.gradients(state, batch, jax.random.PRNGKey(0))
  want, want_metrics = jax.grad(r.rule.losses, has_aux=True)(state.params, batch)
  assert r.rule.low_rank and all(
    isinstance(g['kernel'], optim.LowRank) for g in grads['feedback'].values()
  )
  chex.assert_trees_all_close(optim.densify(grads), want, atol=1e-6)
  chex.assert_trees_all_close(metrics, want_metrics, atol=1e-6)
  r.rule.low_rank = False  # the dense path: the feedback net's plain VJP
  grads, metrics, _ = r.rule.gradients(state, batch, jax.random.PRNGKey(0))
  chex.assert_trees_all_close(grads, want, atol=1e-6)


@pytest.mark.parametrize('clip', [1.0, 0.01])  # clipping off / on for the feedback tree
def test_ccl_low_rank_feedback_steps_equal_the_optax_steps(clip):
  r, state, batch = tiny('ccl', hidden=(5, 4, 4))
  config = load_config('default', rule='ccl', mlp__hidden=(5, 4, 4))
  config.optimizer.feedback.clip = clip
  config.optimizer.feedback.schedule = 'cosine'  # the lr follows the step on both paths
  low, dense_rule = step_lib.build(config, r.rule.task), rules.get(config, r.rule.task)
  dense_rule.low_rank = False
  dense = step_lib.learner(dense_rule)
  a = state  # each path's own optimizer state (the low-rank one is a step count)
  b = state.replace(
    opt_state={**state.opt_state, 'feedback': dense.tx['feedback'].init(state.params['feedback'])}
  )
  for _ in range(3):
    a, _ = jax.jit(low.update)(a, batch)
    b, _ = jax.jit(dense.update)(b, batch)
  chex.assert_trees_all_close(a.params, b.params, atol=1e-5)
  assert not np.allclose(
    a.params['feedback']['layer_1']['kernel'], state.params['feedback']['layer_1']['kernel']
  )


def test_bfloat16_compute_keeps_float32_parameters_and_learns(tmp_path):
  config = load_config('default', compute_dtype='bfloat16', num_epochs=10, progress=False)
  final = train.train_and_evaluate(config, str(tmp_path))
  assert final['test_accuracy'] >= 0.90, final
  r, state, batch = tiny('ccl')
  r16 = step_lib.build(
    load_config('default', rule='ccl', mlp__hidden=(5, 4), compute_dtype='bfloat16'), r.rule.task
  )
  out, hiddens = r16.rule.model.apply({'params': state.params['forward']}, batch['image'])
  assert out.dtype == jnp.float32 and hiddens[0].dtype == jnp.bfloat16
  grads, _, _ = r16.rule.gradients(state, batch, jax.random.PRNGKey(0))
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(optim.densify(grads)))
  new, _ = r16.update(state, batch)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(new.params))


def test_augment_is_a_keyed_crop_and_flip_per_example():
  from ccl_jax import data

  images = jax.random.normal(jax.random.PRNGKey(0), (6, 5, 7, 2))
  idx = jnp.array([3, 9, 4, 1, 0, 7])
  key = jax.random.PRNGKey(5)
  out = np.asarray(data.augment(images, idx, key, pad=2, flip=True))
  flips = 0
  for x, y in zip(np.asarray(images), out):
    padded = np.pad(x, ((2, 2), (2, 2), (0, 0)))
    windows = [padded[i : i + 5, j : j + 7] for i in range(5) for j in range(5)]
    plain = any(np.array_equal(y, w) for w in windows)
    mirrored = any(np.array_equal(y[:, ::-1], w) for w in windows)
    assert plain or mirrored
    flips += not plain
  assert 0 < flips < 6
  # Keyed by example index: a row's draw does not depend on the rest of the batch.
  np.testing.assert_array_equal(data.augment(images[2:4], idx[2:4], key, 2, True), out[2:4])
  np.testing.assert_array_equal(data.augment(images, idx, key, 0, False), images)
  assert not np.array_equal(data.augment(images, idx, jax.random.PRNGKey(6), 2, True), out)


def test_linear_cka_equals_the_centred_gram_form_and_its_invariances():
  from ccl_jax import metrics

  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(50, 7)), rng.normal(size=(50, 4)) + 3.0
  h = np.eye(50) - 1 / 50  # centring matrix
  k, l = h @ x @ x.T @ h, h @ y @ y.T @ h
  want = np.sum(k * l) / (np.linalg.norm(k) * np.linalg.norm(l))
  np.testing.assert_allclose(metrics.linear_cka(jnp.asarray(x), jnp.asarray(y)), want, rtol=1e-5)
  q = np.linalg.qr(rng.normal(size=(7, 7)))[0]
  np.testing.assert_allclose(
    metrics.linear_cka(jnp.asarray(x), jnp.asarray(2.5 * x @ q + 1)), 1.0, rtol=1e-5
  )
  assert float(metrics.linear_cka(jnp.asarray(x), jnp.ones((50, 3)))) == 0.0


def test_ccl_analyze_reports_angles_of_w_against_v_transposed():
  r, state, batch = tiny('ccl', hidden=(5, 4))
  out = r.rule.analyze(state, batch)
  assert {'cka/pair_0', 'cka/pair_1', 'cka/pair_2', 'weight_angle/layer_3'} <= set(out)
  assert all(0 <= float(out[f'cka/pair_{l}']) <= 1 for l in range(3))
  # With every V_l := W_lᵀ the angles are 0 and the norm ratios 1.
  forward = state.params['forward']
  mirrored = {n: {'kernel': forward[n]['kernel'].T} for n in forward}
  out = r.rule.analyze(state.replace(params={'forward': forward, 'feedback': mirrored}), batch)
  for n in forward:
    np.testing.assert_allclose(out[f'weight_angle/{n}'], 0.0, atol=0.1)
    np.testing.assert_allclose(out[f'norm_ratio/{n}'], 1.0, rtol=1e-6)


def cnn_ccl(channels=(4, 8), image_shape=(8, 8, 1), k=3, batch=6, seed=0, **overrides):
  config = load_config('default', rule='ccl', model='cnn', cnn__channels=channels, **overrides)
  r = step_lib.build(config, Task(num_classes=k, image_shape=image_shape, total_steps=10))
  rng = np.random.default_rng(seed)
  batch = {
    'image': jnp.asarray(rng.normal(size=(batch,) + image_shape), jnp.float32),
    'label': jnp.asarray(np.arange(batch) % k, jnp.int32),
  }
  return r, jax.jit(r.init)(jax.random.PRNGKey(seed), batch), batch


@pytest.mark.parametrize('image_shape', [(32, 32, 3), (28, 28, 1)])
def test_feedback_cnn_mirrors_the_forward_maps(image_shape):
  r, state, batch = cnn_ccl(channels=(2, 2, 2, 2, 4), image_shape=image_shape, batch=2)
  # Shapes only: traced, never compiled.
  _, hiddens = jax.eval_shape(
    lambda p, x: r.rule.model.apply({'params': p}, x), state.params['forward'], batch['image']
  )
  prototypes = jax.eval_shape(
    lambda p: r.rule.feedback.apply({'params': p}, jnp.eye(3)), state.params['feedback']
  )
  assert [g.shape[1:] for g in prototypes] == [image_shape] + [h.shape[1:] for h in hiddens]
  assert prototypes[0].shape[0] == 3


def test_normalized_pair_loss_matches_hand_computation():
  from ccl_jax.rules.counter_current import normalized_pair_loss

  rng = np.random.default_rng(0)
  h, g = rng.normal(size=(5, 2, 2, 3)), rng.normal(size=(4, 2, 2, 3))
  y = np.eye(4)[[0, 3, 1, 1, 2]]
  hn = h.reshape(5, -1) / np.linalg.norm(h.reshape(5, -1), axis=1, keepdims=True)
  gn = g.reshape(4, -1) / np.linalg.norm(g.reshape(4, -1), axis=1, keepdims=True)
  want = (
    1.5 * np.mean((hn @ gn.T - y) ** 2)
    + 0.5 * np.mean((hn @ hn.T - np.eye(5)) ** 2)
    + 0.5 * np.mean((gn @ gn.T - np.eye(4)) ** 2)
  )
  got = normalized_pair_loss(jnp.asarray(h), jnp.asarray(g), jnp.asarray(y), 1.5, 0.5)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_conv_adjoint_kernel_is_the_transpose_map():
  from ccl_jax import layers

  rng = np.random.default_rng(1)
  w = jnp.asarray(rng.normal(size=(3, 3, 2, 5)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(1, 6, 6, 2)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(1, 6, 6, 5)), jnp.float32)
  lhs = jnp.sum(layers.conv(x, w) * y)
  rhs = jnp.sum(x * layers.conv(y, layers.adjoint_kernel(w)))  # <Wx, y> = <x, W*y>
  np.testing.assert_allclose(lhs, rhs, rtol=1e-5)


def test_cnn_ccl_each_pair_trains_only_its_own_layers():
  r, state, batch = cnn_ccl()

  def term(name):
    return lambda p: r.rule.losses(p, batch)[1][name]

  expect = {  # pair l trains forward block l and the feedback conv mapping back to pair l
    'layer_loss/0': {"['feedback']['layer_1']['kernel']"},
    'layer_loss/1': {"['forward']['layer_1']['kernel']", "['feedback']['layer_2']['kernel']"},
    'layer_loss/2': {"['forward']['layer_2']['kernel']", "['feedback']['layer_3']['kernel']"},
    'task_loss': {"['forward']['layer_3']['kernel']"},
  }
  grads = jax.jit(lambda p: {name: jax.grad(term(name))(p) for name in expect})(state.params)
  for name, want in expect.items():
    assert nonzero_leaves(grads[name]) == want, name


@pytest.mark.heavy
def test_cnn_ccl_learns_digits(tmp_path):
  c = load_config('cifar10_ccl', dataset='digits')
  c.cnn.channels, c.batch_size, c.data.crop_pad, c.num_epochs = (16, 32, 32), 64, 1, 20
  c.steps_per_call, c.scan_unroll, c.progress, c.seed = 0, 1, False, 2023
  c.data.normalize, c.ccl.loss_warmup_steps = 'mean_std', 0  # grey digits; a 400-step run
  final = train.train_and_evaluate(c, str(tmp_path))
  assert final['test_accuracy'] >= 0.8, final


def test_cnn_ccl_analyze_pairs_each_conv_with_its_feedback_conv():
  from ccl_jax import layers

  r, state, batch = cnn_ccl()
  forward = state.params['forward']
  mirrored = {n: {'kernel': layers.adjoint_kernel(forward[n]['kernel'])} for n in forward}
  out = jax.jit(r.rule.analyze)(
    state.replace(params={'forward': forward, 'feedback': mirrored}), batch
  )
  for n in forward:
    np.testing.assert_allclose(out[f'weight_angle/{n}'], 0.0, atol=0.1)
  assert 0 < float(out['cka/pair_1']) <= 1


def test_cnn_ccl_loss_warmup_scales_the_first_gradients():
  r0, state, batch = cnn_ccl()
  r4 = cnn_ccl(ccl__loss_warmup_steps=4)[0]
  g0 = jax.jit(r0.rule.gradients)(state, batch, None)[0]
  grads4 = jax.jit(r4.rule.gradients)  # one compile: the step is traced
  for step, scale in ((0, 0.25), (2, 0.75), (7, 1.0)):
    g = grads4(state.replace(step=jnp.asarray(step, jnp.int32)), batch, None)[0]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, scale * b, rtol=1e-5, atol=1e-8), g, g0)


def test_reference_cnn_configs_follow_the_paper():
  from ccl_jax import config as config_lib

  c = load_config('cifar10_ccl')
  o = c.optimizer.forward
  assert (c.model, c.cnn.channels, c.batch_size, c.num_epochs) == (
    'cnn',
    (128, 128, 256, 256, 512),
    128,
    100,
  )
  assert (o.lr, o.momentum, o.weight_decay, o.grad_centralization, o.schedule, o.min_lr) == (
    1.0,
    0.5,
    1e-6,
    True,
    'cosine',
    0.001,
  )
  assert (c.ccl.loss_scale, c.ccl.self_scale, c.ccl.loss_warmup_steps) == (1.0, 0.5, 100)
  assert (c.data.crop_pad, c.data.flip, c.data.pad_mode, c.data.normalize) == (
    4,
    True,
    'edge',
    'imagenet',
  )
  assert c.optimizer.feedback.to_dict() == o.to_dict()
  config_lib.validate(c)


def test_filtered_pair_loss_is_the_loss_of_the_kept_rows():
  from ccl_jax.rules.counter_current import normalized_pair_loss

  rng = np.random.default_rng(2)
  h, g = jnp.asarray(rng.normal(size=(6, 5))), jnp.asarray(rng.normal(size=(3, 5)))
  y = jax.nn.one_hot(jnp.array([0, 1, 2, 2, 1, 0]), 3)
  keep = jnp.array([1, 0, 1, 1, 0, 1], bool)
  got = normalized_pair_loss(h, g, y, 1.0, 0.5, keep=keep)
  want = normalized_pair_loss(h[keep], g, y[keep], 1.0, 0.5)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(
    normalized_pair_loss(h, g, y, 1.0, 0.5, keep=jnp.ones(6, bool)),
    normalized_pair_loss(h, g, y, 1.0, 0.5),
    rtol=1e-6,
  )
