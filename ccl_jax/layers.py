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
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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
  impl: str = 'auto',
) -> Array:
  """Plain 2-D convolution, NHWC input, HWIO kernel, computed by `impl` (see `CONV_IMPLS`)."""
  return conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC, impl=impl)


# -- how convs and pools are computed -------------------------------------------------------------
# XLA:CPU (jaxlib 0.12, which hands convs to YNNPACK) runs `lax.conv` far below its own matmul
# speed on these nets: the weight gradient of a 3×3 conv took 5–20× the forward conv's time, convs
# on 2×2 maps 10× more than their FLOPs need, and a max-pool's gradient (select-and-scatter) as
# long as a conv; the CIFAR-10 cnn_pool trained at 13–16 % of the matmul roof (Eigen's convs, with
# YNNPACK's turned off by flag, still only 24–30 %). 'im2col' makes every conv large matmuls
# (forward, input gradient and weight gradient alike) and every non-overlapping max-pool a reshape
# and a max whose gradient is elementwise: 60–75 % of the roof, 2–4× faster steps. 'winograd' is
# im2col with the wide 3×3 stride-1 convs by Winograd F(2×2, 3×3) (`winograd_conv`), fewer
# multiply-adds than the roof's. 'auto' picks it on CPU and `lax.conv` / `reduce_window`
# elsewhere (cuDNN runs convs well; not yet measured here: experiments/gpu_check.sh times both).
# The choice is an argument all the way down: a model's `conv_impl` field (set from
# `config.conv_impl` by `models.forward`/`models.feedback`) is handed to every `Conv`,
# `FeedbackConv` and `max_pool` it builds.
CONV_IMPLS = ('auto', 'xla', 'im2col', 'winograd')
NHWC = ('NHWC', 'HWIO', 'NHWC')


def resolve_conv_impl(name: str) -> str:
  """The implementation `name` stands for ('auto': winograd on a CPU backend, xla elsewhere)."""
  if name not in CONV_IMPLS:
    raise ValueError(f'conv_impl {name!r} is not one of {CONV_IMPLS}')
  if name == 'auto':
    return 'winograd' if jax.default_backend() == 'cpu' else 'xla'
  return name


def conv_general_dilated(
  lhs: Array,
  rhs: Array,
  window_strides: Sequence[int],
  padding: Any,
  lhs_dilation: Sequence[int] | None = None,
  rhs_dilation: Sequence[int] | None = None,
  dimension_numbers: Any = None,
  feature_group_count: int = 1,
  batch_group_count: int = 1,
  precision: Any = None,
  preferred_element_type: Any = None,
  *,
  impl: str = 'auto',
) -> Array:
  """`jax.lax.conv_general_dilated`, computed as im2col (`im2col_conv`) where `impl` resolves to
  it and the conv is one it covers (2-D, NHWC/HWIO, undilated, ungrouped); flax's
  `nn.Conv(conv_general_dilated=...)` takes it (see `Conv`)."""
  plain = all(d in (None, 1) or tuple(d) == (1,) * len(d) for d in (lhs_dilation, rhs_dilation))
  impl = resolve_conv_impl(impl)
  if (
    impl in ('im2col', 'winograd')
    and lhs.ndim == 4
    and plain
    and feature_group_count == 1
    and batch_group_count == 1
    and _is_nhwc(lhs, rhs, dimension_numbers)
  ):
    conv_fn = winograd_conv if impl == 'winograd' else im2col_conv
    return conv_fn(lhs, rhs, tuple(window_strides), padding, precision, preferred_element_type)
  return jax.lax.conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation,
    rhs_dilation,
    dimension_numbers,
    feature_group_count,
    batch_group_count,
    precision,
    preferred_element_type,
  )


def _is_nhwc(lhs, rhs, dimension_numbers) -> bool:
  want = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
  try:
    have = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  except (TypeError, ValueError):
    return False
  return have == want


def im2col_conv(
  x: Array,
  w: Array,
  strides: tuple[int, int] = (1, 1),
  padding: Any = 'SAME',
  precision: Any = None,
  preferred_element_type: Any = None,
) -> Array:
  """The 2-D conv (NHWC input, HWIO kernel) as patches × matrix: the kh·kw shifted (strided)
  slices of the padded input, concatenated on channels in the kernel's (kh, kw, in) order, times
  W reshaped to (kh·kw·in, out). Its gradients are large matmuls too: W's is patchesᵀ·g; x's is
  (stride 1) the same im2col conv of g with W flipped and its channels swapped, or (strides) g·Wᵀ
  summed back over the shifts. `through_feedback` gives the feedback-aware version: its x
  cotangent is this one with B as W."""
  kh, kw = w.shape[:2]
  hw = tuple(x.shape[1:3])
  pads = _pads(hw, (kh, kw), strides, padding)
  if tuple(strides) == (1, 1) and kh * kw > 1 and w.shape[3] < w.shape[2]:
    return _output_side_conv(x, w, pads, precision, preferred_element_type)
  return _im2col(x, w, tuple(strides), pads, hw, precision, preferred_element_type)


def adjoint_kernel(w: Array) -> Array:
  """The kernel of a layer's adjoint map, in the layout of a layer going the other way: dense
  (in, out) → (out, in); conv (kh, kw, in, out) → flipped in space, (kh, kw, out, in) (a stride-1
  conv's input gradient is the conv of g with it, padded to give x's size back)."""
  return w.T if w.ndim == 2 else jnp.flip(w, (0, 1)).swapaxes(2, 3)


def _pads(hw, kernel, strides, padding) -> tuple[tuple[int, int], ...]:
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(hw, kernel, strides, padding)
  return tuple(tuple(int(v) for v in p) for p in padding)


# Winograd F(m×m, 3×3) (Lavin & Gray 2016): an m×m output tile is Aᵀ[(G W Gᵀ) ⊙ (Bᵀ d B)]A of the
# (m+2)² input tile d under it, so a 3×3 conv takes (m+2)² products per m² outputs instead of 9m²:
# F(2, 3) 2.25× and F(4, 3) 4× fewer multiply-adds, all of them (m+2)² batched
# (tiles × in)·(in × out) matmuls, in the backward pass too. The transforms' transposes are written
# out (the same stacked weighted sums with the matrices transposed; the adjoint kernel is read from
# W in place): `jax.linear_transpose` of them gave pad-and-add loops and transposed copies of W that
# cost ~150 of a ~700 ms cifar10_cnn_bp step. Measured on
# the 2-core CPU (forward and both gradients, batch 128, 128-256 channels), against im2col:
# F(4, 3) 1.9× faster on 16×16 maps and 1.9× on 8×8; on 4×4 maps F(2, 3) 1.3× (F(4, 3) less); on
# 2×2 maps and with few channels both are slower, so those stay im2col. F(4, 3)'s transforms cost
# fp32 accuracy: outputs and gradients agree with lax.conv to ~1e-5 of their largest value (F(2, 3)
# ~1e-6, im2col ~1e-7). The matrices are the standard ones (interpolation points 0, ±1, ±2, ∞).
WINOGRAD = {
  2: (
    ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),  # Bᵀ
    ((1, 0, 0), (1 / 2, 1 / 2, 1 / 2), (1 / 2, -1 / 2, 1 / 2), (0, 0, 1)),  # G
    ((1, 1, 1, 0), (0, 1, -1, -1)),  # Aᵀ
  ),
  4: (
    (
      (4, 0, -5, 0, 1, 0),
      (0, -4, -4, 1, 1, 0),
      (0, 4, -4, -1, 1, 0),
      (0, -2, -1, 2, 1, 0),
      (0, 2, -1, -2, 1, 0),
      (0, 4, 0, -5, 0, 1),
    ),
    (
      (1 / 4, 0, 0),
      (-1 / 6, -1 / 6, -1 / 6),
      (-1 / 6, 1 / 6, -1 / 6),
      (1 / 24, 1 / 12, 1 / 6),
      (1 / 24, -1 / 12, 1 / 6),
      (0, 0, 1),
    ),
    ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1)),
  ),
}
WINOGRAD_MIN_CHANNELS = 32


def winograd_tile(kernel_shape: tuple[int, ...], strides: Sequence[int], out_hw) -> int:
  """The output tile m `winograd_conv` uses for this conv: 4 on maps of 8×8 and more, 2 on
  4×4 to 7×7, 0 (im2col) on smaller maps, for other kernels or strides and for fewer than
  `WINOGRAD_MIN_CHANNELS` channels in or out."""
  kh, kw, cin, cout = kernel_shape
  if (kh, kw) != (3, 3) or tuple(strides) != (1, 1) or min(cin, cout) < WINOGRAD_MIN_CHANNELS:
    return 0
  size = min(out_hw)
  return 4 if size >= 8 else 2 if size >= 4 else 0


def winograd_conv(
  x: Array,
  w: Array,
  strides: tuple[int, int] = (1, 1),
  padding: Any = 'SAME',
  precision: Any = None,
  preferred_element_type: Any = None,
  tile: int | None = None,
) -> Array:
  """The 2-D conv (NHWC, HWIO) by Winograd F(m×m, 3×3), m = `tile` or `winograd_tile`'s choice
  (0: `im2col_conv`). W's gradient is the transformed input's transpose times the transformed
  output gradient (batched matmuls, the forward's tiles reused); x's is the Winograd conv of g with
  the adjoint kernel (W flipped, its channels swapped), as `_im2col_bwd` does it, which avoids
  scattering overlapping tiles back (autodiff's way, measured 2× slower)."""
  pads = _pads(tuple(x.shape[1:3]), tuple(w.shape[:2]), strides, padding)
  (pt, pb), (pl, pr) = pads
  ho, wo = x.shape[1] + pt + pb - 2, x.shape[2] + pl + pr - 2
  m = winograd_tile(tuple(w.shape), strides, (ho, wo)) if tile is None else tile
  if not m or max(pt, pb, pl, pr) > 2:  # (the adjoint conv needs pads of at most kernel − 1)
    return im2col_conv(x, w, strides, pads, precision, preferred_element_type)
  return _winograd(x, w, pads, m, precision, preferred_element_type)


class WinogradParts(NamedTuple):
  """The linear maps of one Winograd conv (see `_winograd_parts`)."""

  tiles: Callable  # input → (n², b·tiles, in)
  kernel: Callable  # W → (n², W's in, W's out)
  kernel_t: Callable  # kernel's transpose
  output: Callable  # products (n², b·tiles, out) → output
  output_t: Callable  # output's transpose
  products: Callable  # (tiles, kernel, precision, preferred) → products
  apply: Callable  # (x, w, precision, preferred) → the conv


def _winograd_parts(x_shape, w_shape, pads, m: int, adjoint: bool = False) -> WinogradParts:
  """The linear maps of F(m×m, 3×3) for these shapes (n = m + 2): input → tiles (n², b·tiles,
  in), kernel → (n², W's in, W's out) and its transpose, products (n², b·tiles, out) → output and
  its transpose. `adjoint`: the conv by W flipped with its channels swapped (x's cotangent),
  read straight from W: G's columns reversed flip it, and the products contract W's outputs
  (no transposed copy of W is made)."""
  bt, g, at = (np.asarray(a, np.float64) for a in WINOGRAD[m])
  if adjoint:
    g = g[:, ::-1]
  (pt, pb), (pl, pr) = pads
  b, h, wd, _ = x_shape
  n, cout = m + 2, w_shape[2 if adjoint else 3]
  ho, wo = h + pt + pb - 2, wd + pl + pr - 2
  th, tw = -(-ho // m), -(-wo // m)  # tiles; the last may overhang the output and is cropped

  def tiles(x):
    spatial = ((0, 0, 0), (pt, m * th + 2 - h - pt, 0), (pl, m * tw + 2 - wd - pl, 0), (0, 0, 0))
    x = jax.lax.pad(x, jnp.zeros((), x.dtype), spatial)
    v = _tile_transform(_tile_transform(x, 1, th, bt, m), 3, tw, bt, m)  # (n col, n row, ...)
    return v.reshape(n * n, b * th * tw, x.shape[3])

  def kernel(w):  # G W Gᵀ per channel pair: (n col, n row, W's in, W's out)
    return _combine_on(_combine_on(w, 0, g, to=0), 1, g, to=0).reshape(n * n, *w.shape[2:])

  def kernel_t(du):  # its transpose: (n², W's in, W's out) → W's shape
    du = du.reshape(n, n, *du.shape[1:])
    return _combine_on(_combine_on(du, 1, g.T, to=0), 1, g.T)

  def output(y):  # Aᵀ Y A per tile, tiles put back in place, the overhang cropped
    y = y.reshape(n, n, b, th, tw, cout)
    y = _combine_on(_combine_on(y, 1, at), 0, at)  # (m col, m row, b, th, tw, cout)
    y = jnp.transpose(y, (2, 3, 1, 4, 0, 5)).reshape(b, m * th, m * tw, cout)
    return y[:, :ho, :wo]

  def output_t(gy):  # its transpose: (b, ho, wo, cout) → (n², b·tiles, cout)
    gy = jax.lax.pad(
      gy, jnp.zeros((), gy.dtype), ((0, 0, 0), (0, m * th - ho, 0), (0, m * tw - wo, 0), (0, 0, 0))
    )
    gy = jnp.transpose(gy.reshape(b, th, m, tw, m, cout), (4, 2, 0, 1, 3, 5))
    return _combine_on(_combine_on(gy, 0, at.T), 1, at.T).reshape(n * n, b * th * tw, cout)

  def products(v, u, precision, preferred):  # (n², tiles, in) · per position → (n², tiles, out)
    return jax.lax.dot_general(
      v,
      u,
      (((2,), (2 if adjoint else 1,)), ((0,), (0,))),
      precision=precision,
      preferred_element_type=preferred,
    )

  def apply(x, w, precision, preferred):
    return output(products(tiles(x), kernel(w), precision, preferred))

  return WinogradParts(tiles, kernel, kernel_t, output, output_t, products, apply)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _winograd(x, w, pads, m, precision, preferred):
  return _winograd_parts(x.shape, w.shape, pads, m).apply(x, w, precision, preferred)


def _winograd_fwd(x, w, pads, m, precision, preferred):
  parts = _winograd_parts(x.shape, w.shape, pads, m)
  v = parts.tiles(x)
  return parts.output(parts.products(v, parts.kernel(w), precision, preferred)), (v, w, x.shape)


def _winograd_bwd(pads, m, precision, preferred, res, g):
  v, w, x_shape = res
  parts = _winograd_parts(x_shape, w.shape, pads, m)
  dy = parts.output_t(g)  # (n², tiles, cout)
  du = jax.lax.dot_general(v, dy, (((1,), (1,)), ((0,), (0,))), precision=precision)
  dw = parts.kernel_t(du.astype(w.dtype))
  (pt, pb), (pl, pr) = pads
  adjoint_pads = ((2 - pt, 2 - pb), (2 - pl, 2 - pr))
  m_adj = winograd_tile(tuple(w.shape), (1, 1), tuple(x_shape[1:3]))
  if m_adj:  # x's cotangent: the Winograd conv of g with the adjoint kernel, W read in place
    adjoint = _winograd_parts(g.shape, w.shape, adjoint_pads, m_adj, adjoint=True)
    dx = adjoint.apply(g, w, precision, None)
  else:
    w_adj = adjoint_kernel(w)
    dx = im2col_conv(g, w_adj, (1, 1), adjoint_pads, precision)
  return dx.astype(v.dtype), dw


_winograd.defvjp(_winograd_fwd, _winograd_bwd)


def _tile_transform(x: Array, axis: int, tiles: int, bt: np.ndarray, m: int) -> Array:
  """Bᵀd along `axis` for every tile at once, on a new first axis: row i is Σ_k Bᵀ[i, k] d_k of
  the strided slices d_k = x[m·t + k], k < m + 2."""
  d = [jax.lax.slice_in_dim(x, k, k + m * (tiles - 1) + 1, m, axis) for k in range(bt.shape[1])]
  return jnp.stack([_weighted_sum(d, row) for row in bt])


def _combine_on(y: Array, axis: int, mat: np.ndarray, to: int | None = None) -> Array:
  """mat·y along `axis` (its length mat.shape[1] → mat.shape[0]); the result's rows stay at
  `axis`, or go to axis `to` of what remains (to=0: a new first axis, no transposed copy)."""
  parts = [jax.lax.index_in_dim(y, k, axis, keepdims=False) for k in range(mat.shape[1])]
  return jnp.stack([_weighted_sum(parts, row) for row in mat], axis if to is None else to)


def _weighted_sum(parts: list[Array], coeffs: np.ndarray) -> Array:
  """Σ c·p over the nonzero coefficients (±1 as additions)."""
  out = None
  for c, p in zip(coeffs, parts):
    if c == 0:
      continue
    term = p if c == 1 else -p if c == -1 else p * jnp.asarray(c, p.dtype)
    out = term if out is None else out + term
  return out


def _output_side_conv(x, w, pads, precision=None, preferred=None) -> Array:
  """A stride-1 conv with fewer output than input channels (the feedback twins' convs back
  toward the image), patches taken on the output side: Z = x · [W_0 … W_{kh·kw−1}] (one matmul,
  kh·kw·out columns instead of kh·kw·in), then y = the sum of Z's blocks, each shifted by its
  tap. Autodiff's gradients are matmuls too (x's: dZ·[W_t]ᵀ, W's: xᵀ·dZ)."""
  kh, kw, cin, cout = w.shape
  b, h, wd, _ = x.shape
  (pt, pb), (pl, pr) = pads
  ho, wo = h + pt + pb - kh + 1, wd + pl + pr - kw + 1
  wcat = jnp.transpose(w, (2, 0, 1, 3)).reshape(cin, kh * kw * cout)
  z = jax.lax.dot_general(
    x.reshape(b * h * wd, cin),
    wcat,
    (((1,), (0,)), ((), ())),
    precision=precision,
    preferred_element_type=preferred,
  ).reshape(b, h, wd, kh * kw, cout)
  spatial = ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0), (0, 0, 0))
  z = jax.lax.pad(z, jnp.zeros((), z.dtype), spatial)
  taps = [z[:, i : i + ho, j : j + wo, i * kw + j, :] for i in range(kh) for j in range(kw)]
  return functools.reduce(jnp.add, taps)


def _patches(x: Array, kernel: tuple[int, int], strides, pads) -> Array:
  """(B, Ho, Wo, kh·kw·C): the padded input's kh·kw shifted, strided slices side by side.
  (Writing them as in-place updates of one zero buffer instead was measured ~3% slower.)"""
  (kh, kw), (sh, sw), ((pt, pb), (pl, pr)) = kernel, strides, pads
  b, h, wd, c = x.shape
  ho, wo = (h + pt + pb - kh) // sh + 1, (wd + pl + pr - kw) // sw + 1
  if pt or pb or pl or pr:
    x = jax.lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
  cols = [
    jax.lax.slice(
      x, (0, i, j, 0), (b, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c), (1, sh, sw, 1)
    )
    for i in range(kh)
    for j in range(kw)
  ]
  return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


def _times_kernel(patches: Array, w: Array, precision=None, preferred=None) -> Array:
  b, ho, wo, k = patches.shape
  y = jax.lax.dot_general(
    patches.reshape(b * ho * wo, k),
    w.reshape(k, w.shape[-1]),
    (((1,), (0,)), ((), ())),
    precision=precision,
    preferred_element_type=preferred,
  )
  return y.reshape(b, ho, wo, w.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _im2col(x, w, strides, pads, hw, precision, preferred):
  return _times_kernel(_patches(x, w.shape[:2], strides, pads), w, precision, preferred)


def _im2col_fwd(x, w, strides, pads, hw, precision, preferred):
  patches = _patches(x, w.shape[:2], strides, pads)
  return _times_kernel(patches, w, precision, preferred), (patches, w)


def _im2col_bwd(strides, pads, hw, precision, preferred, res, g):
  patches, w = res
  kh, kw, cin, cout = w.shape
  b, ho, wo, k = patches.shape
  dw = jax.lax.dot_general(
    patches.reshape(-1, k), g.reshape(-1, cout), (((0,), (0,)), ((), ())), precision=precision
  )
  if strides == (1, 1):  # the conv of g with the adjoint kernel, padded to give x's size back
    (pt, pb), (pl, pr) = pads
    adjoint_pads = ((kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr))
    w_adj = adjoint_kernel(w)
    dx = _times_kernel(_patches(g, (kh, kw), (1, 1), adjoint_pads), w_adj, precision)
  else:  # g·Wᵀ, each shift's share added back where its slice came from
    dp = jax.lax.dot_general(
      g.reshape(-1, cout), w.reshape(k, cout), (((1,), (1,)), ((), ())), precision=precision
    )
    x_shape = jax.ShapeDtypeStruct((b,) + tuple(hw) + (cin,), patches.dtype)
    to_x = jax.linear_transpose(lambda x: _patches(x, (kh, kw), strides, pads), x_shape)
    dx = to_x(dp.reshape(b, ho, wo, k).astype(patches.dtype))[0]
  return dx.astype(patches.dtype), dw.reshape(w.shape).astype(w.dtype)


_im2col.defvjp(_im2col_fwd, _im2col_bwd)


def Conv(*args, impl: str = 'auto', **kwargs) -> nn.Conv:  # noqa: N802 (a module's constructor)
  """flax's `nn.Conv(*args, **kwargs)`, its convs computed by `impl` (`conv_general_dilated`)."""
  return nn.Conv(*args, conv_general_dilated=_conv_with(resolve_conv_impl(impl)), **kwargs)


@functools.cache
def _conv_with(impl: str) -> Callable[..., Array]:
  return functools.partial(conv_general_dilated, impl=impl)


def max_pool(
  x: Array,
  window: Sequence[int],
  strides: Sequence[int] | None = None,
  padding: Any = 'VALID',
  impl: str = 'auto',
) -> Array:
  """`nn.max_pool` (NHWC). Unless `impl` is 'xla', a non-overlapping pool (window = strides) is
  a reshape and a max (`block_max_pool`), whose gradient is elementwise instead of XLA's
  select-and-scatter; other pools are `nn.max_pool`'s."""
  window = tuple(window)
  strides = window if strides is None else tuple(strides)
  if resolve_conv_impl(impl) == 'xla' or window != strides or x.ndim != 4 or len(window) != 2:
    return nn.max_pool(x, window, strides=strides, padding=padding)
  return block_max_pool(x, window, padding)


def block_max_pool(x: Array, window: tuple[int, int], padding: Any = 'VALID') -> Array:
  """Max over non-overlapping (kh, kw) windows of an NHWC map, padded (with −inf) or cropped as
  `nn.max_pool(x, window, window, padding)` pads. Value and gradient equal `nn.max_pool`'s,
  ties included: the gradient goes to the first maximum of its window in row-major order, as
  XLA's select-and-scatter picks it (a `ge` select keeps the first of equal values)."""
  kh, kw = window
  h, w = x.shape[1], x.shape[2]
  if isinstance(padding, str):
    pads = jax.lax.padtype_to_pads((h, w), window, window, padding)
  else:
    pads = [tuple(p) for p in padding]
  (pt, pb), (pl, pr) = pads
  ho, wo = (h + pt + pb - kh) // kh + 1, (w + pl + pr - kw) // kw + 1
  # pad to cover, then crop what no window reads (a VALID pool of an odd map drops its edge)
  pb, pr = ho * kh - h - pt, wo * kw - w - pl
  low = jnp.array(-jnp.inf, x.dtype)
  x = jax.lax.pad(x, low, ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
  return _block_max(x, (kh, kw))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _block_max(x: Array, window: tuple[int, int]) -> Array:
  b, h, w, c = x.shape
  kh, kw = window
  return jnp.max(x.reshape(b, h // kh, kh, w // kw, kw, c), axis=(2, 4))


def _block_max_fwd(x, window):
  y = _block_max(x, window)
  return y, (x, y)


def _block_max_bwd(window, res, g):
  x, y = res
  b, h, w, c = x.shape
  kh, kw = window
  xr = x.reshape(b, h // kh, kh, w // kw, kw, c)
  taken = jnp.zeros(y.shape, bool)
  rows = []
  for i in range(kh):
    row = []
    for j in range(kw):
      hit = (xr[:, :, i, :, j, :] == y) & ~taken
      taken = taken | hit
      row.append(jnp.where(hit, g, jnp.zeros((), g.dtype)))
    rows.append(jnp.stack(row, axis=3))
  return (jnp.stack(rows, axis=2).reshape(x.shape),)


_block_max.defvjp(_block_max_fwd, _block_max_bwd)


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
  impl: str = 'auto',
) -> Array:
  """conv(x, w), with the error sent back to x as the transposed conv with kernel b (w's shape)."""
  op = _conv_op(tuple(strides), _hashable(padding), resolve_conv_impl(impl))
  return through_feedback(op, x, w, b)


@functools.cache
def _conv_op(strides, padding, impl) -> Callable[[Array, Array], Array]:
  return functools.partial(conv, strides=strides, padding=padding, impl=impl)


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
  impl: str = 'auto'  # how the conv is computed (`CONV_IMPLS`)

  def kernel_shape(self, x):
    return tuple(self.kernel_size) + (x.shape[-1], self.features)

  def op(self):
    return _conv_op(tuple(self.strides), _hashable(self.padding), resolve_conv_impl(self.impl))


FEEDBACK_LAYERS = (FeedbackDense, FeedbackConv)


def upsample_nearest(x: Array, size: Sequence[int]) -> Array:
  """`jax.image.resize(x, (B, *size, C), 'nearest')` of an NHWC map; an exact integer factor is
  done as a broadcast and reshape (the same values, without resize's gather)."""
  b, h, w, c = x.shape
  fh, fw = size[0] // h, size[1] // w
  if (fh * h, fw * w) != tuple(size) or fh < 1 or fw < 1:
    return jax.image.resize(x, (b, *size, c), 'nearest')
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, fh, w, fw, c))
  return x.reshape(b, h * fh, w * fw, c)


@jax.custom_jvp
def elu(x: Array) -> Array:
  """ELU (α = 1), `jax.nn.elu`'s value; its derivative is taken from the output (y + 1 below 0,
  as autodiff of expm1 gives it), so a backward pass needs only y, which the next layer keeps
  anyway, instead of a second stored copy of expm1(x) (one pass less over conv-sized maps)."""
  return jnp.where(x > 0, x, jnp.expm1(jnp.where(x > 0, jnp.zeros((), x.dtype), x)))


@elu.defjvp
def _elu_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  y = elu(x)
  return y, t * jnp.where(y > 0, jnp.ones((), y.dtype), y + 1)


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
