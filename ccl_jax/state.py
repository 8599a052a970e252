"""The training state every rule carries: one pytree, checkpointed whole."""

from __future__ import annotations

from typing import Any

import jax
from flax import struct

PyTree = Any


class TrainState(struct.PyTreeNode):
  """Step, paired parameter trees, their optimizer states, a PRNG key and rule extras.

  `params` and `opt_state` are dicts with keys 'forward' and 'feedback'. `extra` holds what a
  rule or model needs besides parameters (BatchNorm statistics, fixed projections, ...).
  """
  step: jax.Array
  params: dict[str, PyTree]
  opt_state: dict[str, PyTree]
  rng: jax.Array
  extra: dict[str, PyTree] = struct.field(default_factory=dict)
