"""What a learning rule is: the `Rule` interface, the task it trains on, and the task losses.

A rule module declares its config section (`SETTINGS`, a dict of `config.Setting`s, named
`SECTION` or the rule's name), optionally `check(config)` for checks across sections, and
`make(config, task, batch_axis) -> Rule`. The rule implements what makes it that rule:

- `init_params(rng, images) -> (params, extra)`: its parameter trees {'forward', 'feedback'} and
  any non-parameter state (BatchNorm statistics, fixed projections);
- `gradients(state, batch, rng) -> (grads, metrics, extra)`: one gradient per tree (a tree the
  rule does not train by gradient gets `{}`), scalar metrics with a 'loss' entry;
- `predict(params, images, extra) -> outputs` (logits);

and, only if it needs them, `apply_updates(params, updates, state) -> params` (how the
optimizers' updates become parameters, for rules that also move weights themselves: KP, sign
symmetry, WM) and `analyze(state, batch) -> metrics` (alignment metrics logged at evaluations).
It knows nothing about optimizers, devices or the loop: `step.py` averages the gradients over
devices and runs each tree's optax transformation. `rules/backprop.py` is the smallest example.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from ccl_jax import optim
from ccl_jax.parallel import BatchAxis
from ccl_jax.state import TrainState

Metrics = dict[str, jax.Array]
Batch = dict[str, jax.Array]  # {'image': (B, H, W, C) float32, 'label': (B,) int32}
TREES = ('forward', 'feedback')


@dataclasses.dataclass(frozen=True)
class Task:
  """What a rule needs to know about the data: class count, image shape, steps in the run."""

  num_classes: int
  image_shape: tuple[int, ...]
  total_steps: int


def task_loss(outputs: jax.Array, labels: jax.Array, kind: str) -> jax.Array:
  """'ce': mean softmax cross-entropy on logits; 'bce': summed binary CE on sigmoid outputs."""
  if kind == 'ce':
    return optax.softmax_cross_entropy_with_integer_labels(outputs, labels).mean()
  if kind == 'bce':
    p = jnp.clip(outputs, 1e-7, 1 - 1e-7)
    y = jax.nn.one_hot(labels, outputs.shape[-1])
    return -(y * jnp.log(p) + (1 - y) * jnp.log1p(-p)).sum(-1).mean()
  raise ValueError(f"unknown loss '{kind}'")


def accuracy(outputs: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(outputs, -1) == labels)


class Rule:
  """A learning rule (see the module docstring for what a subclass implements)."""

  factored: tuple[str, ...] = ()  # trees whose gradients may come as `optim.LowRank` factors

  def __init__(self, config, task: Task, batch_axis: BatchAxis = BatchAxis()):
    self.config = config
    self.task = task
    self.batch_axis = batch_axis

  def init_params(self, rng: jax.Array, images: jax.Array) -> tuple[dict, dict]:
    raise NotImplementedError

  def gradients(
    self, state: TrainState, batch: Batch, rng: jax.Array
  ) -> tuple[dict, Metrics, dict]:
    raise NotImplementedError

  def predict(self, params: dict, images: jax.Array, extra: dict | None = None) -> jax.Array:
    raise NotImplementedError

  def apply_updates(self, params: dict, updates: dict, state: TrainState) -> dict:
    """New parameters from each tree's optimizer updates (None: the tree had no gradient)."""
    del state
    return {
      t: params[t] if updates[t] is None else optim.apply_updates(params[t], updates[t])
      for t in TREES
    }

  def analyze(self, state: TrainState, batch: Batch) -> Metrics:
    """Alignment metrics logged at each evaluation; none by default."""
    del state, batch
    return {}
