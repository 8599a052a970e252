"""CCL's convolutional autoencoder (SPEC §1.3): shapes, the pair losses, and that training lowers
the reconstruction MSE (tfds mock STL-10, real CIFAR-10) for BP and CCL."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccl_jax import config as config_lib
from ccl_jax import data as data_lib
from ccl_jax import models
from ccl_jax import step as step_lib
from ccl_jax import train as train_lib
from ccl_jax.rules import counter_current_ae
from ccl_jax.rules.base import Task

from conftest import load_config


def ae_config(rule: str, widths=(4, 8), **overrides):
  c = load_config(f'cifar10_ae_{rule}', ae__widths=widths, **overrides)
  return config_lib.finalize(c)


def task(size: int, steps: int = 10) -> Task:
  return Task(10, (size, size, 3), steps, models.task_kind('ae'))


@pytest.mark.parametrize(
  'size, widths',
  [(96, (128, 256, 1024, 2048)), (32, (128, 256, 1024))],
)
def test_feedback_shapes_mirror_forward(size, widths):
  """At 96 px (4 stride levels, 96 → 6) and 32 px (3 levels, 32 → 4), the feedback twin's signals
  have the shapes of the forward activations they pair with, and every forward conv's mirror
  (same name) has its kernel's adjoint shape (shapes only: nothing is computed)."""
  config = ae_config('ccl', widths)
  t = task(size)
  forward, feedback = models.forward(config, t, local=True), models.feedback(config, t)
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  fv = jax.eval_shape(forward.init, jax.random.PRNGKey(0), x)
  bv = jax.eval_shape(feedback.init, jax.random.PRNGKey(1), x)
  out, hiddens = jax.eval_shape(lambda v: forward.apply(v, x), fv)
  signals = jax.eval_shape(lambda v: feedback.apply(v, x), bv)
  acts = [x] + hiddens + [out]
  assert len(acts) == len(signals) == 2 * len(widths) + 1
  assert [a.shape for a in acts] == [s.shape for s in signals]
  side = size // 2 ** len(widths)
  assert hiddens[len(widths) - 1].shape == (2, side, side, widths[-1])  # the code
  assert out.shape == x.shape
  for name, p in fv['params'].items():
    kh, kw, cin, cout = p['kernel'].shape
    assert bv['params'][name]['kernel'].shape == (kh, kw, cout, cin), name


def test_reference_init():
  """Orthogonal kernels; decoder forward and encoder feedback × 0.001; the image-output convs
  (forward dec_1, feedback enc_1) zero; forward biases zero."""
  config = ae_config('ccl', (8, 16))
  rule = step_lib.build(config, task(8)).rule
  params, extra = rule.init_params(jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 3)))
  f, b = params['forward'], params['feedback']
  assert not np.any(f['dec_1']['kernel']) and not np.any(b['enc_1']['kernel'])
  assert all(not np.any(p['bias']) for p in f.values())
  w = np.asarray(f['enc_2']['kernel']).reshape(-1, 16)  # 72 × 16: orthonormal columns
  np.testing.assert_allclose(w.T @ w, np.eye(16), atol=1e-5)
  v = np.asarray(b['dec_2']['kernel']).reshape(-1, 16)
  np.testing.assert_allclose(v.T @ v, np.eye(16), atol=1e-5)
  # dec_2: 16 → 8 channels, fewer outputs than inputs: orthonormal over the input channels (as
  # PyTorch's orthogonal_ on the transposed kernel), scaled by 0.001.
  w = np.moveaxis(np.asarray(f['dec_2']['kernel']), 2, 3).reshape(-1, 16) / 1e-3
  np.testing.assert_allclose(w.T @ w, np.eye(16), atol=1e-4)
  assert set(extra) == {'forward', 'feedback'}  # both nets' BatchNorm statistics


def _layer_paths(grads) -> set[str]:
  """'forward/enc_1'-style names of the layers whose gradient is not all zero."""
  out = set()
  for tree in ('forward', 'feedback'):
    for name, p in grads[tree].items():
      if any(np.any(np.asarray(v) != 0) for v in jax.tree.leaves(p)):
        out.add(f'{tree}/{name}')
  return out


def test_each_pair_loss_trains_only_its_own_layers():
  """Pair l's loss reaches only the forward layer that emits pair l's activation and the feedback
  layer that emits its signal (the end pairs: one layer each)."""
  n = 2
  config = ae_config('ccl', (4, 8))
  rule = step_lib.build(config, task(8)).rule
  x = jax.random.uniform(jax.random.PRNGKey(0), (4, 8, 8, 3))
  params, extra = jax.jit(rule.init_params)(jax.random.PRNGKey(1), x)
  # Make every kernel non-zero so that no gradient vanishes for the trivial reason of a zero layer.
  params = jax.tree.map(lambda p: p + 0.05, params)
  batch = {'image': x, 'label': jnp.zeros(4, jnp.int32)}
  forward_of = (
    ['input'] + [f'enc_{i}' for i in range(1, n + 1)] + [f'dec_{i}' for i in range(n, 0, -1)]
  )
  feedback_of = (
    [f'enc_{i}' for i in range(1, n + 1)] + [f'dec_{i}' for i in range(n, 0, -1)] + ['target']
  )
  loss = lambda p, l: rule.losses(p, extra, batch)[1][0][f'layer_loss/{l}']
  every = jax.jit(lambda p: [jax.grad(loss)(p, l) for l in range(2 * n + 1)])(params)
  for l, grads in enumerate(every):
    want = {f'forward/{forward_of[l]}', f'feedback/{feedback_of[l]}'} - {
      'forward/input',
      'feedback/target',
    }
    assert _layer_paths(grads) == want, l


def _hand_pair_loss(a, b, end):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  h = a.shape[1]
  loss = np.mean((a - b) ** 2)
  if not end:

    def unit(z):
      z = z - z.mean(axis=(1, 2), keepdims=True)
      return z / (np.sqrt((z**2).sum(axis=(1, 2), keepdims=True)) + 1e-8)

    loss += np.mean((unit(a) - unit(b)) ** 2)
  return h * loss


def test_pair_loss_equals_hand_computation():
  """H·(MSE + MSE of the centred, spatially L2-normalised channel maps); end pairs H·MSE; the
  rule's total is their sum over the pairs its nets produce."""
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(2, 4, 3, 5)), rng.normal(size=(2, 4, 3, 5))
  for end in (False, True):
    got = counter_current_ae.pair_loss(jnp.asarray(a), jnp.asarray(b), 1.0, end)
    np.testing.assert_allclose(float(got), _hand_pair_loss(a, b, end), rtol=1e-5)
  # One channel map by hand: a = [[1, 3]] (1×2), b = [[0, 0]]: MSE 5; centred a = [−1, 1] → unit
  # [−1/√2, 1/√2], b → 0: MSE 1/2; H = 1: the loss is 5.5.
  a1, b1 = jnp.array([[[[1.0], [3.0]]]]), jnp.zeros((1, 1, 2, 1))
  assert float(counter_current_ae.pair_loss(a1, b1, 1.0)) == pytest.approx(5.5, rel=1e-6)
  assert float(counter_current_ae.pair_loss(a1, b1, 2.0, end=True)) == pytest.approx(10.0)
  config = ae_config('ccl', (4, 8))
  rule = step_lib.build(config, task(8)).rule
  x = jax.random.uniform(jax.random.PRNGKey(0), (3, 8, 8, 3))
  params, extra = rule.init_params(jax.random.PRNGKey(1), x)
  total, (metrics, _) = rule.losses(params, extra, {'image': x, 'label': jnp.zeros(3, jnp.int32)})
  acts, signals, _ = rule.pairs(params, extra, x, True)
  want = sum(
    _hand_pair_loss(a, s, end=l in (0, len(acts) - 1))
    for l, (a, s) in enumerate(zip(acts, signals))
  )
  np.testing.assert_allclose(float(total), want, rtol=1e-4)
  np.testing.assert_allclose(float(metrics['mse']), np.mean((acts[-1] - x) ** 2), rtol=1e-5)


def _fit(config, train_images, test_images, steps: int, batch: int = 32):
  """(test MSE before, after) `steps` updates on `train_images`, cycling through them."""
  learner = step_lib.build(config, Task(10, train_images.shape[1:], steps, 'reconstruction'))
  labels = jnp.zeros(batch, jnp.int32)
  state = learner.init(jax.random.PRNGKey(0), {'image': train_images[:batch], 'label': labels})
  evaluate = train_lib.make_eval(learner.rule, config.loss)
  split = data_lib.Split(np.asarray(test_images), np.zeros(len(test_images), np.int32))
  before = train_lib.evaluate_split(evaluate, state.params, state.extra, split, 256)['mse']
  update = jax.jit(learner.update)
  n = len(train_images) // batch
  for i in range(steps):
    j = i % n
    state, metrics = update(
      state, {'image': train_images[j * batch : (j + 1) * batch], 'label': labels}
    )
  assert np.isfinite(float(metrics['loss']))
  after = train_lib.evaluate_split(evaluate, state.params, state.extra, split, 256)['mse']
  return before, after


FAST = dict(  # the configs' optimizers without the warm-ups, at a higher lr: a few steps suffice
  optimizer__forward__lr=0.1,
  optimizer__feedback__lr=0.1,
  optimizer__forward__schedule='constant',
  optimizer__feedback__schedule='constant',
)


def test_mock_stl10_training_lowers_mse(monkeypatch):
  """STL-10 read through tfds.data_source under tfds.testing.mock_data (random 96×96 images):
  data.load gives [0, 1] images, and BP steps on them lower the test reconstruction MSE.

  tfds 4.9's mock data source breaks `__getitems__` (its patched `_getitems` lacks an argument),
  while single-item reads work: the batch read is routed through those here."""
  tfds = pytest.importorskip('tensorflow_datasets')
  from tensorflow_datasets.core.data_sources import array_record

  monkeypatch.setattr(
    array_record.ArrayRecordDataSource, '__getitems__', lambda self, keys: [self[k] for k in keys]
  )
  config = load_config(
    'stl10_ae_bp', ae__widths=(4, 8, 8, 8), train_subset=64, data__cache_dir='', **FAST
  )
  config.optimizer.forward.warmup_steps = 0
  config = config_lib.finalize(config)
  with tfds.testing.mock_data(num_examples=80):
    ds = data_lib.load(config)
  assert ds.image_shape == (96, 96, 3) and len(ds.train) == 64
  assert ds.train.images.min() >= 0 and ds.train.images.max() <= 1
  before, after = _fit(config, jnp.asarray(ds.train.images), ds.test.images[:64], steps=20)
  assert after < 0.8 * before, (before, after)


def test_train_unlabelled_is_for_stl10_autoencoders():
  config = load_config('cifar10_ae_bp', data__train_split='train+unlabelled')
  with pytest.raises(Exception, match='unlabelled'):
    data_lib.load(config_lib.finalize(config))


@pytest.mark.parametrize('rule', ['bp', 'ccl'])
def test_real_cifar10_training_lowers_mse(rule, data_dir):
  """A few hundred real CIFAR-10 images: BP and CCL lower the held-out reconstruction MSE."""
  if not os.path.isdir(os.path.join(data_dir, 'cifar10')):
    pytest.skip(f'no prepared cifar10 in {data_dir}')
  config = load_config(f'cifar10_ae_{rule}', ae__widths=(16, 32, 64), data_dir=data_dir, **FAST)
  if rule == 'ccl':
    config.ccl.loss_warmup_steps = 0
  config = config_lib.finalize(config)
  ds = data_lib.load(config)
  before, after = _fit(config, jnp.asarray(ds.train.images[:320]), ds.test.images[:256], steps=40)
  assert after < 0.7 * before, (rule, before, after)
  print(f'{rule}: test MSE {before:.4f} -> {after:.4f}')


@pytest.mark.parametrize('rule', ['fa', 'sign_symmetry', 'kp', 'ccl'])
def test_rules_train_the_autoencoder_and_log_alignment(rule):
  """FA, sign symmetry and KP train the same net through `layers.FeedbackConv` by reconstruction
  MSE (BatchNorm statistics carried in the state), and CCL; each logs its weight angles."""
  config = load_config('cifar10_ae_bp', ae__widths=(4, 8), rule=rule, **FAST)
  if rule == 'kp':  # KP decays W and B together (kp.decay) instead of weight decay on W alone
    config.optimizer.forward.weight_decay = 0.0
  learner = step_lib.build(config_lib.finalize(config), task(16))
  x = jax.random.uniform(jax.random.PRNGKey(0), (8, 16, 16, 3))
  batch = {'image': x, 'label': jnp.zeros(8, jnp.int32)}
  state = learner.init(jax.random.PRNGKey(1), batch)
  stats = state.extra
  state, metrics = jax.jit(learner.update)(state, batch)
  assert np.isfinite(float(metrics['loss'])) and 'mse' in metrics
  moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), stats, state.extra)
  assert all(jax.tree.leaves(moved))  # every BatchNorm's running statistics were updated
  angles = learner.rule.analyze(state, batch)
  assert {'weight_angle/enc_1', 'weight_angle/dec_2'} <= set(angles), sorted(angles)
