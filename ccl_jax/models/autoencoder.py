"""CCL's convolutional autoencoder (SPEC §1.3) and its mirrored feedback twin.

Forward: encoder [Conv3×3 stride 2 → BN → φ] × n (3→128→256→1024→2048, 96→48→24→12→6), decoder
[nearest upsample ×2 → Conv3×3 → BN → φ] × n back to the image's channels, the last conv linear.
Feedback (CCL): the same layers mirrored, run on the target image: each decoder layer's twin is a
strided conv, each encoder layer's an upsample + conv; the first encoder layer's twin is linear.
A forward layer and its twin share a name (`enc_i`, `dec_i`). Init as the reference: orthogonal
kernels, decoder forward and encoder feedback kernels × `init_scale`, the two convs that output an
image zeroed; forward biases zero, feedback biases PyTorch's default. BatchNorm keeps γ=1, β=0
(the reference never trains them); its statistics live in the state (`state.extra`).

The model's task is 'reconstruction': its output is the image and it is scored by pixel MSE, so a
run needs images in [0, 1] (`data.normalize='unit'`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ccl_jax import config as config_lib
from ccl_jax import layers
from ccl_jax.config import Setting
from ccl_jax.errors import UserError
from ccl_jax.models.mlp import ACTIVATIONS, compute_dtype, sg_if

SECTION = 'ae'
TASK = 'reconstruction'
SETTINGS = {
  'widths': config_lib.widths(
    'encoder widths, one stride-2 level each (the decoder mirrors them)', (128, 256, 1024, 2048)
  ),
  'activation': Setting(
    'relu', 'activation φ of every block but the image outputs', choices=tuple(ACTIVATIONS)
  ),
  'batch_norm': Setting(True, 'BatchNorm (γ=1, β=0 fixed) after every conv but the image outputs'),
  'init_scale': config_lib.non_negative(
    'decoder forward and encoder feedback kernels × this at init (the reference: 0.001)', 1e-3
  ),
}
PAD = ((1, 1), (1, 1))  # PyTorch's padding=1: stride-2 convs see the same pixels as the reference


def check(config) -> None:
  if config.data.normalize != 'unit':
    raise UserError(
      f"model 'ae' reconstructs images scored by pixel MSE on [0, 1]: set "
      f"config.data.normalize='unit', not '{config.data.normalize}'"
    )


def _fields(config, task) -> dict:
  c = config.ae
  shape = tuple(task.image_shape)
  levels = len(c.widths)
  if len(shape) != 3 or shape[0] % 2**levels or shape[1] % 2**levels:
    raise UserError(
      f"model 'ae' with {levels} stride levels needs images of a side divisible by "
      f'{2**levels}, not {shape}; change config.ae.widths'
    )
  return dict(
    widths=tuple(int(w) for w in c.widths),
    image_channels=shape[-1],
    activation=c.activation,
    batch_norm=bool(c.batch_norm),
    init_scale=float(c.init_scale),
    dtype=compute_dtype(config),
  )


def forward(config, task, local: bool, feedback: bool = False) -> AutoEncoder:
  return AutoEncoder(**_fields(config, task), local=local, feedback=feedback)


def feedback(config, task) -> FeedbackAutoEncoder:
  return FeedbackAutoEncoder(**_fields(config, task))


def orthogonal(scale: float) -> Callable:
  """PyTorch's `orthogonal_` on the (out, in, kh, kw) kernel (as the reference: on the transpose
  when out < in), times `scale`, in flax's (kh, kw, in, out) layout."""

  def init(key, shape, dtype=jnp.float32):
    column = -1 if shape[-1] >= shape[-2] else -2
    return scale * nn.initializers.orthogonal(column_axis=column)(key, shape, dtype)

  return init


def torch_bias(fan_in: int) -> Callable:
  """PyTorch's default conv bias, U(±1/sqrt(fan_in))."""
  bound = 1 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def upsample(h: jax.Array) -> jax.Array:
  """Nearest-neighbour ×2 (NHWC)."""
  return jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)


class _Blocks(nn.Module):
  """Fields and the conv block both nets share."""

  widths: Sequence[int] = (128, 256, 1024, 2048)
  image_channels: int = 3
  activation: str = 'relu'
  batch_norm: bool = True
  init_scale: float = 1e-3
  axis_name: str | None = None  # BatchNorm statistics over the global batch under data parallel
  dtype: Any = None
  conv_impl: str = 'auto'  # how convs are computed (`layers.CONV_IMPLS`)

  @property
  def channels(self) -> list[int]:
    return [self.image_channels] + list(self.widths)

  def block(
    self,
    h: jax.Array,
    features: int,
    name: str,
    *,
    stride: int,
    up: bool,
    scale: float,
    linear: bool,
    train: bool,
    bias_init: Callable = nn.initializers.zeros,
    feedback_layer: bool = False,
  ) -> jax.Array:
    """[upsample →] Conv3×3 (stride) [→ BN → φ unless `linear`]; call inside a compact method."""
    if up:
      h = upsample(h)
    init = orthogonal(scale)
    if feedback_layer:  # FA/KP/sign symmetry: B at the unscaled orthogonal init (a zero W keeps it)
      conv = layers.FeedbackConv(
        features=features,
        strides=(stride, stride),
        padding=PAD,
        use_bias=True,
        kernel_init=init,
        bias_init=bias_init,
        feedback_init=orthogonal(1.0),
        impl=self.conv_impl,
        name=name,
      )
    else:
      conv = layers.Conv(
        features,
        (3, 3),
        strides=(stride, stride),
        padding=PAD,
        kernel_init=init,
        bias_init=bias_init,
        dtype=self.dtype,
        impl=self.conv_impl,
        name=name,
      )
    z = conv(h)
    if linear:
      return z.astype(jnp.float32)
    if self.batch_norm:
      z = nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        use_scale=False,
        use_bias=False,
        axis_name=self.axis_name if train else None,
        name=f'{name}_bn',
      )(z)
    return ACTIVATIONS[self.activation](z)


class AutoEncoder(_Blocks):
  """The forward autoencoder: returns (reconstruction, [enc_1..enc_n, dec_n..dec_2 outputs]).

  `local=True` cuts every block's input with stop_gradient (CCL); `feedback=True` builds the convs
  as `layers.FeedbackConv` (FA, KP, sign symmetry). `train` uses and updates batch statistics.
  """

  local: bool = False
  feedback: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, list[jax.Array]]:
    ch, n = self.channels, len(self.widths)
    kw = dict(train=train, feedback_layer=self.feedback)
    h, hiddens = x, []
    for i in range(n):
      h = self.block(
        sg_if(h, self.local),
        ch[i + 1],
        f'enc_{i + 1}',
        stride=2,
        up=False,
        scale=1.0,
        linear=False,
        **kw,
      )
      hiddens.append(h)
    for i in reversed(range(n)):
      h = self.block(
        sg_if(h, self.local),
        ch[i],
        f'dec_{i + 1}',
        stride=1,
        up=True,
        scale=0.0 if i == 0 else self.init_scale,
        linear=i == 0,
        **kw,
      )
      if i:
        hiddens.append(h)
    return h.astype(jnp.float32), hiddens


class FeedbackAutoEncoder(_Blocks):
  """The mirror, run on the target image: returns the 2n+1 signals that pair with the forward
  net's [x, enc_1..enc_n, dec_n..dec_2, reconstruction]: [d_0..d_{n−1}, c_{n+1}..c_2, target].

  Feedback `dec_i` (strided conv, BN, φ) maps pair 2n−i+1 to pair 2n−i; feedback `enc_i` (upsample,
  conv, BN, φ; `enc_1` linear) maps pair i to pair i−1. Every input is stop_gradient'd.
  """

  @nn.compact
  def __call__(self, target: jax.Array, train: bool = False) -> list[jax.Array]:
    ch, n = self.channels, len(self.widths)
    g, signals = target, []
    for i in range(n):
      g = self.block(
        jax.lax.stop_gradient(g),
        ch[i + 1],
        f'dec_{i + 1}',
        stride=2,
        up=False,
        scale=1.0,
        linear=False,
        train=train,
        bias_init=torch_bias(9 * ch[i]),
      )
      signals.append(g)
    for i in reversed(range(n)):
      g = self.block(
        jax.lax.stop_gradient(g),
        ch[i],
        f'enc_{i + 1}',
        stride=1,
        up=True,
        scale=0.0 if i == 0 else self.init_scale,
        linear=i == 0,
        train=train,
        bias_init=torch_bias(9 * ch[i + 1]),
      )
      signals.append(g)
    return signals[::-1] + [jax.lax.stop_gradient(target).astype(jnp.float32)]
