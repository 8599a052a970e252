"""The training state every rule carries (one pytree, checkpointed whole) and its random streams."""

from __future__ import annotations

from typing import Any

import jax
from flax import struct

PyTree = Any

# Every random stream drawn from the state's key has its own id here; a stream's per-step key is
# folded from its own key, so no stream's key can equal another's at any step.
STREAMS = {'update': 0x7D1, 'augment': 0xA06, 'mirror': 0x5717, 'projection': 0xB10}


def stream(rng: jax.Array, name: str, step: jax.Array | int | None = None) -> jax.Array:
  """The key of random stream `name` (at `step`, if given)."""
  key = jax.random.fold_in(rng, STREAMS[name])
  return key if step is None else jax.random.fold_in(key, step)


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
