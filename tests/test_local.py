"""Local error signals: similarity matrices, locality, closed-form first steps, learning."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccl_jax import step as step_lib
from ccl_jax import train
from ccl_jax.models import blocks, mlp
from ccl_jax.rules.base import Task

from conftest import load_config

jax.config.update('jax_default_matmul_precision', 'highest')


def tiny(rule: str, model='mlp', image_shape=(6, 1, 1), k=3, batch=8, seed=0, **overrides):
  config = load_config('default', rule=rule, model=model, mlp__hidden=(5, 4), **overrides)
  r = step_lib.build(config, Task(num_classes=k, image_shape=image_shape, total_steps=10))
  rng = np.random.default_rng(seed)
  batch = {
    'image': jnp.asarray(rng.normal(size=(batch,) + image_shape), jnp.float32),
    'label': jnp.asarray(np.arange(batch) % k, jnp.int32),
  }
  return r, jax.jit(r.init)(jax.random.PRNGKey(seed), batch), batch


def nonzero_leaves(tree) -> set[str]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p) for p, v in flat if np.any(np.asarray(v) != 0)}


def test_similarity_of_one_hot_labels_is_closed_form():
  labels = jnp.array([0, 1, 2, 0, 3, 1])
  k = 4
  s = blocks.similarity(jax.nn.one_hot(labels, k))
  want = np.where(labels[:, None] == labels[None, :], 1.0, -1.0 / (k - 1))
  np.testing.assert_allclose(s, want, atol=1e-6)


def test_similarity_of_conv_features_uses_per_channel_spatial_std():
  x = jax.random.normal(jax.random.PRNGKey(0), (5, 4, 3, 6))
  std = np.asarray(x).reshape(5, 12, 6).std(axis=1, ddof=1)
  c = std - std.mean(1, keepdims=True)
  c /= np.linalg.norm(c, axis=1, keepdims=True)
  np.testing.assert_allclose(blocks.similarity(x), np.clip(c @ c.T, -1, 1), atol=1e-5)


@pytest.mark.parametrize(
  'shape,limit,want',
  [
    ((32, 32, 128), 2048, (8, 8)),
    ((32, 32, 256), 2048, (16, 8)),
    ((16, 16, 256), 2048, (8, 4)),
    ((8, 8, 512), 2048, (4, 4)),
    ((4, 4, 128), 2048, (1, 1)),
    ((2, 2, 4096), 2048, (2, 2)),
  ],
)
def test_pred_head_pool_brings_features_under_dim_in_decoder(shape, limit, want):
  assert blocks.pool_size(shape, limit) == want


@pytest.mark.parametrize(
  'rule,bio', [('pred', False), ('sim', False), ('predsim', False), ('predsim', True)]
)
def test_each_block_trains_only_on_its_own_loss(rule, bio):
  r, state, batch = tiny(rule, local__bio=bio)
  for _ in range(2):  # off the zero-initialised pred heads, which pass no error back at first
    state, _ = jax.jit(r.update)(state, batch)
  forward, rng = state.params['forward'], jax.random.PRNGKey(1)

  terms = [f'{h}_loss/block_{b}' for b in (1, 2) for h in r.rule.heads] + ['classifier_loss']

  @jax.jit
  def all_grads(forward):  # every term's gradient, and the summed loss's, in one compile
    grad_of = lambda t: jax.grad(lambda p: r.rule.losses(p, state.extra, batch, rng)[1][0][t])
    total = r.rule.gradients(state, batch, rng)[0]['forward']['classifier']
    return {t: grad_of(t)(forward) for t in terms}, total

  grads, total = all_grads(forward)
  heads = {'pred': ('pred_kernel', 'pred_bias'), 'sim': ('sim',)}
  for block in (1, 2):
    for head in r.rule.heads:
      got = nonzero_leaves(grads[f'{head}_loss/block_{block}'])
      assert got and all(f"['block_{block}']" in p for p in got), (head, block, got)
      # The block's own layer learns from it; the other head's parameters do not.
      assert any("['dense']" in p for p in got), got
      other = [h for h in r.rule.heads if h != head]
      assert not any(f"['{n}" in p for h in other for n in heads[h] for p in got), got
  top = grads['classifier_loss']
  assert {p.split(']')[0] for p in nonzero_leaves(top)} == {"['classifier'"}
  # In the summed loss (`total`) the classifier's CE is scaled by (1 − β) under predsim only.
  scale = 1 - r.rule.beta if r.rule.heads == ('pred', 'sim') else 1.0
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, scale * b, rtol=1e-5, atol=1e-7),
    total,
    top['classifier'],
  )


def test_local_losses_read_the_block_before_dropout():
  r0, state, batch = tiny('predsim')
  r5 = tiny('predsim', local__dropout=0.5)[0]
  args = (state.params['forward'], state.extra, batch, jax.random.PRNGKey(1))
  m0, m5 = r0.rule.losses(*args)[1][0], r5.rule.losses(*args)[1][0]
  for k in ('pred_loss/block_1', 'sim_loss/block_1'):
    assert float(m0[k]) == float(m5[k]), k
  assert float(m0['sim_loss/block_2']) != float(m5['sim_loss/block_2'])


def test_global_rule_backpropagates_through_every_block():
  r, state, batch = tiny('global')
  g = jax.grad(lambda p: r.rule.losses(p, state.extra, batch, jax.random.PRNGKey(1))[0])(
    state.params['forward']
  )
  assert {
    "['block_1']['dense']['kernel']",
    "['block_2']['dense']['kernel']",
    "['classifier']['kernel']",
  } <= nonzero_leaves(g)


def test_first_pred_step_gradient_is_closed_form():
  """Zero-initialised heads: logits 0, so ∂CE/∂W = hᵀ(1/K − onehot)/B, and the loss is log K;
  h = relu(BN(x W)) with batch statistics (scale 1, offset 0, ε = 1e-5)."""
  r, state, batch = tiny('pred', mlp__activation='relu')
  forward = state.params['forward']
  _, (metrics, _) = r.rule.losses(forward, state.extra, batch, jax.random.PRNGKey(1))
  np.testing.assert_allclose(metrics['pred_loss/block_1'], np.log(3), rtol=1e-6)
  x = np.asarray(batch['image']).reshape(8, -1)
  z = x @ np.asarray(forward['block_1']['dense']['kernel'])
  h = np.maximum((z - z.mean(0)) / np.sqrt(z.var(0) + 1e-5), 0)
  onehot = np.eye(3)[np.asarray(batch['label'])]
  grads = r.rule.gradients(state, batch, jax.random.PRNGKey(1))[0]['forward']
  np.testing.assert_allclose(grads['block_1']['pred_kernel'], h.T @ (1 / 3 - onehot) / 8, atol=1e-5)


def test_bio_pred_heads_use_fixed_feedback_and_binary_codes():
  r, state, batch = tiny('pred', local__bio=True)
  _, (metrics, _) = r.rule.losses(
    state.params['forward'], state.extra, batch, jax.random.PRNGKey(1)
  )
  np.testing.assert_allclose(metrics['pred_loss/block_1'], np.log(2), rtol=1e-6)  # BCE at logit 0
  assert state.extra['fixed']['label_projection'].shape == (3, 128)
  step = jax.jit(r.update)
  new, _ = step(state, batch)
  new, _ = step(new, batch)
  jax.tree.map(np.testing.assert_array_equal, new.extra['fixed'], state.extra['fixed'])
  # The head's error reaches the block through B, not W: with B replaced by W, the block's
  # gradient changes (W is non-zero after two steps).
  w = new.params['forward']['block_1']['pred_kernel']
  assert float(jnp.abs(w).max()) > 0
  swapped = jax.tree.map(lambda x: x, new.extra)
  swapped['fixed']['block_1']['pred_feedback'] = w
  grad = lambda extra: jax.grad(
    lambda p: r.rule.losses(p, extra, batch, jax.random.PRNGKey(1))[1][0]['pred_loss/block_1']
  )(new.params['forward'])['block_1']['dense']['kernel']
  assert not np.allclose(grad(new.extra), grad(swapped))


def test_batch_statistics_update_and_are_used_at_evaluation():
  r, state, batch = tiny('predsim', local__dropout=0.5)
  new, _ = jax.jit(r.update)(state, batch)
  x = np.asarray(batch['image']).reshape(8, -1)
  z = x @ np.asarray(state.params['forward']['block_1']['dense']['kernel'])
  stats = new.extra['batch_stats']['block_1']['bn']
  np.testing.assert_allclose(stats['mean'], 0.1 * z.mean(0), atol=1e-5)  # momentum 0.9, from 0
  np.testing.assert_allclose(stats['var'], 0.9 + 0.1 * z.var(0), rtol=1e-5)  # from 1, biased
  # Evaluation: running statistics, no dropout; a NumPy forward pass of the two blocks.
  p, act = new.params['forward'], mlp.ACTIVATIONS['elu']
  h = x
  for b in ('block_1', 'block_2'):
    s, bn = new.extra['batch_stats'][b]['bn'], p[b]['bn']
    z = h @ np.asarray(p[b]['dense']['kernel'])
    h = np.asarray(act((z - s['mean']) / np.sqrt(s['var'] + 1e-5) * bn['scale'] + bn['bias']))
  want = h @ np.asarray(p['classifier']['kernel']) + np.asarray(p['classifier']['bias'])
  np.testing.assert_allclose(r.rule.predict(new.params, batch['image'], new.extra), want, atol=1e-5)


@pytest.mark.heavy
def test_vgg8b_blocks_run_with_pooled_pred_heads():
  r, state, batch = tiny(
    'predsim',
    model='vgg8b',
    image_shape=(16, 16, 3),
    vgg__feat_mult=1 / 32,
    local__dim_in_decoder=256,
  )
  p = state.params['forward']
  assert p['block_1']['conv']['kernel'].shape == (3, 3, 3, 4)
  assert p['block_1']['sim']['kernel'].shape == (3, 3, 4, 4)
  # 16×16×4 pooled 2×2 and 16×16×8 pooled 4×2: 256 features reach each pred head.
  assert p['block_1']['pred_kernel'].shape == (256, 3)
  assert p['block_2']['pred_kernel'].shape == (256, 3)
  assert p['block_7']['dense']['kernel'].shape == (16, 1024)  # the FC block after 4 pools
  new, metrics = jax.jit(r.update)(state, batch)
  assert all(np.isfinite(float(v)) for v in metrics.values()), metrics  # 1×1 maps included
  assert jax.jit(r.rule.predict)(new.params, batch['image'], new.extra).shape == (8, 3)


@pytest.mark.parametrize('rule', ['global', 'predsim'])
def test_local_rules_learn_digits(rule, tmp_path):
  config = load_config('digits_predsim', rule=rule, num_epochs=6, progress=False)
  final = train.train_and_evaluate(config, str(tmp_path))
  assert final['test_accuracy'] >= 0.93, final


def test_one_mnist_epoch_of_predsim_learns(data_dir, tmp_path):
  config = load_config('mnist_mlp_predsim', data_dir=data_dir, num_epochs=1, progress=False)
  final = train.train_and_evaluate(config, str(tmp_path))
  assert final['test_accuracy'] >= 0.95, final


def test_resume_restores_batch_statistics_and_augmentation_exactly(tmp_path):
  kw = {
    'num_epochs': 2,
    'local.dropout': 0.2,
    'progress': False,
    'mlp.hidden': (64, 64),
    'data.crop_pad': 1,
    'data.flip': True,
    'optimizer.forward.schedule': 'constant',
  }
  straight = train.train_and_evaluate(load_config('digits_predsim', **kw), str(tmp_path / 'a'))
  train.train_and_evaluate(
    load_config('digits_predsim', **{**kw, 'num_epochs': 1}), str(tmp_path / 'b')
  )
  resumed = train.train_and_evaluate(load_config('digits_predsim', **kw), str(tmp_path / 'b'))
  assert resumed['test_accuracy'] == straight['test_accuracy']
  assert resumed['test_loss'] == straight['test_loss']
