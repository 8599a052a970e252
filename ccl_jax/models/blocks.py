"""Nøkland & Eidnes' local-error-signal nets: [Linear | Conv3×3 → BatchNorm → φ → dropout] blocks.

Each block carries its own local heads, read from the block output before dropout:
- 'pred': a zero-initialised linear classifier (conv blocks: average-pooled first so that at most
  `dim_in_decoder` features reach it); `bio=True` makes it a feedback-alignment head (the error
  reaches the block through a fixed random B, never through its W).
- 'sim': an extra learned layer (Linear, or Conv3×3 on conv blocks) whose output's similarity
  matrix `similarity(...)` is returned (`bio`: the block output itself, pooled as for 'pred').
Conv blocks drop whole channels. BatchNorm keeps flax's biased running variance (PyTorch keeps
the unbiased one: a factor B/(B−1) apart).
`local=True` cuts every block's input with stop_gradient, so a block learns only from its heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ccl_jax import layers, metrics, parallel
from ccl_jax.config import Setting, positive
from ccl_jax.models.mlp import ACTIVATIONS, kernel_init, sg_if

SECTION = 'vgg'
SETTINGS = {
  'feat_mult': positive('conv widths × this', 1.0),
  'activation': Setting('relu', 'block activation φ', choices=tuple(ACTIVATIONS)),
}

# Conv widths and 2×2 max-pools ('M') of the VGG bodies; one FC block follows, then the classifier.
VGG = {
  'vgg8b': (128, 256, 'M', 256, 512, 'M', 512, 'M', 512, 'M'),
  'vgg11b': (128, 128, 128, 256, 'M', 256, 512, 'M', 512, 512, 'M', 512, 'M'),
}
VGG_FC = 1024


def similarity(a: jax.Array, rows=None) -> jax.Array:
  """S(A) = clip(Â Âᵀ, −1, 1), Â: rows of A centred and L2-normalised (B×B).

  Conv features (B, H, W, C) are first reduced to their per-channel spatial std (B, C) (flattened
  instead when H·W = 1). `rows` (`parallel.BatchAxis.rows`) gathers every device's rows, so
  under data parallelism S is the global batch's matrix.
  """
  a = a.astype(jnp.float32)
  if a.ndim == 4 and a.shape[1] * a.shape[2] > 1:
    a = jnp.std(a, axis=(1, 2), ddof=1)
  a = metrics.unit_rows(a, centre=True)
  if rows is not None:
    a = rows(a)
  return jnp.clip(a @ a.T, -1.0, 1.0)


def pool_size(shape: Sequence[int], limit: int) -> tuple[int, int]:
  """The average-pool window (kh, kw) before a conv block's pred head: height and width windows
  are doubled in turn until ⌈H/kh⌉·⌈W/kw⌉·C ≤ `limit` (or the window covers the map)."""
  h, w, c = shape
  kh = kw = 1
  size = lambda: -(-h // kh) * -(-w // kw) * c
  while size() > limit and kh < h:
    kh *= 2
    if size() > limit:
      kw *= 2
  return kh, kw


class BlockOptions(nn.Module):
  """Fields every block shares (and the net hands down to its blocks)."""

  num_pred: int = 10  # outputs of the 'pred' head: classes, or the bio label-code size
  activation: str = 'relu'
  dropout: float = 0.0
  bio: bool = False
  dim_in_decoder: int = 2048
  axis_name: str | None = None
  conv_impl: str = 'auto'  # how convs and pools are computed (`layers.CONV_IMPLS`)

  def options(self) -> dict:
    return {
      f: getattr(self, f) for f in BlockOptions.__dataclass_fields__ if f not in ('parent', 'name')
    }


class Block(BlockOptions):
  """One block and its local heads; returns (output after dropout, {head: value})."""

  features: int = 1
  conv: bool = False

  @nn.compact
  def __call__(
    self, x: jax.Array, train: bool, heads: Sequence[str] = ()
  ) -> tuple[jax.Array, dict]:
    z = self.linear('conv' if self.conv else 'dense')(x if self.conv else x.reshape(x.shape[0], -1))
    z = nn.BatchNorm(
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      axis_name=self.axis_name if train else None,
      name='bn',
    )(z)
    h = ACTIVATIONS[self.activation](z)
    out = {}
    pooled = h
    if self.conv:
      window = pool_size(h.shape[1:], self.dim_in_decoder)
      if window != (1, 1):
        pooled = nn.avg_pool(h, window, strides=window, padding='SAME')
    if 'pred' in heads:
      out['pred'] = self.pred_head(pooled.reshape(pooled.shape[0], -1))
    if 'sim' in heads:
      if self.bio:  # bio: the block's own (pooled) output, no extra learned layer
        s = pooled
      else:
        s = self.linear('sim')(h)
      gather = parallel.BatchAxis(self.axis_name).rows if train else None
      out['sim'] = similarity(s, gather)
    drop = nn.Dropout(
      self.dropout,
      broadcast_dims=(1, 2) if self.conv else (),
      deterministic=not train or not self.dropout,
    )  # conv: whole channels
    return drop(h), out

  def linear(self, name: str) -> nn.Module:
    """The block's kind of layer at its width, no bias: Conv3×3 'SAME' or Dense."""
    if self.conv:
      return layers.Conv(
        self.features,
        (3, 3),
        padding='SAME',
        use_bias=False,
        kernel_init=kernel_init('torch'),
        impl=self.conv_impl,
        name=name,
      )
    return nn.Dense(self.features, use_bias=False, kernel_init=kernel_init('torch'), name=name)

  def pred_head(self, p: jax.Array) -> jax.Array:
    shape = (p.shape[-1], self.num_pred)
    w = self.param('pred_kernel', nn.initializers.zeros, shape)
    bias = self.param('pred_bias', nn.initializers.zeros, (self.num_pred,))
    if not self.bio:
      return p @ w + bias
    fixed = self.variable(
      'fixed', 'pred_feedback', lambda: kernel_init('torch')(self.make_rng('params'), shape)
    ).value
    return layers.feedback_dense(p, w, fixed) + bias


class BlockNet(BlockOptions):
  """Blocks then a linear classifier. `spec`: ints are block widths (Linear blocks unless `conv`),
  'M' a 2×2 max-pool; with `conv`, every int before the last `fc` entries is a Conv3×3 block.

  Returns (logits, [each block's head outputs]).
  """

  spec: Sequence[Any] = ()
  num_classes: int = 10
  conv: bool = False
  fc: Sequence[int] = ()

  @nn.compact
  def __call__(
    self, x: jax.Array, train: bool = False, local: bool = False, heads: Sequence[str] = ()
  ) -> tuple[jax.Array, list[dict]]:
    h = x if not self.conv or x.ndim == 4 else x.reshape(x.shape + (1,) * (4 - x.ndim))
    found: list[dict] = []
    kinds = [(w, self.conv) for w in self.spec] + [(w, False) for w in self.fc]
    for w, conv in kinds:
      if w == 'M':
        h = layers.max_pool(h, (2, 2), strides=(2, 2), padding='SAME', impl=self.conv_impl)
        continue
      block = Block(features=int(w), conv=conv, **self.options(), name=f'block_{len(found) + 1}')
      h, out = block(sg_if(h, local), train, heads)
      found.append(out)
    h = sg_if(h, local).reshape(h.shape[0], -1)
    init = nn.initializers.zeros if local else kernel_init('torch')  # zero, as the local heads
    logits = nn.Dense(self.num_classes, kernel_init=init, name='classifier')(h)
    return logits.astype(jnp.float32), found


def make(config, task, num_pred: int, dropout: float, bio: bool, dim_in_decoder: int) -> BlockNet:
  """The block net of `config.model`: 'mlp' (Linear blocks of `config.mlp.hidden`), 'vgg8b' or
  'vgg11b' (conv widths × `config.vgg.feat_mult`, then one FC block of 1024). Its placement
  fields (`axis_name`, `conv_impl`) are `models.placed`'s to set."""
  common = dict(
    num_classes=task.num_classes,
    num_pred=num_pred,
    dropout=float(dropout),
    bio=bool(bio),
    dim_in_decoder=int(dim_in_decoder),
  )
  if config.model == 'mlp':
    return BlockNet(
      spec=tuple(int(w) for w in config.mlp.hidden), activation=config.mlp.activation, **common
    )
  mult = float(config.vgg.feat_mult)
  spec = tuple(w if w == 'M' else max(1, int(round(w * mult))) for w in VGG[config.model])
  return BlockNet(spec=spec, conv=True, fc=(VGG_FC,), activation=config.vgg.activation, **common)
