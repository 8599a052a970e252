"""What every learning rule shares: the Task it trains on, its optimizers, and the update plumbing."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from ccl_jax import optim
from ccl_jax.state import TrainState

Metrics = dict[str, jax.Array]
Batch = dict[str, jax.Array]   # {'image': (B, H, W, C) float32, 'label': (B,) int32}
TREES = ('forward', 'feedback')
LOSSES = ('ce', 'bce')


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
  """A learning rule: `init` builds the TrainState, `update` is one pure training step.

  Subclasses implement `init_params`, `loss_and_grads` and `predict`; the base applies the two
  optimizers and averages over the data-parallel axis (`axis_name`) when one is set.
  """
  name = 'rule'

  def __init__(self, config, task: Task, axis_name: str | None = None):
    self.config = config
    self.task = task
    self.axis_name = axis_name
    self.tx = {t: optim.make(config.optimizer[t], task.total_steps) for t in TREES}

  # -- to implement -------------------------------------------------------------------------------
  def init_params(self, rng: jax.Array, images: jax.Array) -> tuple[dict, dict]:
    """Returns ({'forward': ..., 'feedback': ...}, extra)."""
    raise NotImplementedError

  def loss_and_grads(self, state: TrainState, batch: Batch, rng: jax.Array
                     ) -> tuple[dict, Metrics, dict]:
    """Returns (grads with the params' structure, metrics, new extra)."""
    raise NotImplementedError

  def predict(self, params: dict, images: jax.Array, extra: dict | None = None) -> jax.Array:
    raise NotImplementedError

  # -- shared -------------------------------------------------------------------------------------
  def init(self, rng: jax.Array, sample_batch: Batch) -> TrainState:
    init_rng, rng = jax.random.split(rng)
    params, extra = self.init_params(init_rng, sample_batch['image'])
    opt_state = {t: self.tx[t].init(params[t]) for t in TREES}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                      rng=rng, extra=extra)

  def mean(self, tree):
    """Averages over the data-parallel axis, if any."""
    return jax.lax.pmean(tree, self.axis_name) if self.axis_name else tree

  def apply_gradients(self, state: TrainState, grads: dict, extra: dict) -> TrainState:
    params, opt_state = {}, {}
    for t in TREES:
      params[t], opt_state[t] = self.apply_tree(t, state, grads[t])
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, extra=extra)

  def apply_tree(self, tree: str, state: TrainState, grads) -> tuple[dict, dict]:
    """One tree's optimizer step: its new parameters and optimizer state."""
    updates, opt_state = self.tx[tree].update(grads, state.opt_state[tree], state.params[tree])
    return optax.apply_updates(state.params[tree], updates), opt_state

  def update(self, state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    """One training step: the pure function every loop and every parallel wrapper calls."""
    rng = jax.random.fold_in(state.rng, state.step)
    grads, metrics, extra = self.loss_and_grads(state, batch, rng)
    grads, metrics = self.mean((grads, metrics))
    state = self.apply_gradients(state, grads, extra)
    return self.post_update(state), metrics

  def post_update(self, state: TrainState) -> TrainState:
    """Hook for rules that change feedback weights outside the gradient step (sign, KP, WM)."""
    return state

  def analyze(self, state: TrainState, batch: Batch) -> Metrics:
    """Alignment metrics logged at each evaluation (weight/delta angles, ...); none by default."""
    del state, batch
    return {}
