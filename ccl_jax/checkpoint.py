"""Orbax checkpoints of the whole run: TrainState, the best-by-validation parameters, bookkeeping.

Each checkpoint holds `{'state', 'best'}` as one pytree plus a small JSON record (`meta`: epoch,
best validation loss, the config, and sha256 checksums of the tree and of meta itself); a streamed
run adds its input pipeline's iterator state as a third, JSON item ('data', its checksum in meta). A
checkpoint that does not fit the current run's shapes is refused with the keys that differ; one
that is unreadable or fails its checksum is set aside and an older one used.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sys
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization

from ccl_jax.errors import UserError

log = logging.getLogger(__name__)
Tree = Any
CHECKSUM_KEYS = ('checksum', 'meta_checksum', 'data_checksum')


def _shapes(tree: Tree) -> dict[str, tuple]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(k): tuple(np.shape(v)) for k, v in flat}


def tree_checksum(tree: Tree) -> str | None:
  """sha256 over every leaf's path, dtype, shape and bytes, in flattening order (sorted dict
  keys); None if some leaf is not fully on this host (a sharded multi-host array)."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      return None
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f'{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|'.encode())
    h.update(a.tobytes())
  return 'sha256:' + h.hexdigest()


def meta_checksum(meta: dict) -> str:
  """sha256 of `meta` (less this checksum) as canonical JSON."""
  body = {k: v for k, v in meta.items() if k != 'meta_checksum'}
  return 'sha256:' + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def json_checksum(value) -> str:
  """sha256 of a JSON value, canonical (sorted keys)."""
  return 'sha256:' + hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


class Damaged(Exception):
  """A checkpoint that reads but whose content fails its checksum."""


def _is_closed_loop_noise(unraisable) -> bool:
  """Orbax restores in its own asyncio loop; when one read fails the loop closes while other
  TensorStore reads are in flight, and their completion callbacks (`call_soon_threadsafe` on
  the closed loop) reach `sys.unraisablehook` as 'Event loop is closed' tracebacks."""
  e = unraisable.exc_value
  if not (isinstance(e, RuntimeError) and str(e) == 'Event loop is closed'):
    return False
  tb = e.__traceback__
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  return tb is None or tb.tb_frame.f_code.co_filename.startswith(os.path.dirname(asyncio.__file__))


def _quiet_closed_loop_callbacks() -> None:
  """Installs (once) an unraisable hook that drops only that noise, passing all else on."""
  if getattr(sys.unraisablehook, '_ccl_quiet', False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _is_closed_loop_noise(unraisable):
      previous(unraisable)

  hook._ccl_quiet = True
  sys.unraisablehook = hook


class _DropReraisedErrors(logging.Filter):
  """Orbax logs an exception of its writer threads before re-raising it in the caller (where
  `main` reports it in one line); the log record is a duplicate traceback."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (
      record.levelno >= logging.ERROR and '_SignalingThread.run() raised' in str(record.msg)
    )


def _quiet_orbax_thread_errors() -> None:
  absl_log = logging.getLogger('absl')
  if not any(isinstance(f, _DropReraisedErrors) for f in absl_log.filters):
    absl_log.addFilter(_DropReraisedErrors())


class Checkpointer:
  """Saves every call to `save`, keeps the newest `keep`; restores the newest good one.

  In a multi-process run every process makes one and calls `save`/`restore` together; Orbax
  lets the primary process write. `write=False` opens a run read-only (for inspection).
  """

  def __init__(self, workdir: str, keep: int = 2, write: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self.write = write
    _quiet_orbax_thread_errors()
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max(1, keep), create=write, enable_async_checkpointing=False
    )
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=options,
      item_handlers={
        'tree': ocp.StandardCheckpointHandler(),
        'meta': ocp.JsonCheckpointHandler(),
        'data': ocp.JsonCheckpointHandler(),
      },
    )

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, tree: Tree, meta: dict, data: dict | None = None) -> None:
    """Saves `tree` and `meta` (and `data`, the input pipeline's state, if given) as checkpoint
    `step`, with checksums of each in meta."""
    if not self.write:
      return
    state_dict = serialization.to_state_dict(jax.device_get(tree))
    meta = {k: v for k, v in meta.items() if k not in CHECKSUM_KEYS}
    checksum = tree_checksum(state_dict)
    if checksum is not None:
      meta['checksum'] = checksum
    items = {'tree': ocp.args.StandardSave(state_dict)}
    if data is not None:
      meta['data_checksum'] = json_checksum(data)
      items['data'] = ocp.args.JsonSave(data)
    meta['meta_checksum'] = meta_checksum(meta)
    self.manager.save(
      step, args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **items), force=True
    )
    self.manager.wait_until_finished()

  def restore(self, template: Tree, config_json: dict, with_data: bool = False):
    """Newest good checkpoint shaped like `template`: (tree, meta without its checksums), and
    the input pipeline's state (None if it has none) third when `with_data`; None if there is
    none. Older ones are verified too, so the one to fall back on is known good."""
    _quiet_closed_loop_callbacks()
    steps = self.steps()
    template_dict = serialization.to_state_dict(jax.device_get(template))
    found: tuple[Tree, dict] | None = None
    found_step = None
    for i, step in reversed(list(enumerate(steps))):
      try:
        meta = self._read_meta(step)
        if found is None:
          self._check_config(step, meta, config_json)
        self._check_shapes(step, template_dict, meta, config_json)
        restored = self._read_tree(step, template_dict, meta)
        data = self._read_data(step, meta)
        if found is not None:  # an older one: verified, not used
          continue
        tree = serialization.from_state_dict(template, restored)
      except UserError:
        if found is not None:
          continue  # an older one of another shape is not ours to judge
        raise
      except Exception as e:  # unreadable / half-written / damaged: set aside, fall back
        self._report_bad(step, e, found_step, older=i > 0)
        continue
      meta = {k: v for k, v in meta.items() if k not in CHECKSUM_KEYS}
      found, found_step = ((tree, meta, data) if with_data else (tree, meta)), step
    if found is None and steps:
      raise UserError(
        f'no readable checkpoint in {self.directory} (steps '
        f'{", ".join(map(str, steps))} were damaged and moved to '
        f'{self._aside_root()}); start over with --config.force_retrain=True or '
        'choose another --workdir'
      )
    return found

  def _read_meta(self, step: int) -> dict:
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    if not isinstance(meta, dict):
      raise Damaged('meta is not a JSON object')
    if 'meta_checksum' in meta and meta['meta_checksum'] != meta_checksum(meta):
      raise Damaged('meta checksum mismatch')
    return meta

  def _read_data(self, step: int, meta: dict) -> dict | None:
    """The 'data' item (the input pipeline's state) of a checkpoint whose meta lists one."""
    if 'data_checksum' not in meta:
      return None
    data = self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))['data']
    if json_checksum(data) != meta['data_checksum']:
      raise Damaged('data (input pipeline state) checksum mismatch')
    return data

  def _read_tree(self, step: int, template_dict: Tree, meta: dict) -> Tree:
    restored = self.manager.restore(
      step, args=ocp.args.Composite(tree=ocp.args.StandardRestore(template_dict))
    )['tree']
    want = meta.get('checksum')
    if want is not None:  # checkpoints from before checksums restore unverified
      got = tree_checksum(restored)
      if got is not None and got != want and self._same_dtypes(step, template_dict):
        raise Damaged('tree checksum mismatch')  # (a dtype cast on restore changes the bytes)
    return restored

  def _same_dtypes(self, step: int, template_dict: Tree) -> bool:
    saved = self.manager.item_metadata(step)
    if saved is None or 'tree' not in saved or saved['tree'] is None:
      return True
    got = {
      k: np.dtype(getattr(v, 'dtype', None) or 'O') for k, v in _shapes_meta(saved['tree']).items()
    }
    flat = jax.tree_util.tree_flatten_with_path(template_dict)[0]
    return all(got.get(jax.tree_util.keystr(k)) == np.asarray(v).dtype for k, v in flat)

  def _report_bad(self, step: int, e: Exception, good_step: int | None, older: bool) -> None:
    """One warning line for a checkpoint that failed, after moving it aside."""
    aside = self._set_aside(step)
    what = (
      'failed its checksum (damaged)'
      if isinstance(e, Damaged)
      else f'is unreadable ({type(e).__name__})'
    )
    then = (
      f'the newer step {good_step} is intact'
      if good_step is not None
      else 'falling back to an older one'
      if older
      else 'no older one is left'
    )
    log.info(
      'checkpoint at step %d: %s: %s',
      step,
      type(e).__name__,
      str(e).splitlines()[0][:200] if str(e) else '',
    )
    print(
      f'warning: checkpoint step {step} in {self.directory} {what}; moved to {aside}; {then}',
      flush=True,
    )

  def _aside_root(self) -> str:
    return os.path.join(os.path.dirname(self.directory), 'corrupt_checkpoints')

  def _set_aside(self, step: int) -> str:
    """Moves an unreadable checkpoint out of the manager's way (nothing is deleted)."""
    src = os.path.join(self.directory, str(step))
    dst = os.path.join(self._aside_root(), f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
    if self.write and jax.process_index() == 0 and os.path.isdir(src):
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      base, n = dst, 1
      while os.path.exists(dst):
        dst, n = f'{base}~{n}', n + 1
      os.replace(src, dst)
      self.manager.reload()
      return dst
    return src

  def _check_config(self, step, meta, config_json) -> None:
    """Refuses to resume a run written by a different experiment (rule, lr, seed, ...)."""
    diff = changed_keys(meta.get('config', config_json), config_json)
    if diff:
      raise UserError(
        f'checkpoint in {self.directory} (step {step}) does not fit this config '
        f'(changed keys: {", ".join(diff)}); use the saved config '
        f'({os.path.dirname(self.directory)}/config.json), another --workdir, '
        'or --config.force_retrain=True'
      )

  def _check_shapes(self, step, template_dict, meta, config_json) -> None:
    saved = self.manager.item_metadata(step)
    saved_tree = saved['tree'] if saved is not None and 'tree' in saved else None
    if saved_tree is None:
      return
    want = _shapes(template_dict)
    got = {k: tuple(getattr(v, 'shape', ()) or ()) for k, v in _shapes_meta(saved_tree).items()}
    bad = sorted(k for k in want if k in got and got[k] != want[k])
    missing = sorted(set(want) ^ set(got))
    if bad or missing:
      diff = changed_keys(meta.get('config', {}), config_json)
      what = (
        f'{bad[0]} saved {got[bad[0]]} vs now {want[bad[0]]}'
        if bad
        else f'tree differs at {missing[0]}'
      )
      raise UserError(
        f'checkpoint in {self.directory} (step {step}) does not fit this config '
        f'({what}; changed keys: {", ".join(diff) or "none"}); '
        'use the saved config or another --workdir'
      )


def _shapes_meta(tree) -> dict[str, Any]:
  flat = jax.tree_util.tree_flatten_with_path(
    tree, is_leaf=lambda x: hasattr(x, 'shape') and not isinstance(x, dict)
  )[0]
  return {jax.tree_util.keystr(k): v for k, v in flat}


def changed_keys(saved: dict, now: dict) -> list[str]:
  """See `config.changed_keys`: the keys that keep a checkpoint from resuming under `now`."""
  from ccl_jax import config as config_lib  # late import: config imports the registries

  return config_lib.changed_keys(saved, now)


def config_to_json(config) -> dict:
  return json.loads(config.to_json_best_effort())
