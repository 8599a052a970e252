"""Weight mirror (SPEC §2): B learns W from the layer's response to its own noise.

After every learning step, each feedback layer is driven by zero-mean noise x ~ U(−a, a)
(config.wm_batch rows, shaped like the layer's input) and its response y = φ(W x + b) is read
(φ: the activation the layer applies). Then, with an optional decay λ,

    B ← (1 − λ)·B + η_m · Σ_n x_n y_nᵀ   (in W's layout — dense: B (in, out); conv: the same
                                          correlation summed over positions, (kh, kw, in, out))

whose expectation is a positive multiple of W (for φ near-linear around 0). Before training,
config.wm_init_steps mirror steps (−1: one epoch's worth) run from the init key. Every noise key is
derived from the state's key and step, so all devices draw the same noise and resume is exact.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ccl_jax import layers
from ccl_jax import metrics as metrics_lib
from ccl_jax.rules.feedback_alignment import FeedbackRule

MIRROR_STREAM = 0x5717  # folded into the state key: the mirror's noise stream


class WeightMirror(FeedbackRule):
  name = 'wm'

  @functools.cached_property
  def layer_specs(self) -> list[tuple[tuple[str, ...], Any, tuple[int, ...]]]:
    """(module path, unbound layer module, input shape) of every feedback layer, input first."""
    found = []

    def record(next_fun, args, kwargs, context):
      if isinstance(context.module, layers.FEEDBACK_LAYERS) and context.method_name == '__call__':
        found.append((tuple(context.module.path), context.module.clone(parent=None),
                      tuple(args[0].shape)))
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
      jax.eval_shape(self.model.init, jax.random.PRNGKey(0),
                     jnp.zeros((1,) + tuple(self.task.image_shape)))
    return found

  def mirror_step(self, forward: dict, feedback: dict, rng: jax.Array) -> dict:
    """One mirror step on every feedback layer; returns the new feedback tree."""
    c = self.config
    new = {}
    for i, (path, module, in_shape) in enumerate(self.layer_specs):
      x = jax.random.uniform(jax.random.fold_in(rng, i), (c.wm_batch,) + in_shape[1:],
                             minval=-c.wm_noise, maxval=c.wm_noise)
      params = metrics_lib.lookup(forward, path)
      y = module.apply({'params': params}, x, method='response')
      _, vjp = jax.vjp(lambda w: module.op()(x, w), params['kernel'])  # Σ_n x_n y_nᵀ in W's layout
      b = metrics_lib.lookup(feedback, path + ('kernel',))
      new[path + ('kernel',)] = (1.0 - c.wm_decay) * b + c.wm_lr * vjp(y)[0]
    return jax.tree_util.tree_map_with_path(lambda p, b: new[metrics_lib.names(p)], feedback)

  def init_steps(self) -> int:
    n = int(self.config.wm_init_steps)
    return n if n >= 0 else max(1, self.task.total_steps // max(1, int(self.config.num_epochs)))

  def init_feedback(self, rng, forward, feedback):
    @jax.jit
    def phase(forward, feedback, rng):
      body = lambda i, fb: self.mirror_step(forward, fb, jax.random.fold_in(rng, i))
      return jax.lax.fori_loop(0, self.init_steps(), body, feedback)
    return phase(forward, feedback, jax.random.fold_in(rng, MIRROR_STREAM))

  def post_update(self, state):
    rng = jax.random.fold_in(jax.random.fold_in(state.rng, MIRROR_STREAM), state.step)
    feedback = self.mirror_step(state.params['forward'], state.params['feedback'], rng)
    return state.replace(params={**state.params, 'feedback': feedback})
