"""Weight mirror (SPEC §2): B learns W from the layer's response to its own noise.

After every learning step, each feedback layer is driven by zero-mean noise x ~ U(−a, a)
(`wm.batch` rows, shaped like the layer's input) and its response y = φ(W x + b) is read
(φ: the activation the layer applies). Then, with an optional decay λ,

    B ← (1 − λ)·B + η_m · Σ_n x_n y_nᵀ   (in W's layout — dense: B (in, out); conv: the same
                                          correlation summed over positions, (kh, kw, in, out))

whose expectation is a positive multiple of W (for φ near-linear around 0). The sum grows with
the mirror batch and, for convs, with the positions (≈ η_m·N·P·a²/3 · W a step: about W itself
per step for a 32×32 conv), so over a deep net's backward pass B's scale compounds layer by
layer and the gradients overflow. `wm.keep_norm` rescales each B after its step to the norm it
had before (B's own norm, a quantity local to the feedback synapses: nothing of W is sent), so
the mirror steps turn B toward W without growing it. Before training,
`wm.init_steps` mirror steps (−1: one epoch's worth) run from the init key. Every noise key is
derived from the state's key and step, so all devices draw the same noise and resume is exact.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ccl_jax import config as config_lib
from ccl_jax import layers, optim
from ccl_jax import metrics as metrics_lib
from ccl_jax.config import Setting
from ccl_jax.rules import feedback_weights
from ccl_jax.state import stream

SETTINGS = {
  'lr': config_lib.positive('η_m in B += η_m · x yᵀ (summed over the mirror batch)', 0.01),
  'noise': config_lib.positive('mirror input x ~ U(−a, a)', 0.05),
  'batch': config_lib.positive('mirror batch size', 128),
  'decay': config_lib.fraction(
    'B ← (1 − λ)·B before each mirror step (0 = none, as the reference)', 0.0
  ),
  'keep_norm': Setting(
    False,
    'rescale each B to its own pre-step norm after a mirror step (deep conv nets: see above)',
  ),
  'init_steps': Setting(
    -1,
    "mirror steps before training; −1 = one epoch's worth of batches",
    check=lambda v: v >= -1,
    must='>= -1',
  ),
}


class WeightMirror:
  """B learns W by mirror steps: an initial phase, then one after every learning step."""

  def __init__(self, settings, model: nn.Module, task, num_epochs: int):
    self.c = settings
    self.model = model
    self.task = task
    self.num_epochs = int(num_epochs)

  @functools.cached_property
  def layer_specs(self) -> list[tuple[tuple[str, ...], Any, tuple[int, ...]]]:
    """(module path, unbound layer module, input shape) of every feedback layer, input first."""
    found = []

    def record(next_fun, args, kwargs, context):
      if isinstance(context.module, layers.FEEDBACK_LAYERS) and context.method_name == '__call__':
        found.append(
          (tuple(context.module.path), context.module.clone(parent=None), tuple(args[0].shape))
        )
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
      jax.eval_shape(
        self.model.init, jax.random.PRNGKey(0), jnp.zeros((1,) + tuple(self.task.image_shape))
      )
    return found

  def mirror_step(self, forward: dict, feedback: dict, rng: jax.Array) -> dict:
    """One mirror step on every feedback layer; returns the new feedback tree."""
    c = self.c
    new = {}
    for i, (path, module, in_shape) in enumerate(self.layer_specs):
      x = jax.random.uniform(
        jax.random.fold_in(rng, i), (c.batch,) + in_shape[1:], minval=-c.noise, maxval=c.noise
      )
      params = metrics_lib.lookup(forward, path)
      y = module.apply({'params': params}, x, method='response')
      _, vjp = jax.vjp(lambda w: module.op()(x, w), params['kernel'])  # Σ_n x_n y_nᵀ in W's layout
      b = metrics_lib.lookup(feedback, path + ('kernel',))
      stepped = (1.0 - c.decay) * b + c.lr * vjp(y)[0]
      if c.keep_norm:
        stepped = stepped * (jnp.linalg.norm(b) / jnp.maximum(jnp.linalg.norm(stepped), 1e-30))
      new[path + ('kernel',)] = stepped
    return jax.tree_util.tree_map_with_path(lambda p, b: new[metrics_lib.names(p)], feedback)

  def init_steps(self) -> int:
    n = int(self.c.init_steps)
    return n if n >= 0 else max(1, self.task.total_steps // max(1, self.num_epochs))

  def init(self, rng, forward, feedback):
    @jax.jit
    def phase(forward, feedback, rng):
      body = lambda i, fb: self.mirror_step(forward, fb, jax.random.fold_in(rng, i))
      return jax.lax.fori_loop(0, self.init_steps(), body, feedback)

    return phase(forward, feedback, stream(rng, 'mirror'))  # the init key, not the state's

  def apply(self, forward, feedback, updates, state):
    forward = optim.apply_updates(forward, updates)
    return forward, self.mirror_step(forward, feedback, stream(state.rng, 'mirror', state.step + 1))


def make(config, task, batch_axis):
  return feedback_weights.FeedbackWeights(
    config, task, batch_axis, lambda model: WeightMirror(config.wm, model, task, config.num_epochs)
  )
