"""Feedback-aware dense and conv layers: the error reaches the input through B, never through W.

Convention. A forward kernel W has flax's layout — dense (in, out), conv (kh, kw, in, out) — and its
feedback kernel B has exactly W's layout and shape. B = W gives exactly backprop: the backward pass
to x is the vjp of the plain op with W replaced by B, so with B = W it is the very computation
`jax.grad` does (dense: dx = g Bᵀ where BP has g Wᵀ). Nothing is ever transposed, neither in the
backward pass nor in the rules' updates of B. W's cotangent is the usual one; B receives a zero
cotangent (rules update B themselves).

`FeedbackDense` / `FeedbackConv` keep W (and an optional bias) in 'params' and B under the same
name ('kernel') in the 'feedback' collection, so `params` and `feedback` trees line up by path.
Each applies its activation itself (`y = φ(op(x, W) + b)`), which makes a layer's response
self-contained for weight mirroring, and marks its pre-activation with `perturb('preact')` so the
error signal arriving there can be read (see `metrics.delta_angles`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Initializer = Callable[..., Array]


def dense(x: Array, w: Array) -> Array:
  """Plain dense op: contracts x's last axis with w's first."""
  return jnp.dot(x, w)


def conv(
  x: Array,
  w: Array,
  strides: tuple[int, int] = (1, 1),
  padding: str | tuple[tuple[int, int], ...] = 'SAME',
) -> Array:
  """Plain 2-D convolution, NHWC input, HWIO kernel."""
  return jax.lax.conv_general_dilated(
    x, w, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def through_feedback(op: Callable[[Array, Array], Array], x: Array, w: Array, b: Array) -> Array:
  """`op(x, w)` forward; backward: x's cotangent as if `b` were `w`, w's as usual, b's zero."""
  return op(x, w)


def _fwd(op, x, w, b):
  return op(x, w), (x, w, b)


def _bwd(op, res, g):
  x, w, b = res
  _, vjp_w = jax.vjp(lambda w_: op(x, w_), w)
  _, vjp_x = jax.vjp(lambda x_: op(x_, b), x)
  return vjp_x(g)[0], vjp_w(g)[0], jnp.zeros_like(b)


through_feedback.defvjp(_fwd, _bwd)


def feedback_dense(x: Array, w: Array, b: Array) -> Array:
  """x @ w, with the error sent back to x as g @ bᵀ (b of w's shape (in, out))."""
  return through_feedback(dense, x, w, b)


def feedback_conv(
  x: Array,
  w: Array,
  b: Array,
  strides: tuple[int, int] = (1, 1),
  padding: str | tuple[tuple[int, int], ...] = 'SAME',
) -> Array:
  """conv(x, w), with the error sent back to x as the transposed conv with kernel b (w's shape)."""
  return through_feedback(_conv_op(tuple(strides), _hashable(padding)), x, w, b)


@functools.cache
def _conv_op(strides, padding) -> Callable[[Array, Array], Array]:
  return functools.partial(conv, strides=strides, padding=padding)


def _hashable(padding):
  return padding if isinstance(padding, str) else tuple(tuple(p) for p in padding)


def _identity(x: Array) -> Array:
  return x


class _FeedbackLayer(nn.Module):
  """Shared body of the feedback-aware layers: W, optional bias, B, activation, preact probe."""

  activation: Callable[[Array], Array] = _identity
  use_bias: bool = False
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros
  feedback_init: Initializer | None = None  # default: W's initializer (own key, same shape)

  def kernel_shape(self, x: Array) -> tuple[int, ...]:
    raise NotImplementedError

  def op(self) -> Callable[[Array, Array], Array]:
    """The plain (forward) op as a function of (x, W)."""
    raise NotImplementedError

  def _variables(self, x: Array) -> tuple[Array, Array, Array | None]:
    shape = self.kernel_shape(x)
    w = self.param('kernel', self.kernel_init, shape)
    b_init = self.feedback_init or self.kernel_init
    fb = self.variable('feedback', 'kernel', lambda: b_init(self.make_rng('params'), shape)).value
    bias = self.param('bias', self.bias_init, (shape[-1],)) if self.use_bias else None
    return w, fb, bias

  @nn.compact
  def __call__(self, x: Array) -> Array:
    w, fb, bias = self._variables(x)
    z = through_feedback(self.op(), x, w, fb)
    if bias is not None:
      z = z + bias
    z = self.perturb('preact', z)  # a no-op unless a 'perturbations' collection is passed
    return self.activation(z)

  def response(self, x: Array) -> Array:
    """φ(op(x, W) + b) with the bound variables, no feedback involved (for weight mirroring)."""
    v = self.variables['params']
    z = self.op()(x, v['kernel'])
    if 'bias' in v:
      z = z + v['bias']
    return self.activation(z)


class FeedbackDense(_FeedbackLayer):
  """Dense layer whose backward pass to its input uses the 'feedback' kernel B (in, out), as W."""

  features: int = 1

  def kernel_shape(self, x):
    return (x.shape[-1], self.features)

  def op(self):
    return dense


class FeedbackConv(_FeedbackLayer):
  """2-D conv (NHWC) whose backward pass to its input uses the 'feedback' kernel B (HWIO)."""

  features: int = 1
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: Any = 'SAME'

  def kernel_shape(self, x):
    return tuple(self.kernel_size) + (x.shape[-1], self.features)

  def op(self):
    return _conv_op(tuple(self.strides), _hashable(self.padding))


FEEDBACK_LAYERS = (FeedbackDense, FeedbackConv)


@jax.custom_vjp
def few_rows_dot(x: Array, w: Array) -> Array:
  """x (K, in) @ w (in, out) for a handful of rows K (CCL's class prototypes).

  Same value and gradient as `x @ w`, but w's cotangent Σ_k x_kᵀ g_k is formed as K broadcast
  outer products summed in one fused loop instead of a K-deep matmul, which XLA:CPU runs poorly
  (it is memory-bound: K ≪ in, out).
  """
  return x @ w


def _few_rows_fwd(x, w):
  return x @ w, (x, w)


def _few_rows_bwd(res, g):
  x, w = res
  dw = jnp.sum(x[:, :, None] * g[:, None, :], axis=0).astype(w.dtype)
  return (g @ w.T).astype(x.dtype), dw


few_rows_dot.defvjp(_few_rows_fwd, _few_rows_bwd)


def few_rows_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """`jax.lax.dot_general`'s signature for flax's `nn.Dense(dot_general=...)` (2-D dense only)."""
  (lc, rc), (lb, rb) = dimension_numbers
  if lhs.ndim != 2 or tuple(lc) != (1,) or tuple(rc) != (0,) or lb or rb:
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)
  return few_rows_dot(lhs, rhs)
