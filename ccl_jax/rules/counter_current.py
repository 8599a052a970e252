"""CCL: counter-current learning with a mirrored feedback net (SPEC §1.1 MLP, §1.2 CNN).

The forward net runs on the input, the feedback net on the K×K identity (one prototype per class
and layer). Each pair of activations at the same width is compared by a local loss; every layer's
input is stop_gradient'd, so one `jax.grad` of the summed losses gives exactly the local gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ccl_jax import config as config_lib
from ccl_jax import layers, models, optim
from ccl_jax import metrics as metrics_lib
from ccl_jax.errors import UserError
from ccl_jax.parallel import BatchAxis
from ccl_jax.rules import base

MIXED_PRECISION = True  # supports config.compute_dtype='bfloat16'
SETTINGS = {
  'loss_scale': config_lib.non_negative('c: weight of the layer-wise pair losses', 0.5),
  'self_scale': config_lib.non_negative(
    'conv nets: weight s of the ĤĤᵀ and ĜĜᵀ decorrelation terms', 0.5
  ),
  'loss_warmup_steps': config_lib.non_negative(
    'conv nets: the loss scaled by step/N over the first N steps (0 = off)', 0
  ),
  'filter_target': config_lib.fraction(
    'conv nets: samples with p(true class) above this skip the pair losses (0 = off)', 0.0
  ),
}
NORMALIZED = ('cnn',)  # models whose pair loss is the normalised one (SPEC §1.2)


def check(config) -> None:
  c = config.ccl
  reconstruction = models.task_kind(config.model) == 'reconstruction'
  for key in ('loss_warmup_steps', 'filter_target'):
    if (
      c[key] and config.model not in NORMALIZED and not (reconstruction and key != 'filter_target')
    ):
      raise UserError(f"config.ccl.{key}={c[key]} is not used on model '{config.model}'")


def prototype_loss(h: jax.Array, g: jax.Array, onehot: jax.Array, scale: float) -> jax.Array:
  """(256·c/d) · mean((h gᵀ − Y)²): forward activations h (B×d) against class prototypes g (K×d)."""
  return _loss_and_residual(h, g, onehot, scale)[0]


def _loss_and_residual(h, g, onehot, scale):
  r = (h @ g.T).astype(jnp.float32) - onehot
  return (256.0 * scale / h.shape[-1]) * jnp.mean(r**2), r


def _prototype_grad(h, g, r, scale):
  """∂ prototype_loss / ∂g = (2·256·c / (d·B·K)) · rᵀ h, from the loss's residual r = h gᵀ − Y."""
  b, d = h.shape
  coef = 2 * 256.0 * scale / (d * b * r.shape[-1])
  return (coef * (r.astype(h.dtype).T @ h)).astype(g.dtype)


def normalized_pair_loss(
  h: jax.Array,
  g: jax.Array,
  onehot: jax.Array,
  c: float,
  s: float,
  batch_axis: BatchAxis = BatchAxis(),
  keep: jax.Array | None = None,
) -> jax.Array:
  """The conv nets' pair loss (SPEC §1.2), rows flattened and L2-normalised (Ĥ: batch, Ĝ: K
  prototypes): c·mean((ĤĜᵀ − Y)²) + s·mean((ĤĤᵀ − I_B)²) + s·mean((ĜĜᵀ − I_K)²).

  `keep` (B,) in {0, 1} restricts the batch terms to the kept rows, as if the others were not in
  the batch (`filter_target`). Under data parallelism Ĥ's rows (and `keep`) are gathered for ĤĤᵀ,
  so it is the global batch's.
  """
  hn, gn = metrics_lib.unit_rows(h), metrics_lib.unit_rows(g)
  keep = jnp.ones(hn.shape[0], jnp.float32) if keep is None else keep.astype(jnp.float32)
  rows = batch_axis.sum(jnp.sum(keep))
  n_dev = batch_axis.size()
  # Per device: its kept rows' share of the global mean, × devices (the caller's pmean undoes it).
  cross = (
    jnp.sum(keep[:, None] * (hn @ gn.T - onehot) ** 2)
    * n_dev
    / (jnp.maximum(rows, 1.0) * onehot.shape[-1])
  )
  all_h, all_keep = batch_axis.rows(hn), batch_axis.rows(keep)
  pair = all_keep[:, None] * all_keep[None, :]
  self_h = jnp.sum(pair * (all_h @ all_h.T - jnp.eye(all_h.shape[0])) ** 2) / jnp.maximum(
    rows * rows, 1.0
  )
  self_g = jnp.mean((gn @ gn.T - jnp.eye(gn.shape[0])) ** 2)
  return c * cross + s * (self_h + self_g)


class CounterCurrent(base.Rule):
  def __init__(self, config, task, batch_axis=BatchAxis()):
    super().__init__(config, task, batch_axis)
    self.c = config.ccl
    self.model = models.forward(config, task, local=True)
    self.feedback = models.feedback(config, task)
    # MLP: raw dot-product pair loss, computed in phases; with plain SGD on the feedback tree its
    # rank-K kernel gradients stay factored (optim.LowRank, stepped by optim.low_rank_sgd).
    # CNN: the normalised pair loss.
    self.normalized = config.model in NORMALIZED
    self.low_rank = not self.normalized and optim.plain_sgd(config.optimizer.feedback)

  @property
  def factored(self):
    return ('feedback',) if self.low_rank else ()

  def init_params(self, rng, images):
    f_rng, b_rng = jax.random.split(rng)
    eye = jnp.eye(self.task.num_classes)
    return {
      'forward': self.model.init(f_rng, images)['params'],
      'feedback': self.feedback.init(b_rng, eye)['params'],
    }, {}

  def predict(self, params, images, extra=None):
    return self.model.apply({'params': params['forward']}, images)[0]

  def losses(self, params, batch) -> tuple[jax.Array, dict]:
    """Total loss = task loss + Σ_l layer loss, with per-term metrics.

    The plain statement of the objective: `jax.grad` of it is exactly what `loss_and_grads`
    computes in phases (tests check both, and each term's locality, against it).
    """
    x, y = batch['image'], batch['label']
    out, hiddens = self.model.apply({'params': params['forward']}, x)
    prototypes = self.feedback.apply(
      {'params': params['feedback']}, jnp.eye(self.task.num_classes)
    )  # computed once per step
    onehot = jax.nn.one_hot(y, self.task.num_classes)
    acts = [x] + hiddens
    task = base.task_loss(out, y, self.config.loss)
    metrics = {'task_loss': task, 'accuracy': base.accuracy(out, y)}
    keep, threshold = None, float(self.c.filter_target)
    if threshold:  # samples already classified with p(true class) > threshold leave the pair losses
      p_true = jnp.take_along_axis(jax.nn.softmax(jax.lax.stop_gradient(out)), y[:, None], 1)[:, 0]
      keep = p_true <= threshold
      metrics['kept_fraction'] = jnp.mean(keep.astype(jnp.float32))
    total = task
    for l, (h, g) in enumerate(zip(acts, prototypes)):
      if self.normalized:
        term = normalized_pair_loss(
          h, g, onehot, self.c.loss_scale, self.c.self_scale, self.batch_axis, keep
        )
      else:
        term = prototype_loss(h.reshape(h.shape[0], -1), g, onehot, self.c.loss_scale)
      metrics[f'layer_loss/{l}'] = term
      total = total + term
    metrics['loss'] = total
    return total, metrics

  def gradients(self, state, batch, rng):
    """The gradient of `losses`, computed in three sequenced phases.

    Because every layer's input is cut, the forward net's gradient needs the prototypes only as
    constants, and the feedback net's gradient needs the forward activations only as constants.
    So: (1) prototypes from the K×K identity, (2) the forward net's value and gradient, (3) the
    feedback net's gradient through its saved VJP. `optimization_barrier` keeps the phases apart:
    on CPU, letting XLA overlap the many independent local backward passes oversubscribes the cores
    and costs ~10% of the step. The result equals `jax.grad(self.losses)` exactly (tested); with
    `low_rank` the feedback kernels' gradients come as `optim.LowRank` factors of that value.
    """
    params = state.params
    if self.normalized:  # conv nets: one gradient of the plain objective
      grads, metrics = jax.grad(self.losses, has_aux=True)(params, batch)
      grads = base.loss_warmup(grads, state.step, int(self.c.loss_warmup_steps))
      return grads, metrics, state.extra
    x, y = batch['image'], batch['label']
    k = self.task.num_classes
    onehot = jax.nn.one_hot(y, k)
    scale = self.c.loss_scale
    eye = jnp.eye(k)
    if self.low_rank:  # differentiate w.r.t. the pre-activations: the errors d of each layer
      probes = jax.tree.map(
        jnp.zeros_like,
        jax.eval_shape(
          lambda: self.feedback.apply(
            {'params': params['feedback']}, eye, mutable=['perturbations']
          )[1]['perturbations']
        ),
      )
      prototypes, feedback_vjp = jax.vjp(
        lambda z: self.feedback.apply({'params': params['feedback'], 'perturbations': z}, eye),
        probes,
      )
    else:
      prototypes, feedback_vjp = jax.vjp(
        lambda p: self.feedback.apply({'params': p}, eye), params['feedback']
      )
    x, prototypes = jax.lax.optimization_barrier((x, prototypes))

    def forward_loss(p):  # pair 0 (input vs g_0) has no forward parameter: it joins phase 3
      out, hiddens = self.model.apply({'params': p}, x)
      task = base.task_loss(out, y, self.config.loss)
      terms, residuals = zip(
        *[_loss_and_residual(h, g, onehot, scale) for h, g in zip(hiddens, prototypes[1:])]
      )
      return task + sum(terms), (hiddens, out, task, list(terms), list(residuals))

    (total, (hiddens, out, task, terms, residuals)), forward_grads = jax.value_and_grad(
      forward_loss, has_aux=True
    )(params['forward'])
    hiddens, residuals, forward_grads = jax.lax.optimization_barrier(
      (hiddens, residuals, forward_grads)
    )
    acts = [x.reshape(x.shape[0], -1)] + hiddens
    first, r0 = _loss_and_residual(acts[0], prototypes[0], onehot, scale)
    # Each prototype's gradient in closed form from its pair's residual (phase 2 computed those).
    prototype_grads = [
      _prototype_grad(h, g, r, scale) for h, g, r in zip(acts, prototypes, [r0] + residuals)
    ]
    feedback_grads = feedback_vjp(prototype_grads)[0]
    if self.low_rank:  # feedback layer l+1 reads g_{l+1} (the top one the targets), emits error d
      errors, inputs = feedback_grads, list(prototypes[1:]) + [eye]
      feedback_grads = {
        f'layer_{l + 1}': {'kernel': optim.LowRank(a, errors[f'preact_{l + 1}'])}
        for l, a in enumerate(inputs)
      }
    metrics = {
      'loss': total + first,
      'task_loss': task,
      'accuracy': base.accuracy(out, y),
      **{f'layer_loss/{l}': t for l, t in enumerate([first] + terms)},
    }
    return {'forward': forward_grads, 'feedback': feedback_grads}, metrics, state.extra

  def analyze(self, state, batch):
    """SPEC §1.4: per pair l, cka/pair_l = linear CKA between the forward activations h_l of the
    batch and the feedback activations of their labels (g_l's rows picked by label; pair 0 is
    the input); per layer, weight_angle/layer_l = ∠(W_l's adjoint, V_l) in degrees (V_l: the
    feedback layer that maps back across W_l; dense: ∠(W_lᵀ, V_l), conv: W_l flipped with its
    channels swapped) and norm_ratio/layer_l = ‖V_l‖/‖W_l‖."""
    x, y = batch['image'], batch['label']
    forward, feedback = state.params['forward'], state.params['feedback']
    _, hiddens = self.model.apply({'params': forward}, x)
    prototypes = self.feedback.apply({'params': feedback}, jnp.eye(self.task.num_classes))
    acts = [x] + hiddens
    out = {
      f'cka/pair_{l}': metrics_lib.linear_cka(h, g[y])
      for l, (h, g) in enumerate(zip(acts, prototypes))
    }
    adjoints = {n: {'kernel': layers.adjoint_kernel(p['kernel'])} for n, p in forward.items()}
    out.update(metrics_lib.weight_metrics(adjoints, feedback))  # ‖adjoint(W)‖ = ‖W‖
    return out


def make(config, task, batch_axis=BatchAxis()) -> base.Rule:
  """CCL on `config.model`: the autoencoder's own objective (`counter_current_ae`) on a
  reconstruction model, the classifier's pair losses otherwise."""
  if task.kind == 'reconstruction':
    from ccl_jax.rules import counter_current_ae

    return counter_current_ae.CounterCurrentAE(config, task, batch_axis)
  return CounterCurrent(config, task, batch_axis)
