"""Data parallelism over all devices: one wrapper, three modes ('none', 'pmap', 'shard_map').

The wrapped function is a training *chunk* `(state, images, labels, idx) -> (state, metrics)`
where `idx` (steps × global batch) indexes the device-resident dataset. The global batch is split
over a 1-D 'data' axis; parameters and optimizer states are replicated; rules average gradients
and metrics with `lax.pmean` over `AXIS` (their `axis_name`), so every mode computes the same step.

Multi-host (after `jax.distributed.initialize()`): every process holds the (small) dataset and
the same global index array; each device gathers its own columns, so each host reads only its
shard of every batch. Collectives span all processes.

The streaming pipeline (`stream.py`) instead hands each process its share of the batches
themselves: `put_batches` places them and `compile_stream` compiles a chunk
`(state, images, labels) -> (state, metrics)` over them, split over devices the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ccl_jax.errors import UserError

AXIS = 'data'
Chunk = Callable[..., tuple[Any, Any]]


@dataclasses.dataclass(frozen=True)
class BatchAxis:
  """The one way a loss sees the global batch, whatever the parallel mode.

  `name` is the data-parallel axis (None on one device). Losses that couple examples (CCL's conv
  pair loss, the sim loss, BatchNorm via `name`) call these instead of writing collectives.
  """

  name: str | None = None

  def rows(self, x: jax.Array) -> jax.Array:
    """Every device's rows of `x` stacked in global-batch order (x itself on one device)."""
    return jax.lax.all_gather(x, self.name, tiled=True) if self.name else x

  def sum(self, x):
    """Sum over devices (x itself on one device)."""
    return jax.lax.psum(x, self.name) if self.name else x

  def mean(self, tree):
    """Mean over devices of every leaf (the tree itself on one device)."""
    return jax.lax.pmean(tree, self.name) if self.name else tree

  def size(self) -> int:
    return jax.lax.psum(1, self.name) if self.name else 1

  def index(self):
    """This device's position on the axis (0 on one device)."""
    return jax.lax.axis_index(self.name) if self.name else 0


def _host(tree):
  """A host (numpy) copy of a tree of replicated arrays, also where they span several hosts."""

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      x = x.addressable_data(0)
    return np.asarray(x)

  return jax.tree.map(one, tree)


def _first(x: jax.Array):
  """Device 0's copy of a pmap output (its leading device axis dropped)."""
  d = x.addressable_data(0)
  return d[0] if d.ndim == x.ndim else d


class DataParallel:
  """Places state and data for one mode and compiles the chunk function for it."""

  def __init__(self, mode: str):
    self.mode = mode
    self.axis_name = None if mode == 'none' else AXIS
    self.batch_axis = BatchAxis(self.axis_name)
    self.local = jax.local_devices()
    if mode == 'none':
      self.n = 1
      return
    # pmap maps over this process's devices; shard_map's mesh spans every process's devices.
    devices = self.local if mode == 'pmap' else jax.devices()
    self.n = len(self.local) * jax.process_count() if mode == 'pmap' else len(devices)
    self.mesh = jax.sharding.Mesh(
      np.array(devices), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,)
    )
    self.replicated = NamedSharding(self.mesh, P())
    self.stacked = NamedSharding(self.mesh, P(AXIS))  # pmap's leading device axis
    self.columns = NamedSharding(self.mesh, P(None, AXIS))  # shard_map's split of the batch

  def check_batch(self, batch_size: int) -> None:
    if batch_size % self.n:
      raise UserError(
        f'config.batch_size={batch_size} does not divide over {self.n} devices '
        f'(parallel={self.mode}); use a multiple of {self.n}'
      )

  def _put(self, x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from the full host copy every process holds."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])

  # -- placement ----------------------------------------------------------------------------------
  def put_data(self, x: np.ndarray) -> jax.Array:
    """The whole split, resident on every device (replicated)."""
    if self.mode == 'none':
      return jax.device_put(x)
    return self._put(x, self.replicated)

  def put_state(self, state):
    if self.mode == 'none':
      return jax.device_put(state)
    host = _host(state)
    if self.mode == 'pmap':
      return jax.tree.map(
        lambda x: self._put(np.broadcast_to(x, (len(self.local),) + x.shape), self.stacked), host
      )
    return jax.tree.map(lambda x: self._put(x, self.replicated), host)

  def get_state(self, state):
    """One copy of the (replicated) state, for evaluation and checkpoints."""
    if self.mode == 'pmap':
      return jax.tree.map(_first, state)
    if self.mode == 'shard_map' and jax.process_count() > 1:
      return _host(state)
    return state

  def get_metrics(self, metrics):
    if self.mode == 'pmap':
      return jax.tree.map(lambda x: np.asarray(_first(x)), metrics)
    return _host(metrics)

  def split_idx(self, idx: np.ndarray):
    """(steps, B) global indices -> this mode's layout: device i gets columns i·B/n:(i+1)·B/n."""
    if self.mode == 'pmap':
      steps, b = idx.shape
      per_device = idx.reshape(steps, self.n, b // self.n).transpose(1, 0, 2)
      mine = per_device[jax.process_index() * len(self.local) :][: len(self.local)]
      return self._put(mine, self.stacked)
    if self.mode == 'shard_map':
      return self._put(idx, self.columns)
    return jax.device_put(idx)

  def put_batches(self, images: np.ndarray, labels: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """This process's share of some steps' batches, (steps, B/processes, ...) each, as the
    streamed chunk's arguments: the global (steps, B, ...) batches split over the devices by
    columns ('shard_map'), stacked per local device ('pmap'), or on the one device."""
    if self.mode == 'none':
      return jax.device_put(images), jax.device_put(labels)
    if self.mode == 'pmap':

      def per_device(x):
        steps, b = x.shape[:2]
        d = len(self.local)
        x = x.reshape((steps, d, b // d) + x.shape[2:]).swapaxes(0, 1)
        return self._put(np.ascontiguousarray(x), self.stacked)

      return per_device(images), per_device(labels)

    def global_array(x):
      shape = (x.shape[0], x.shape[1] * jax.process_count()) + x.shape[2:]
      return jax.make_array_from_process_local_data(self.columns, x, shape)

    return global_array(images), global_array(labels)

  # -- compilation --------------------------------------------------------------------------------
  def ahead_of_time(self, fn: Chunk, *args) -> Chunk:
    """Compiles `fn` for these arguments now, so the training clock excludes compilation.

    Multi-process pmap is left to compile on its first call (its lowering sees global shapes).
    """
    if self.mode == 'pmap' and jax.process_count() > 1:
      return fn
    return fn.lower(*args).compile()

  def compile_stream(self, chunk: Chunk) -> Chunk:
    """Compiles a streamed chunk `(state, images, labels) -> (state, metrics)` whose batches
    (steps, B, ...) come placed by `put_batches`."""
    if self.mode == 'pmap':
      return jax.pmap(chunk, axis_name=AXIS, in_axes=(0, 0, 0), donate_argnums=0)
    if self.mode == 'shard_map':
      batches = P(None, AXIS)
      sharded = jax.shard_map(
        chunk,
        mesh=self.mesh,
        in_specs=(P(), batches, batches),
        out_specs=(P(), P()),
        check_vma=False,
      )
      return jax.jit(sharded, donate_argnums=0)
    return jax.jit(chunk, donate_argnums=0)

  def compile(self, chunk: Chunk) -> Chunk:
    if self.mode == 'pmap':
      return jax.pmap(chunk, axis_name=AXIS, in_axes=(0, None, None, 0), donate_argnums=0)
    if self.mode == 'shard_map':
      sharded = jax.shard_map(
        chunk,
        mesh=self.mesh,
        in_specs=(P(), P(), P(), P(None, AXIS)),
        out_specs=(P(), P()),
        check_vma=False,
      )
      return jax.jit(sharded, donate_argnums=0)
    return jax.jit(chunk, donate_argnums=0)
