"""The CCL paper's `cnn_pool` body: [Conv3×3 → φ → MaxPool 2] × len(channels) → Dense → K."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ccl_jax import config as config_lib
from ccl_jax import layers
from ccl_jax.models.mlp import (
  ACTIVATIONS,
  NET_SETTINGS,
  NONDECREASING,
  FeedbackNet,
  Net,
  compute_dtype,
  kernel_init,
  net_fields,
  sg_if,
)

SETTINGS = {
  'channels': config_lib.widths(
    'conv widths, one [Conv3×3 → φ → MaxPool 2] block each', (128, 128, 256, 256, 512)
  ),
  **NET_SETTINGS,
}


def forward(config, task, local: bool, feedback: bool = False) -> CNN:
  return CNN(
    channels=tuple(config.cnn.channels), **net_fields(config, config.cnn, task, local, feedback)
  )


def feedback(config, task) -> FeedbackCNN:
  return FeedbackCNN(
    channels=tuple(config.cnn.channels),
    image_shape=tuple(task.image_shape),
    activation=config.cnn.activation,
    weight_init=config.cnn.init,
    dtype=compute_dtype(config),
  )


class CNN(Net):
  """Conv blocks then a linear classifier; no biases unless `use_bias`.

  Pooling uses 'SAME' padding (ceil division), so 32×32 goes 32→16→8→4→2→1 exactly as in the
  reference and 28×28 MNIST goes 28→14→7→4→2→1 with the same five blocks. `feedback=True` builds the
  convs and the classifier from `layers.FeedbackConv`/`FeedbackDense` (FA, sign symmetry, KP, WM);
  `local=True` stop_gradient's every block's input. Returns (outputs, post-pool block outputs).
  """

  channels: Sequence[int] = (128, 128, 256, 256, 512)
  conv_impl: str = 'auto'  # how convs and pools are computed (`layers.CONV_IMPLS`)

  def conv(self, features: int, act: Callable, name: str) -> Callable[[jax.Array], jax.Array]:
    init = kernel_init(self.weight_init)
    if self.feedback:
      return layers.FeedbackConv(
        features=features,
        kernel_size=(3, 3),
        padding='SAME',
        activation=act,
        use_bias=self.use_bias,
        kernel_init=init,
        impl=self.conv_impl,
        name=name,
      )
    layer = layers.Conv(
      features,
      (3, 3),
      padding='SAME',
      use_bias=self.use_bias,
      kernel_init=init,
      dtype=self.dtype,
      impl=self.conv_impl,
      name=name,
    )
    return lambda h: act(layer(h))

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
    act = ACTIVATIONS[self.activation]
    h = x if x.ndim == 4 else x.reshape(x.shape + (1,) * (4 - x.ndim))
    hiddens = []
    # max-pool(φ(z)) = φ(max-pool(z)) for a nondecreasing φ, value and gradient (the max picks the
    # same element), so plain nets pool first and apply φ to a quarter of the values (cifar10_cnn_bp
    # on the 2-core CPU: φ and its gradient on the 32×32 maps took ~100 of ~700 ms a step).
    # Feedback layers apply φ themselves (their response and preact probe include it).
    pool_first = not self.feedback and self.activation in NONDECREASING
    for i, c in enumerate(self.channels):
      h = self.conv(c, ACTIVATIONS['none'] if pool_first else act, f'layer_{i + 1}')(
        sg_if(h, self.local)
      )
      h = layers.max_pool(h, (2, 2), strides=(2, 2), padding='SAME', impl=self.conv_impl)
      hiddens.append(act(h) if pool_first else h)
      h = hiddens[-1]
    h = h.reshape(h.shape[0], -1)
    out = self.dense(
      self.num_classes, ACTIVATIONS[self.output_activation], f'layer_{len(self.channels) + 1}'
    )(sg_if(h, self.local))
    return out.astype(jnp.float32), hiddens


def block_sizes(image_shape: Sequence[int], blocks: int) -> list[tuple[int, int]]:
  """Spatial size of the input and of each block's post-pool output ('SAME' 2×2 pools: ceil)."""
  h, w = image_shape[0], image_shape[1] if len(image_shape) > 1 else 1
  sizes = [(h, w)]
  for _ in range(blocks):
    h, w = -(-h // 2), -(-w // 2)
    sizes.append((h, w))
  return sizes


class FeedbackCNN(FeedbackNet):
  """The CNN's mirror (SPEC §1.2): K → Linear → φ → [nearest upsample → Conv3×3 → φ] per block, the
  last conv (to the image's channels) linear; every input stop_gradient'd.

  Called on the K×K identity it returns [g_0, ..., g_L]: g_l has the shape of the forward net's
  post-pool output of block l (g_0: the image's). Feedback layer_l maps pair l back to pair l−1,
  as in `FeedbackMLP`; layer_{L+1} is the top Linear. Upsampling resizes to the forward map's
  exact size, so odd sizes (28 → 14 → 7 → 4) mirror too.
  """

  channels: Sequence[int] = ()
  image_shape: Sequence[int] = ()
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, targets: jax.Array) -> list[jax.Array]:
    act = ACTIVATIONS[self.activation]
    n = len(self.channels)
    sizes = block_sizes(self.image_shape, n)
    widths = [self.image_shape[-1] if len(self.image_shape) == 3 else 1] + list(self.channels)
    k = targets.shape[0]
    top = nn.Dense(
      sizes[n][0] * sizes[n][1] * widths[n],
      use_bias=False,
      kernel_init=kernel_init(self.weight_init),
      dtype=self.dtype,
      name=f'layer_{n + 1}',
    )(jax.lax.stop_gradient(targets))
    g = act(top).reshape((k,) + sizes[n] + (widths[n],))
    out = [None] * (n + 1)
    out[n] = g
    for l in reversed(range(n)):
      g = layers.upsample_nearest(jax.lax.stop_gradient(g), sizes[l])
      g = layers.Conv(
        widths[l],
        (3, 3),
        padding='SAME',
        use_bias=False,
        kernel_init=kernel_init(self.weight_init),
        dtype=self.dtype,
        impl=self.conv_impl,
        name=f'layer_{l + 1}',
      )(g)
      out[l] = g if l == 0 else act(g)
    return out
