"""Data parallelism over all local devices: one wrapper, three modes ('none', 'pmap', 'shard_map').

The wrapped function is a training *chunk* `(state, images, labels, idx) -> (state, metrics)`
where `idx` (steps × global batch) indexes the device-resident dataset. The global batch is split
over a 1-D 'data' axis; parameters and optimizer states are replicated; rules average gradients
and metrics with `lax.pmean` over `AXIS` (their `axis_name`), so every mode computes the same step.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ccl_jax.errors import UserError

AXIS = 'data'
Chunk = Callable[..., tuple[Any, Any]]


class DataParallel:
  """Places state and data for one mode and compiles the chunk function for it."""

  def __init__(self, mode: str, devices=None):
    self.mode = mode
    self.devices = list(devices or jax.local_devices())
    self.n = 1 if mode == 'none' else len(self.devices)
    self.axis_name = None if mode == 'none' else AXIS
    if mode != 'none':
      self.mesh = jax.sharding.Mesh(np.array(self.devices), (AXIS,),
                                    axis_types=(jax.sharding.AxisType.Auto,))
      self.replicated = NamedSharding(self.mesh, P())
      self.stacked = NamedSharding(self.mesh, P(AXIS))  # pmap's leading device axis

  def check_batch(self, batch_size: int) -> None:
    if batch_size % self.n:
      raise UserError(f'config.batch_size={batch_size} does not divide over {self.n} devices '
                      f'(parallel={self.mode}); use a multiple of {self.n}')

  # -- placement ----------------------------------------------------------------------------------
  def put_data(self, x: np.ndarray) -> jax.Array:
    """The whole split, resident on every device (replicated)."""
    if self.mode == 'none':
      return jax.device_put(x)
    return jax.device_put(x, self.replicated)

  def put_state(self, state):
    if self.mode == 'shard_map':
      return jax.device_put(state, self.replicated)
    if self.mode == 'pmap':
      return jax.device_put(
          jax.tree.map(lambda x: np.broadcast_to(x, (self.n,) + np.shape(x)), jax.device_get(state)),
          self.stacked)
    return jax.device_put(state)

  def get_state(self, state):
    """One copy of the (replicated) state, for evaluation and checkpoints."""
    if self.mode == 'pmap':
      return jax.tree.map(lambda x: x[0], state)
    return state

  def get_metrics(self, metrics):
    metrics = jax.device_get(metrics)
    if self.mode == 'pmap':
      metrics = jax.tree.map(lambda x: x[0], metrics)
    return metrics

  def split_idx(self, idx: np.ndarray):
    """(steps, B) global indices -> this mode's layout: device i gets columns i·B/n:(i+1)·B/n."""
    if self.mode == 'pmap':
      steps, b = idx.shape
      return jax.device_put(idx.reshape(steps, self.n, b // self.n).transpose(1, 0, 2), self.stacked)
    if self.mode == 'shard_map':
      return jax.device_put(idx, NamedSharding(self.mesh, P(None, AXIS)))
    return jnp.asarray(idx)

  # -- compilation --------------------------------------------------------------------------------
  def compile(self, chunk: Chunk) -> Chunk:
    if self.mode == 'pmap':
      return jax.pmap(chunk, axis_name=AXIS, in_axes=(0, None, None, 0), donate_argnums=0)
    if self.mode == 'shard_map':
      sharded = jax.shard_map(chunk, mesh=self.mesh,
                              in_specs=(P(), P(), P(), P(None, AXIS)),
                              out_specs=(P(), P()), check_vma=False)
      return jax.jit(sharded, donate_argnums=0)
    return jax.jit(chunk, donate_argnums=0)
