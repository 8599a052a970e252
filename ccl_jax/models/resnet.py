"""Residual networks (He et al. 2016) whose every conv and dense layer may be feedback-aware.

`resnet18` / `resnet50`: the ImageNet stem (conv7×7/2 → BN → ReLU → maxpool 3×3/2), four stages of
basic (18) or bottleneck (50) blocks, 64·2^i channels. `resnet20` / `resnet56`: the CIFAR stem
(conv3×3 → BN → ReLU), three stages of 3 or 9 basic blocks, 16·2^i channels. A block that changes
the shape has a 1×1 conv + BN shortcut (He et al.'s option B; their CIFAR nets used option A,
zero-padding). Global average pooling, then a dense classifier.

With `feedback=True` (FA, sign symmetry, KP, WM) every conv and the classifier are
`layers.FeedbackConv` / `FeedbackDense`: the error reaches each layer's input through B; with
B = W this is exactly backprop. BatchNorm statistics live in the 'batch_stats' collection (the
rules keep them in `state.extra`) and, under data parallelism, are the global batch's
(`axis_name`). Plain layers compute in `dtype` (bfloat16 on accelerators) with float32
parameters. Returns (logits, [each stage's output]).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ccl_jax import config as config_lib
from ccl_jax import layers
from ccl_jax.config import Setting
from ccl_jax.models.mlp import compute_dtype

SECTION = 'resnet'
SETTINGS = {
  'width_mult': config_lib.positive(
    'channels × this (1 = 64 for ImageNet ResNets, 16 for CIFAR)', 1.0
  ),
  'bn_momentum': config_lib.fraction("BatchNorm's running-average momentum", 0.9),
  'zero_init_residual': Setting(True, "each block's last BN scale starts at 0 (Goyal et al.)"),
}
# name -> (stem, block, blocks per stage, first stage's channels)
DEPTHS = {
  'resnet18': ('imagenet', 'basic', (2, 2, 2, 2), 64),
  'resnet50': ('imagenet', 'bottleneck', (3, 4, 6, 3), 64),
  'resnet20': ('cifar', 'basic', (3, 3, 3), 16),
  'resnet56': ('cifar', 'basic', (9, 9, 9), 16),
}


class ResNet(nn.Module):
  num_classes: int
  stem: str = 'cifar'
  block: str = 'basic'
  stages: Sequence[int] = (3, 3, 3)
  width: int = 16
  feedback: bool = False
  bn_momentum: float = 0.9
  zero_init_residual: bool = True
  axis_name: str | None = None
  dtype: Any = None
  conv_impl: str = 'auto'  # how convs and pools are computed (`layers.CONV_IMPLS`)

  def conv(self, features: int, kernel: int, strides: int = 1, name: str | None = None):
    init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')  # He init, as torchvision
    size, step = (kernel, kernel), (strides, strides)
    if self.feedback:
      return layers.FeedbackConv(
        features=features,
        kernel_size=size,
        strides=step,
        kernel_init=init,
        impl=self.conv_impl,
        name=name,
      )
    return layers.Conv(
      features,
      size,
      step,
      padding='SAME',
      use_bias=False,
      kernel_init=init,
      dtype=self.dtype,
      impl=self.conv_impl,
      name=name,
    )

  def norm(self, train: bool, zero: bool = False, name: str | None = None):
    return nn.BatchNorm(
      use_running_average=not train,
      momentum=self.bn_momentum,
      epsilon=1e-5,
      axis_name=self.axis_name if train else None,
      scale_init=nn.initializers.zeros if zero else nn.initializers.ones,
      dtype=self.dtype,
      name=name,
    )

  def residual(self, x: jax.Array, features: int, strides: int, train: bool, name: str):
    """One basic (two 3×3) or bottleneck (1×1, 3×3, 1×1 ×4) block with its shortcut; its layers
    are named `<name>_conv<k>` / `<name>_bn<k>` (the same paths with or without feedback)."""
    zero = self.zero_init_residual
    conv = lambda k, *a: self.conv(*a, name=f'{name}_conv{k}')
    norm = lambda k, z=False: self.norm(train, z, name=f'{name}_bn{k}')
    if self.block == 'basic':
      y = nn.relu(norm(1)(conv(1, features, 3, strides)(x)))
      y = norm(2, zero)(conv(2, features, 3)(y))
      out = features
    else:
      y = nn.relu(norm(1)(conv(1, features, 1)(x)))
      y = nn.relu(norm(2)(conv(2, features, 3, strides)(y)))
      y = norm(3, zero)(conv(3, 4 * features, 1)(y))
      out = 4 * features
    if x.shape[-1] != out or strides != 1:
      x = self.norm(train, name=f'{name}_shortcut_bn')(
        self.conv(out, 1, strides, name=f'{name}_shortcut_conv')(x)
      )
    return nn.relu(x + y)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, list[jax.Array]]:
    x = x if x.ndim == 4 else x.reshape(x.shape + (1,) * (4 - x.ndim))
    kernel, stride = (7, 2) if self.stem == 'imagenet' else (3, 1)
    x = self.conv(self.width, kernel, stride, name='stem_conv')(x)
    x = nn.relu(self.norm(train, name='stem_bn')(x))
    if self.stem == 'imagenet':
      x = layers.max_pool(x, (3, 3), (2, 2), padding='SAME', impl=self.conv_impl)
    stage_outputs = []
    for i, n in enumerate(self.stages):
      for j in range(n):
        strides = 2 if i > 0 and j == 0 else 1
        x = self.residual(x, self.width * 2**i, strides, train, f'stage{i + 1}_block{j + 1}')
      stage_outputs.append(x)
    x = jnp.mean(x, axis=(1, 2))
    dense = (
      functools.partial(layers.FeedbackDense, features=self.num_classes, use_bias=True)
      if self.feedback
      else functools.partial(nn.Dense, self.num_classes, dtype=self.dtype)
    )
    logits = dense(kernel_init=nn.initializers.lecun_normal(), name='classifier')(x)
    return logits.astype(jnp.float32), stage_outputs


def forward(config, task, local: bool, feedback: bool = False) -> ResNet:
  """The ResNet `config.model` names; `local` (cut layer inputs) is not supported."""
  if local:
    from ccl_jax.errors import UserError

    raise UserError(f"model '{config.model}' trains end to end; rule '{config.rule}' is local")
  stem, block, stages, width = DEPTHS[config.model]
  c = config.resnet
  return ResNet(
    num_classes=task.num_classes,
    stem=stem,
    block=block,
    stages=stages,
    width=max(1, round(width * c.width_mult)),
    feedback=feedback,
    bn_momentum=c.bn_momentum,
    zero_init_residual=bool(c.zero_init_residual),
    dtype=compute_dtype(config),
  )
