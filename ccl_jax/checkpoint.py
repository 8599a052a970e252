"""Orbax checkpoints of the whole run: TrainState, the best-by-validation parameters, bookkeeping.

Each checkpoint holds `{'state', 'best'}` as one pytree plus a small JSON record (`meta`: epoch,
best validation loss, the config). A checkpoint that does not fit the current run's shapes is
refused with the keys that differ; an unreadable latest one is reported and an older one used.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization

from ccl_jax.errors import UserError

log = logging.getLogger(__name__)
Tree = Any


def _shapes(tree: Tree) -> dict[str, tuple]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(k): tuple(np.shape(v)) for k, v in flat}


class Checkpointer:
  """Saves every call to `save`, keeps the newest `keep`; restores the newest readable one.

  In a multi-process run every process makes one and calls `save`/`restore` together; Orbax
  lets the primary process write. `write=False` opens a run read-only (for inspection).
  """

  def __init__(self, workdir: str, keep: int = 2, write: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self.write = write
    options = ocp.CheckpointManagerOptions(max_to_keep=max(1, keep), create=write,
                                           enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={'tree': ocp.StandardCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()})

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, tree: Tree, meta: dict) -> None:
    if not self.write:
      return
    state_dict = serialization.to_state_dict(jax.device_get(tree))
    self.manager.save(step, args=ocp.args.Composite(
        tree=ocp.args.StandardSave(state_dict), meta=ocp.args.JsonSave(meta)), force=True)
    self.manager.wait_until_finished()

  def restore(self, template: Tree, config_json: dict) -> tuple[Tree, dict] | None:
    """Newest readable checkpoint shaped like `template`, or None if there is none."""
    steps = self.steps()
    template_dict = serialization.to_state_dict(jax.device_get(template))
    for step in reversed(steps):
      try:
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
        self._check_config(step, meta, config_json)
        self._check_shapes(step, template_dict, meta, config_json)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            tree=ocp.args.StandardRestore(template_dict)))['tree']
        tree = serialization.from_state_dict(template, restored)
      except UserError:
        raise
      except Exception as e:  # unreadable / half-written: set it aside, fall back to an older one
        aside = self._set_aside(step)
        log.warning('checkpoint at step %d is unreadable (%s: %s)', step, type(e).__name__,
                    str(e).splitlines()[0][:200] if str(e) else '')
        print(f'warning: checkpoint step {step} in {self.directory} is unreadable '
              f'({type(e).__name__}); moved to {aside}; falling back to an older one', flush=True)
        continue
      return tree, meta
    if steps:
      raise UserError(f'no readable checkpoint in {self.directory} (steps {steps} were moved to '
                      'corrupt_checkpoints/); start over with --config.force_retrain=True or '
                      'choose another --workdir')
    return None

  def _set_aside(self, step: int) -> str:
    """Moves an unreadable checkpoint out of the manager's way (nothing is deleted)."""
    src = os.path.join(self.directory, str(step))
    dst = os.path.join(os.path.dirname(self.directory), 'corrupt_checkpoints',
                       f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
    if self.write and jax.process_index() == 0 and os.path.isdir(src):
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      os.replace(src, dst)
      self.manager.reload()
      return dst
    return src

  def _check_config(self, step, meta, config_json) -> None:
    """Refuses to resume a run written by a different experiment (rule, lr, seed, ...)."""
    diff = changed_keys(meta.get('config', config_json), config_json)
    if diff:
      raise UserError(f'checkpoint in {self.directory} (step {step}) does not fit this config '
                      f'(changed keys: {", ".join(diff)}); use the saved config '
                      f'({os.path.dirname(self.directory)}/config.json), another --workdir, '
                      'or --config.force_retrain=True')

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
      what = f'{bad[0]} saved {got[bad[0]]} vs now {want[bad[0]]}' if bad else f'tree differs at {missing[0]}'
      raise UserError(f'checkpoint in {self.directory} (step {step}) does not fit this config '
                      f'({what}; changed keys: {", ".join(diff) or "none"}); '
                      'use the saved config or another --workdir')


def _shapes_meta(tree) -> dict[str, Any]:
  flat = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, 'shape') and not isinstance(x, dict))[0]
  return {jax.tree_util.keystr(k): v for k, v in flat}


# Keys that steer how a run executes, not what it computes: they may change between resumes.
RUN_CONTROL_KEYS = frozenset({
    'num_epochs', 'data_dir', 'cache_dir', 'progress', 'parallel', 'force_retrain',
    'checkpoint_every_epochs', 'checkpoint_every_steps', 'keep_checkpoints', 'steps_per_call',
    'scan_unroll', 'eval_batch_size', 'analysis_batch_size'})


def _flat(d: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def changed_keys(saved: dict, now: dict) -> list[str]:
  """Dotted config keys whose values differ, ignoring run-control keys. A key the saved config
  lacks (added to the package since) counts as unchanged while it holds its default."""
  from ccl_jax import config as config_lib  # late import: config imports nothing from here
  a, b = _flat(saved), _flat(now)
  defaults = _flat(config_to_json(config_lib.base()))
  missing = lambda k: k not in a and k in defaults and b.get(k) == defaults[k]
  return sorted(k for k in set(a) | set(b)
                if k.split('.')[0] not in RUN_CONTROL_KEYS and a.get(k) != b.get(k)
                and not missing(k))


def config_to_json(config) -> dict:
  return json.loads(config.to_json_best_effort())
