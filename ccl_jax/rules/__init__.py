"""Registry of learning rules: name -> rule module (its `make`, `SETTINGS`, optional `check`)."""

from __future__ import annotations

from ccl_jax.errors import UserError
from ccl_jax.parallel import BatchAxis
from ccl_jax.rules import (
  backprop,
  counter_current,
  direct_feedback,
  drl,
  drtp,
  dtp,
  feedback_alignment,
  fwdtp,
  kolen_pollack,
  ldrl,
  local_losses,
  sign_symmetry,
  weight_mirror,
)
from ccl_jax.rules.base import Rule, Task

REGISTRY = {
  'bp': backprop,
  'ccl': counter_current,
  'fa': feedback_alignment,
  'sign_symmetry': sign_symmetry,
  'kp': kolen_pollack,
  'wm': weight_mirror,
  'global': local_losses,
  'pred': local_losses,
  'sim': local_losses,
  'predsim': local_losses,
  'dfa': direct_feedback,
  'drtp': drtp,
  'dtp': dtp,
  'drl': drl,
  'ldrl': ldrl,
  'fwdtp': fwdtp,
}


def names() -> tuple[str, ...]:
  return tuple(REGISTRY)


def get(config, task: Task, batch_axis: BatchAxis = BatchAxis()) -> Rule:
  """Builds the rule named by `config.rule`, or fails with one line naming it."""
  if config.rule not in REGISTRY:
    raise UserError(f"unknown rule '{config.rule}'; choose one of {', '.join(names())}")
  return REGISTRY[config.rule].make(config, task, batch_axis)
