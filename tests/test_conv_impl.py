"""The im2col convs and reshape max-pools (`config.conv_impl`) against XLA's lax.conv and
reduce_window: values and gradients to float tolerance, plain and feedback-aware."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccl_jax import config as config_lib
from ccl_jax import layers
from ccl_jax import step as step_lib
from ccl_jax.errors import UserError
from ccl_jax.rules.base import Task

from conftest import load_config

TOL = dict(rtol=1e-5, atol=1e-5)


def normal(seed: int, shape: tuple[int, ...]) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def lax_conv(x, w, strides, padding):
  return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=layers.NHWC)


# (input HW, kernel, strides, padding): the cnn/VGG 3×3s, ResNet's strided 3×3, 1×1 shortcuts and
# 7×7 stem, the autoencoder's explicit padding, VALID, odd sizes (MNIST's 7 → 4) and 2×2 maps.
CASES = [
  ((8, 8), (3, 3), (1, 1), 'SAME'),
  ((7, 7), (3, 3), (1, 1), 'SAME'),
  ((2, 2), (3, 3), (1, 1), 'SAME'),
  ((7, 6), (3, 3), (2, 2), 'SAME'),
  ((8, 8), (3, 3), (2, 2), ((1, 1), (1, 1))),
  ((8, 8), (1, 1), (1, 1), 'SAME'),
  ((7, 7), (1, 1), (2, 2), 'SAME'),
  ((9, 9), (7, 7), (2, 2), 'SAME'),
  ((6, 7), (3, 3), (1, 1), 'VALID'),
  ((6, 6), (3, 3), (1, 1), ((0, 2), (2, 1))),
]


@pytest.mark.parametrize('channels', [(3, 6), (6, 4)])  # stride 1, fewer out: output-side patches
@pytest.mark.parametrize('hw,kernel,strides,padding', CASES)
def test_im2col_conv_value_and_gradients_equal_lax_conv(hw, kernel, strides, padding, channels):
  x, w = normal(0, (3,) + hw + (channels[0],)), normal(1, kernel + channels)
  y, vjp = jax.vjp(lambda x, w: layers.im2col_conv(x, w, strides, padding), x, w)
  ref, ref_vjp = jax.vjp(lambda x, w: lax_conv(x, w, strides, padding), x, w)
  chex.assert_trees_all_close(y, ref, **TOL)
  g = normal(2, ref.shape)
  chex.assert_trees_all_close(vjp(g), ref_vjp(g), **TOL)  # (dx, dw)


WINOGRAD_CASES = [  # (input HW, padding): even and odd maps, VALID, uneven explicit pads
  ((8, 8), 'SAME'),
  ((11, 9), 'SAME'),
  ((4, 4), 'SAME'),
  ((6, 7), 'VALID'),
  ((7, 6), ((0, 2), (2, 1))),
]


def rel_err(a, b) -> float:
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize('tile', [2, 4])
@pytest.mark.parametrize('channels', [(32, 40), (40, 32)])
@pytest.mark.parametrize('hw,padding', WINOGRAD_CASES)
def test_winograd_conv_value_and_gradients_equal_lax_conv(hw, padding, channels, tile):
  """F(2, 3) and F(4, 3) against lax.conv at HIGHEST precision, relative to the largest value:
  F(4, 3)'s larger transform entries cost fp32 digits (measured ~1e-5)."""
  x, w = normal(0, (2,) + hw + (channels[0],)), normal(1, (3, 3) + channels)
  y, vjp = jax.vjp(lambda x, w: layers.winograd_conv(x, w, (1, 1), padding, tile=tile), x, w)
  exact = lambda x, w: jax.lax.conv_general_dilated(
    x, w, (1, 1), padding, dimension_numbers=layers.NHWC, precision='highest'
  )
  ref, ref_vjp = jax.vjp(exact, x, w)
  bound = 1e-5 if tile == 2 else 5e-5
  assert rel_err(y, ref) < bound
  g = normal(2, ref.shape)
  for ours, theirs in zip(vjp(g), ref_vjp(g)):  # dx, dw
    assert rel_err(ours, theirs) < bound


def test_winograd_picks_its_tile_by_map_size_and_falls_back_to_im2col():
  assert layers.winograd_tile((3, 3, 64, 64), (1, 1), (16, 16)) == 4
  assert layers.winograd_tile((3, 3, 64, 64), (1, 1), (4, 5)) == 2
  assert layers.winograd_tile((3, 3, 64, 64), (1, 1), (2, 2)) == 0  # one tile: slower
  x = normal(0, (2, 6, 6, 3))
  for w, strides in [(normal(1, (3, 3, 3, 40)), (1, 1)), (normal(1, (3, 3, 3, 40)), (2, 2))]:
    assert layers.winograd_tile(w.shape, strides, (6, 6)) == 0
    chex.assert_trees_all_close(
      layers.winograd_conv(x, w, strides), lax_conv(x, w, strides, 'SAME'), **TOL
    )


@pytest.mark.parametrize('channels', [(3, 4), (4, 3)])
@pytest.mark.parametrize('hw,kernel,strides,padding', CASES[:5])
def test_feedback_conv_sends_the_error_through_b_under_im2col(
  hw, kernel, strides, padding, channels
):
  """x's gradient is the lax.conv-transposed one with B as the kernel, W's is BP's, B's zero."""
  x = normal(0, (2,) + hw + (channels[0],))
  w, b = normal(1, kernel + channels), normal(2, kernel + channels)
  fb = lambda x, w, b: layers.feedback_conv(x, w, b, strides, padding, impl='im2col')
  y, vjp = jax.vjp(fb, x, w, b)
  chex.assert_trees_all_close(y, lax_conv(x, w, strides, padding), **TOL)
  g = normal(3, y.shape)
  dx, dw, db = vjp(g)
  ref_dx = jax.vjp(lambda x: lax_conv(x, b, strides, padding), x)[1](g)[0]
  ref_dw = jax.vjp(lambda w: lax_conv(x, w, strides, padding), w)[1](g)[0]
  chex.assert_trees_all_close(dx, ref_dx, **TOL)
  chex.assert_trees_all_close(dw, ref_dw, **TOL)
  np.testing.assert_array_equal(db, jnp.zeros_like(b))


def test_feedback_conv_module_is_the_same_under_either_impl():
  x = normal(0, (2, 6, 6, 3))
  module = layers.FeedbackConv(features=4, use_bias=True, activation=jnp.tanh)
  variables = module.init(jax.random.PRNGKey(0), x)

  def grads(impl):
    module = layers.FeedbackConv(features=4, use_bias=True, activation=jnp.tanh, impl=impl)
    loss = lambda p, x: jnp.sum(module.apply({**variables, 'params': p}, x) ** 2)
    return jax.grad(loss, (0, 1))(variables['params'], x)

  chex.assert_trees_all_close(grads('im2col'), grads('xla'), **TOL)
  chex.assert_trees_all_close(grads('winograd'), grads('xla'), **TOL)


def test_flax_conv_module_matches_nn_conv():
  """`layers.Conv` (flax's Conv through `layers.conv_general_dilated`), bias and strides."""
  x = normal(0, (2, 7, 7, 3))
  ours = layers.Conv(4, (3, 3), strides=(2, 2), padding='SAME', impl='im2col')
  ref = nn.Conv(4, (3, 3), strides=(2, 2), padding='SAME')
  params = ours.init(jax.random.PRNGKey(0), x)['params']
  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply({'params': p}, x)))
  chex.assert_trees_all_close(
    ours.apply({'params': params}, x), ref.apply({'params': params}, x), **TOL
  )
  chex.assert_trees_all_close(
    jax.grad(loss(ours), (0, 1))(params, x), jax.grad(loss(ref), (0, 1))(params, x), **TOL
  )


def test_conv_general_dilated_falls_back_to_lax_for_what_im2col_does_not_cover():
  x, w = normal(0, (2, 6, 6, 4)), normal(1, (3, 3, 2, 4))
  grouped = layers.conv_general_dilated(
    x, w, (1, 1), 'SAME', dimension_numbers=layers.NHWC, feature_group_count=2, impl='im2col'
  )
  ref = jax.lax.conv_general_dilated(
    x, w, (1, 1), 'SAME', dimension_numbers=layers.NHWC, feature_group_count=2
  )
  chex.assert_trees_all_close(grouped, ref)
  w = normal(1, (3, 3, 4, 4))
  dilated = layers.conv_general_dilated(
    x, w, (1, 1), 'SAME', rhs_dilation=(2, 2), dimension_numbers=layers.NHWC, impl='im2col'
  )
  ref = jax.lax.conv_general_dilated(
    x, w, (1, 1), 'SAME', rhs_dilation=(2, 2), dimension_numbers=layers.NHWC
  )
  chex.assert_trees_all_close(dilated, ref)


# -- max-pool -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
  'hw,window,padding',
  [
    ((8, 8), (2, 2), 'SAME'),
    ((7, 5), (2, 2), 'SAME'),
    ((7, 5), (2, 2), 'VALID'),
    ((9, 9), (3, 3), 'SAME'),
  ],
)
@pytest.mark.parametrize('ties', [False, True])
def test_block_max_pool_value_and_gradient_equal_reduce_window(hw, window, padding, ties):
  """Ties (integer-valued input): the gradient goes to the first maximum of each window in
  row-major order, as XLA's select-and-scatter routes it, so even then the two agree exactly."""
  x = normal(0, (2,) + hw + (3,))
  x = jnp.round(x) if ties else x
  ours = lambda x: layers.max_pool(x, window, window, padding, impl='im2col')
  ref = lambda x: nn.max_pool(x, window, window, padding)
  y, vjp = jax.vjp(ours, x)
  y_ref, vjp_ref = jax.vjp(ref, x)
  np.testing.assert_array_equal(y, y_ref)
  g = normal(1, y.shape)
  np.testing.assert_array_equal(vjp(g)[0], vjp_ref(g)[0])


def test_overlapping_pools_stay_with_reduce_window():
  x = normal(0, (2, 8, 8, 3))
  ours = layers.max_pool(x, (3, 3), (2, 2), 'SAME', impl='im2col')
  np.testing.assert_array_equal(ours, nn.max_pool(x, (3, 3), (2, 2), 'SAME'))


# -- activation and upsampling -------------------------------------------------------------------
def test_elu_value_and_gradient_match_flax():
  z = jnp.concatenate([jnp.linspace(-30, 30, 2001), jnp.zeros(1)])
  np.testing.assert_array_equal(layers.elu(z), nn.elu(z))
  grad = lambda f: jax.grad(lambda z: jnp.sum(jnp.sin(f(z))))(z)
  chex.assert_trees_all_close(grad(layers.elu), grad(nn.elu), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('size', [(14, 10), (7, 5), (4, 3), (13, 10)])
def test_upsample_nearest_equals_resize(size):
  x = normal(0, (2, 7, 5, 3))
  np.testing.assert_array_equal(
    layers.upsample_nearest(x, size), jax.image.resize(x, (2,) + size + (3,), 'nearest')
  )


# -- selection ------------------------------------------------------------------------------------
def test_conv_impl_resolves_auto_per_backend_and_refuses_unknown_names():
  assert layers.resolve_conv_impl('auto') == (
    'winograd' if jax.default_backend() == 'cpu' else 'xla'
  )
  assert layers.resolve_conv_impl('xla') == 'xla'
  assert layers.resolve_conv_impl('winograd') == 'winograd'
  with pytest.raises(ValueError, match='fft'):
    layers.resolve_conv_impl('fft')
  config = load_config('mnist_cnn_fa', conv_impl='fft')
  with pytest.raises(UserError, match='conv_impl'):
    config_lib.finalize(config)


@pytest.mark.parametrize('rule', ['bp', 'fa'])
def test_cnn_gradients_agree_between_impls(rule):
  """A small cnn_pool net's training gradients under each config.conv_impl (its second conv is
  wide enough for Winograd); the config's choice reaches the model (`models.forward`), and the
  learners live side by side."""
  x, y = normal(0, (4, 8, 8, 1)), jnp.arange(4) % 10
  batch = {'image': x, 'label': y}
  learners = {}
  for impl in ('xla', 'im2col', 'winograd'):
    config = load_config('mnist_cnn_fa', rule=rule, cnn__channels=(32, 40), conv_impl=impl)
    learners[impl] = step_lib.build(config_lib.finalize(config), Task(10, (8, 8, 1), 10))
    assert learners[impl].rule.model.conv_impl == impl
  grads = {}
  for impl, learner in learners.items():
    state = jax.jit(learner.init)(jax.random.PRNGKey(0), batch)
    grads[impl] = jax.jit(learner.rule.gradients)(state, batch, jax.random.PRNGKey(1))[0]
  for impl in ('im2col', 'winograd'):
    chex.assert_trees_all_close(grads[impl], grads['xla'], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('activation', ['elu', 'relu', 'sigmoid'])
def test_plain_cnn_pools_before_its_activation_with_the_same_values_and_gradients(activation):
  """Plain (non-feedback) CNNs apply φ after the max-pool; for a nondecreasing φ the outputs, block
  outputs and parameter gradients equal the written order's, conv → φ → pool (lax.conv, nn.max_pool
  and the flax activation), on an odd map (7 → 4 → 2, 'SAME' pools pad with −inf)."""
  from ccl_jax.models import cnn, mlp

  act = {'elu': nn.elu, 'relu': nn.relu, 'sigmoid': nn.sigmoid}[activation]
  net = cnn.CNN(num_classes=10, channels=(32, 40), activation=activation, conv_impl='xla')
  x = normal(3, (4, 7, 7, 2))
  params = net.init(jax.random.PRNGKey(0), x)['params']
  assert activation in mlp.NONDECREASING

  def written_order(params):
    h, hiddens = x, []
    for i in range(2):
      z = lax_conv(h, params[f'layer_{i + 1}']['kernel'], (1, 1), 'SAME')
      h = nn.max_pool(act(z), (2, 2), strides=(2, 2), padding='SAME')
      hiddens.append(h)
    return h.reshape(4, -1) @ params['layer_3']['kernel'], hiddens

  def loss(fn, params):
    out, hiddens = fn(params)
    return jnp.sum(out**2) + sum(jnp.sum(jnp.sin(h)) for h in hiddens)

  ours = lambda p: net.apply({'params': p}, x)  # noqa: E731
  chex.assert_trees_all_close(ours(params), written_order(params), **TOL)
  chex.assert_trees_all_close(
    jax.grad(lambda p: loss(ours, p))(params),
    jax.grad(lambda p: loss(written_order, p))(params),
    **TOL,
  )


def test_activations_marked_nondecreasing_are():
  """Only activations that commute with a max may be pooled first (`mlp.NONDECREASING`)."""
  from ccl_jax.models import mlp

  z = jnp.linspace(-30.0, 30.0, 200001)
  for name in mlp.NONDECREASING:
    assert bool(jnp.all(jnp.diff(mlp.ACTIVATIONS[name](z)) >= 0)), name


@pytest.mark.parametrize('impl', ['xla', 'im2col'])
def test_local_loss_block_nets_take_the_configs_conv_impl(impl):
  """The local-loss rules' VGG block nets are placed like every other net (`models.placed`)."""
  config = load_config('default', rule='predsim', model='vgg8b', conv_impl=impl)
  learner = step_lib.build(config_lib.finalize(config), Task(10, (8, 8, 1), 10))
  assert learner.rule.model.conv_impl == impl
