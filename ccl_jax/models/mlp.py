"""Forward MLP and its mirrored feedback MLP (SPEC §1.1)."""

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

ACTIVATIONS: dict[str, Callable] = {
  'elu': layers.elu,  # nn.elu's value and gradient, its backward read from the output
  'relu': nn.relu,
  'sigmoid': nn.sigmoid,
  'tanh': jnp.tanh,
  'leaky_relu': lambda x: nn.leaky_relu(x, 0.01),
  'none': lambda x: x,
}
# Activations that commute with a max exactly, in float32 too (XLA's tanh is not monotone).
NONDECREASING = frozenset({'elu', 'relu', 'sigmoid', 'leaky_relu', 'none'})


INITS = ('torch', 'glorot_normal', 'orthogonal')

# What every forward net of dense/conv layers has (the CNN's section shares these).
NET_SETTINGS = {
  'activation': Setting('elu', 'hidden activation φ', choices=tuple(ACTIVATIONS)),
  'output_activation': Setting(
    'none',
    "output activation ('sigmoid' for the weight-transport reference MLP)",
    choices=tuple(ACTIVATIONS),
  ),
  'init': Setting(
    'torch',
    "kernel init: 'torch' (U(±1/sqrt(fan_in))), 'glorot_normal' (N(0, 1/(fan_in+fan_out))) "
    "or 'orthogonal' (the target-propagation reference's)",
    choices=INITS,
  ),
  'use_bias': Setting(False, 'biases in every layer'),
}
SETTINGS = {'hidden': config_lib.widths('hidden widths', (256, 256)), **NET_SETTINGS}


def compute_dtype(config):
  """None (float32) or the config's `compute_dtype`, e.g. bfloat16 on accelerators."""
  return None if config.compute_dtype == 'float32' else jnp.dtype(config.compute_dtype)


def net_fields(config, section, task, local: bool, feedback: bool) -> dict:
  """The `Net` fields a model section and the run give."""
  return dict(
    num_classes=task.num_classes,
    activation=section.activation,
    output_activation=section.output_activation,
    weight_init=section.init,
    local=local,
    feedback=feedback,
    use_bias=bool(section.use_bias),
    dtype=compute_dtype(config),
  )


def forward(config, task, local: bool, feedback: bool = False) -> MLP:
  return MLP(
    hidden=tuple(config.mlp.hidden), **net_fields(config, config.mlp, task, local, feedback)
  )


def feedback(config, task) -> FeedbackMLP:
  return FeedbackMLP(
    hidden=tuple(config.mlp.hidden),
    input_dim=math.prod(task.image_shape),
    activation=config.mlp.activation,
    weight_init=config.mlp.init,
    dtype=compute_dtype(config),
  )


def kernel_init(name: str) -> Callable:
  """'torch': PyTorch's nn.Linear default U(±1/sqrt(fan_in)); 'glorot_normal': N(0, 1/(in+out));
  'orthogonal': orthonormal rows or columns (gain 1)."""
  if name == 'orthogonal':
    return nn.initializers.orthogonal()
  if name == 'glorot_normal':
    return nn.initializers.variance_scaling(0.5, 'fan_avg', 'normal')
  return nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')  # 'torch' (validated)


def sg_if(x: jax.Array, cut: bool) -> jax.Array:
  return jax.lax.stop_gradient(x) if cut else x


def dense_layer(
  features: int,
  act: Callable,
  name: str,
  *,
  weight_init: str,
  use_bias: bool,
  feedback: bool,
  dtype: Any = None,
) -> Callable[[jax.Array], jax.Array]:
  """φ(Dense(h)) — a `layers.FeedbackDense` (error through B) when `feedback`. Call it inside a
  module's compact method: the layer binds to that module."""
  init = kernel_init(weight_init)
  if feedback:
    return layers.FeedbackDense(
      features=features, activation=act, use_bias=use_bias, kernel_init=init, name=name
    )
  layer = nn.Dense(features, use_bias=use_bias, kernel_init=init, dtype=dtype, name=name)
  return lambda h: act(layer(h))


class Net(nn.Module):
  """Fields and the dense layer shared by the forward nets (MLP here, CNN in `cnn.py`)."""

  num_classes: int
  activation: str = 'elu'
  output_activation: str = 'none'
  weight_init: str = 'torch'
  local: bool = False
  feedback: bool = False
  use_bias: bool = False
  dtype: Any = None  # computation dtype (e.g. bfloat16); parameters stay float32

  def dense(self, width: int, act: Callable, name: str) -> Callable[[jax.Array], jax.Array]:
    return dense_layer(
      width,
      act,
      name,
      weight_init=self.weight_init,
      use_bias=self.use_bias,
      feedback=self.feedback,
      dtype=self.dtype,
    )


class MLP(Net):
  """x → [Dense → φ] × len(hidden) → Dense → output φ. No biases unless `use_bias`.

  `local=True` cuts every layer's input with stop_gradient (CCL); the call returns the outputs and
  the list of hidden activations h_1..h_{L-1}. `feedback=True` builds every layer as a
  `layers.FeedbackDense` (FA, sign symmetry, KP, WM): the error reaches each layer's input through
  the layer's B (collection 'feedback', W's layout) instead of W.
  """

  hidden: Sequence[int] = (256, 256)

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
    act = ACTIVATIONS[self.activation]
    h = x.reshape(x.shape[0], -1)
    hiddens = []
    for i, width in enumerate(self.hidden):
      h = self.dense(width, act, f'layer_{i + 1}')(sg_if(h, self.local))
      hiddens.append(h)
    out = self.dense(
      self.num_classes, ACTIVATIONS[self.output_activation], f'layer_{len(self.hidden) + 1}'
    )(sg_if(h, self.local))
    return out.astype(jnp.float32), hiddens


class FeedbackNet(nn.Module):
  """Fields the feedback twins (`FeedbackMLP`, `cnn.FeedbackCNN`) share."""

  activation: str = 'elu'
  weight_init: str = 'torch'
  dtype: Any = None


class FeedbackMLP(FeedbackNet):
  """The forward MLP's mirror: K → hidden[::-1] → input dim, every input stop_gradient'd.

  Called on the K×K identity it returns the class prototypes [g_0, g_1, ..., g_{L-1}], g_l having
  the width of forward layer l (g_0 lives in input space and has no activation). Its dense layers
  use `layers.few_rows_dot`: with K rows, a kernel's gradient is K outer products, cheaper summed
  directly than as a K-deep matmul on CPU. Pre-activations are marked `perturb('preact_<l+1>')`
  so the error arriving at each layer can be read (CCL's low-rank feedback gradients).
  """

  hidden: Sequence[int] = ()
  input_dim: int = 1

  @nn.compact
  def __call__(self, targets: jax.Array) -> list[jax.Array]:
    act = ACTIVATIONS[self.activation]
    widths = [self.input_dim] + list(self.hidden)  # width of pair l
    g = targets
    out = [None] * len(widths)
    for l in reversed(range(len(widths))):
      # V_{l+1}: width[l+1] (or K) -> width[l]
      g = nn.Dense(
        widths[l],
        use_bias=False,
        kernel_init=kernel_init(self.weight_init),
        dtype=self.dtype,
        dot_general=layers.few_rows_dot_general,
        name=f'layer_{l + 1}',
      )(jax.lax.stop_gradient(g))
      g = self.perturb(
        f'preact_{l + 1}', g
      )  # a no-op unless a 'perturbations' collection is passed
      g = g if l == 0 else act(g)
      out[l] = g
    return out
