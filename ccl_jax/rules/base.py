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
symmetry, WM), `before_update(state, batch, rng, step_tree) -> (state, metrics)` (optimizer
steps a rule takes on one tree before its main step: target propagation's K feedback steps per
batch, each through `step_tree`), `steps_tree(state, tree) -> bool scalar | None` (whether a tree
steps at this update: target propagation's pre-training holds the forward tree) and
`analyze(state, batch) -> metrics` (alignment metrics logged at evaluations).
It knows nothing about optimizers, devices or the loop: `step.py` averages the gradients over
devices and runs each tree's optax transformation. `rules/backprop.py` is the smallest example.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from ccl_jax import optim
from ccl_jax.parallel import BatchAxis
from ccl_jax.state import TrainState

Metrics = dict[str, jax.Array]
Batch = dict[str, jax.Array]  # {'image': (B, H, W, C) float32, 'label': (B,) int32}
TREES = ('forward', 'feedback')
# (state, tree name, that tree's gradients) -> the state after one optimizer step on the tree.
StepTree = Callable[[TrainState, str, dict], TrainState]


@dataclasses.dataclass(frozen=True)
class Task:
  """What a rule needs to know about the data: class count, image shape, steps in the run, and
  the task kind: 'classification' (outputs are logits) or 'reconstruction' (outputs are images,
  the target is the input; `models.task_kind`)."""

  num_classes: int
  image_shape: tuple[int, ...]
  total_steps: int
  kind: str = 'classification'


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


def objective(task: Task, outputs: jax.Array, batch: Batch, kind: str) -> tuple[jax.Array, Metrics]:
  """The task loss and its metrics: `task_loss` and accuracy for classification; for
  reconstruction the pixel MSE against the input image (metrics 'loss' and 'mse')."""
  if task.kind == 'reconstruction':
    mse = jnp.mean((outputs - batch['image'].astype(outputs.dtype)) ** 2)
    return mse, {'loss': mse, 'mse': mse}
  loss = task_loss(outputs, batch['label'], kind)
  return loss, {'loss': loss, 'accuracy': accuracy(outputs, batch['label'])}


def apply_net(module, variables: dict, extra: dict, images: jax.Array, train: bool):
  """`module.apply(variables, images)` with the BatchNorm statistics `extra['batch_stats']` when
  the net has any: in training they are the batch's and come back updated. Returns (output,
  extra)."""
  if 'batch_stats' not in extra:
    return module.apply(variables, images), extra
  variables = {**variables, 'batch_stats': extra['batch_stats']}
  if not train:
    return module.apply(variables, images, train=False), extra
  out, new = module.apply(variables, images, train=True, mutable=['batch_stats'])
  return out, {**extra, 'batch_stats': new['batch_stats']}


def loss_warmup(grads, step: jax.Array, warm: int):
  """The gradients of a loss scaled by min(1, (step + 1) / warm): a loss warm-up (0 = off)."""
  if not warm:
    return grads
  scale = jnp.minimum(1.0, (step + 1).astype(jnp.float32) / warm)
  return jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)


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

  def steps_tree(self, state: TrainState, tree: str) -> jax.Array | None:
    """Whether `tree` takes its optimizer step at this update (a boolean scalar; None: always).
    A tree that does not step keeps its parameters and optimizer state (schedule count,
    moments) exactly, as if the update had not happened for it."""
    del state, tree
    return None

  def before_update(
    self, state: TrainState, batch: Batch, rng: jax.Array, step_tree: StepTree
  ) -> tuple[TrainState, Metrics]:
    """Steps taken before `gradients` in the same update, each by `step_tree(state, tree, grads)`
    (the gradients averaged over devices, then the tree's optax transformation); none by default."""
    del batch, rng, step_tree
    return state, {}

  def analyze(self, state: TrainState, batch: Batch) -> Metrics:
    """Alignment metrics logged at each evaluation; none by default."""
    del state, batch
    return {}
