"""Registry of learning rules: name -> Rule class."""

from __future__ import annotations

from ccl_jax.errors import UserError
from ccl_jax.rules import (backprop, counter_current, feedback_alignment, kolen_pollack,
                           local_losses, weight_mirror)
from ccl_jax.rules.base import Rule, Task

REGISTRY: dict[str, type[Rule]] = {
    'bp': backprop.Backprop,
    'ccl': counter_current.CounterCurrent,
    'fa': feedback_alignment.FeedbackRule,
    'sign_symmetry': feedback_alignment.SignSymmetry,
    'kp': kolen_pollack.KolenPollack,
    'wm': weight_mirror.WeightMirror,
    **{name: local_losses.LocalLosses for name in local_losses.VARIANTS},
}


def names() -> tuple[str, ...]:
  return tuple(REGISTRY)


def get(config, task: Task, axis_name: str | None = None) -> Rule:
  """Builds the rule named by `config.rule`, or fails with one line naming it."""
  if config.rule not in REGISTRY:
    raise UserError(f"unknown rule '{config.rule}'; choose one of {', '.join(names())}")
  return REGISTRY[config.rule](config, task, axis_name)
