"""Residual networks: the published shapes, B = W is backprop for every feedback rule, learning."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccl_jax import metrics, train
from ccl_jax import step as step_lib
from ccl_jax.models import resnet
from ccl_jax.rules.base import Task

from conftest import load_config

jax.config.update('jax_default_matmul_precision', 'highest')


@pytest.mark.parametrize(
  'name,shape,params',
  [
    ('resnet18', (224, 224, 3), 11_689_512),  # torchvision's counts
    ('resnet50', (224, 224, 3), 25_557_032),
    ('resnet20', (32, 32, 3), 272_474),  # He et al.: 0.27M (1×1 projection shortcuts)
    ('resnet56', (32, 32, 3), 855_770),
  ],
)
def test_parameter_counts(name, shape, params):
  stem, block, stages, width = resnet.DEPTHS[name]
  k = 1000 if stem == 'imagenet' else 10
  net = resnet.ResNet(num_classes=k, stem=stem, block=block, stages=stages, width=width)
  v = jax.eval_shape(net.init, jax.random.PRNGKey(0), jnp.zeros((1,) + shape))
  assert sum(x.size for x in jax.tree.leaves(v['params'])) == params


def learner(rule: str, **kw):
  config = load_config(f'cifar10_resnet20_{rule}', dataset='digits', resnet__width_mult=0.25, **kw)
  return step_lib.build(config, Task(10, (8, 8, 1), 10))


@pytest.mark.heavy
@pytest.mark.parametrize('rule', ['fa', 'sign_symmetry', 'kp', 'wm'])
def test_resnet20_with_b_equal_w_is_backprop_bitwise(rule):
  rng = np.random.default_rng(0)
  batch = {
    'image': jnp.asarray(rng.normal(size=(8, 8, 8, 1)), jnp.float32),
    'label': jnp.asarray(np.arange(8) % 10, jnp.int32),
  }
  ours, bp = learner(rule), learner('bp')
  state = jax.jit(ours.init)(jax.random.PRNGKey(1), batch)
  forward = state.params['forward']
  aligned = state.replace(
    params={
      'forward': forward,
      'feedback': metrics.backprop_feedback(forward, state.params['feedback']),
    }
  )
  g, m, extra = jax.jit(ours.rule.gradients)(aligned, batch, jax.random.PRNGKey(2))
  want, want_m, want_extra = jax.jit(bp.rule.gradients)(
    aligned.replace(params={'forward': forward, 'feedback': {}}), batch, jax.random.PRNGKey(2)
  )
  jax.tree.map(np.testing.assert_array_equal, g['forward'], want['forward'])
  jax.tree.map(np.testing.assert_array_equal, extra, want_extra)  # the same BatchNorm statistics
  np.testing.assert_array_equal(m['loss'], want_m['loss'])


@pytest.mark.heavy
@pytest.mark.parametrize('rule,threshold', [('bp', 0.9), ('kp', 0.85)])
def test_resnet20_learns_digits(rule, threshold, tmp_path):
  config = load_config(
    f'cifar10_resnet20_{rule}',
    dataset='digits',
    resnet__width_mult=0.5,
    num_epochs=6,
    batch_size=64,
    progress=False,
    steps_per_call=0,
    scan_unroll=1,
    data__crop_pad=0,
    data__flip=False,  # 4-pixel crops and flips would wreck 8×8 digits
  )
  config.optimizer.forward.lr = 0.05
  final = train.train_and_evaluate(config, str(tmp_path))
  assert final['test_accuracy'] >= threshold, final
  chex.assert_tree_all_finite(final['test_loss'])
