"""The pure training step every rule runs through: `Learner.init` and `Learner.update`.

A `Learner` pairs a rule with one optax transformation per parameter tree. `update(state, batch)`
asks the rule for its gradients, averages them (and the metrics) over the data-parallel axis,
runs each tree's optimizer and lets the rule turn the updates into parameters. It is a pure
function of its inputs: `jit`, `pmap` and `shard_map` wrap it unchanged.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from ccl_jax import optim, rules
from ccl_jax.parallel import BatchAxis
from ccl_jax.rules.base import TREES, Batch, Metrics, Rule, Task
from ccl_jax.state import TrainState, stream


@dataclasses.dataclass(frozen=True)
class Learner:
  rule: Rule
  tx: dict[str, optax.GradientTransformation]

  def init(self, rng: jax.Array, sample_batch: Batch) -> TrainState:
    init_rng, rng = jax.random.split(rng)
    params, extra = self.rule.init_params(init_rng, sample_batch['image'])
    opt_state = {t: self.tx[t].init(params[t]) for t in TREES}
    return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, rng=rng, extra=extra
    )

  def step_tree(self, state: TrainState, tree: str, grads: dict) -> TrainState:
    """One optimizer step on one tree: `grads` averaged over devices, the tree's optax
    transformation, `optim.apply_updates` (a rule's extra steps, see `Rule.before_update`)."""
    grads = self.rule.batch_axis.mean(grads)
    updates, opt = self.tx[tree].update(grads, state.opt_state[tree], state.params[tree])
    return state.replace(
      params={**state.params, tree: optim.apply_updates(state.params[tree], updates)},
      opt_state={**state.opt_state, tree: opt},
    )

  def update(self, state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    """One training step (after the rule's own steps, if it takes any before it)."""
    rng = stream(state.rng, 'update', state.step)
    state, before = self.rule.before_update(state, batch, rng, self.step_tree)
    grads, metrics, extra = self.rule.gradients(state, batch, rng)
    grads, metrics = self.rule.batch_axis.mean((grads, {**before, **metrics}))
    updates, opt_state = {}, dict(state.opt_state)
    for t in TREES:  # a tree without gradients (FA's B, BP's empty feedback) keeps its state
      if jax.tree.leaves(grads[t], is_leaf=optim.is_low_rank):
        updates[t], opt_state[t] = self.tx[t].update(grads[t], state.opt_state[t], state.params[t])
        on = self.rule.steps_tree(state, t)
        if on is not None:  # this step skips the tree: its parameters and optimizer state stay
          keep = lambda new, old: jnp.where(on, new, old)  # noqa: E731
          opt_state[t] = jax.tree.map(keep, opt_state[t], state.opt_state[t])
          updates[t] = jax.tree.map(lambda u: jnp.where(on, u, jnp.zeros_like(u)), updates[t])
      else:
        updates[t] = None
    params = self.rule.apply_updates(state.params, updates, state)
    return state.replace(
      step=state.step + 1, params=params, opt_state=opt_state, extra=extra
    ), metrics


def learner(rule: Rule) -> Learner:
  """`rule` with the optimizers of its config's `optimizer` blocks."""
  tx = {
    t: optim.make(rule.config.optimizer[t], rule.task.total_steps, factored=t in rule.factored)
    for t in TREES
  }
  return Learner(rule, tx)


def build(config, task: Task, batch_axis: BatchAxis = BatchAxis()) -> Learner:
  """The rule `config.rule` with the optimizers of `config.optimizer`."""
  return learner(rules.get(config, task, batch_axis))
