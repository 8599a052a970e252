"""The CCL paper's `cnn_pool` body (SPEC §1.2): [Conv3×3 → φ → MaxPool 2] × len(channels) → Dense → K."""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ccl_jax import layers
from ccl_jax.models.mlp import ACTIVATIONS, Net, kernel_init, sg_if


class CNN(Net):
  """Conv blocks then a linear classifier; no biases unless `use_bias`.

  Pooling uses 'SAME' padding (ceil division), so 32×32 goes 32→16→8→4→2→1 exactly as in the
  reference and 28×28 MNIST goes 28→14→7→4→2→1 with the same five blocks. `feedback=True` builds the
  convs and the classifier from `layers.FeedbackConv`/`FeedbackDense` (FA, sign symmetry, KP, WM);
  `local=True` stop_gradient's every block's input. Returns (outputs, post-pool block outputs).
  """
  channels: Sequence[int] = (128, 128, 256, 256, 512)

  def conv(self, features: int, act: Callable, name: str) -> Callable[[jax.Array], jax.Array]:
    init = kernel_init(self.weight_init)
    if self.feedback:
      return layers.FeedbackConv(features=features, kernel_size=(3, 3), padding='SAME',
                                 activation=act, use_bias=self.use_bias, kernel_init=init, name=name)
    layer = nn.Conv(features, (3, 3), padding='SAME', use_bias=self.use_bias, kernel_init=init,
                    dtype=self.dtype,
                    name=name)
    return lambda h: act(layer(h))

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
    act = ACTIVATIONS[self.activation]
    h = x if x.ndim == 4 else x.reshape(x.shape + (1,) * (4 - x.ndim))
    hiddens = []
    for i, c in enumerate(self.channels):
      h = self.conv(c, act, f'layer_{i + 1}')(sg_if(h, self.local))
      h = nn.max_pool(h, (2, 2), strides=(2, 2), padding='SAME')
      hiddens.append(h)
    h = h.reshape(h.shape[0], -1)
    out = self.dense(self.num_classes, ACTIVATIONS[self.output_activation],
                     f'layer_{len(self.channels) + 1}')(sg_if(h, self.local))
    return out.astype(jnp.float32), hiddens
