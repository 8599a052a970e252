"""Target propagation (SPEC §4.0, §4.3–4.7): what DTP, DRL, L-DRL and FW-DTP share.

The forward net is the reference's (FWDTP, `code/models/tp_net.py`): no biases, W_l drawn by
`mlp.init` (the configs: orthogonal), h_0 = x, h_l = f_l(h_{l−1}) = φ(h_{l−1} W_l) for l < L and
the logits h_L = h_{L−1} W_L. Layer l ≥ 2 has a feedback map g_l(u) = φ(u V_l) back to h_{l−1}
(V_l: n_l × n_{l−1}, `params['feedback']['layer_l']`; g_1 is never needed). Each step:

1. K feedback steps (`tp.feedback_steps`) on this batch, each through the feedback tree's optax
   transformation (`Rule.before_update`, a `lax.fori_loop` inside the compiled update): the rule's
   feedback loss, a sum of one term per layer l = 2..L whose gradient reaches V_l only (every
   other V is stop_gradient'd in that term), with fresh noise each step.
2. Targets with the difference correction, under stop_gradient:
   τ_L = h_L − β·∂ℓ/∂h_L (ℓ the per-example task loss: softmax(h_L) − y* for CE) and
   τ_{l−1} = g_l(τ_l) + h_{l−1} − g_l(h_l).
3. One forward step: Σ_l mean_batch ‖τ_l − f_l(sg(h_{l−1}))‖², one `jax.grad` for every W_l
   (for the linear output layer 2β × BP's gradient).

Loss scaling: FWDTP sums every loss over the batch and steps W ← W − (lr/B)·∇; here every loss is
a batch mean with the same lr, which is the same step, so lr, lr_b (`optimizer.feedback.lr`) and β
are the reference's numbers. `tp.scale_by_noise` divides the feedback loss by σ² (MEUL's form):
DRL's and L-DRL's losses are O(σ²), so unscaled, at σ = 0.01 and the grid's lr_b ≤ 1e-2, their V
barely move (their configs turn it on). Feedback pre-training: FWDTP first trains only V for K
epochs (one feedback step per batch); here the first `tp.pretrain_steps` steps of the run
(counted in `num_epochs`) take their K feedback steps and no forward step, so a one-epoch run
still learns (a deviation: FWDTP's pre-training epochs come on top of its epochs). Why the K
steps are in `before_update`: each goes through the feedback optimizer (its state kept, its
gradients averaged over devices) and the targets use V after all K, FWDTP's order; the feedback
optimizer counts K steps per training step, so its lr must be constant (`check`). The
batch-normalised variant
(`Net.batch_norm`, FWDTP-BN) normalises f_l's and g_l's outputs and every propagated target with
N(z) = (z − mean)/(std + 1e-12) over the global batch (unbiased std, no affine parameters), at
test time over the evaluated batch, as the reference. Noise is drawn per example, keyed by the
example's place in the global batch, so every parallel mode draws the same.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from ccl_jax import config as config_lib
from ccl_jax import metrics as metrics_lib
from ccl_jax.config import Setting
from ccl_jax.errors import UserError
from ccl_jax.models import mlp
from ccl_jax.parallel import BatchAxis
from ccl_jax.rules import base

sg = jax.lax.stop_gradient

SECTION = 'tp'  # DTP, DRL and L-DRL share it; FW-DTP has its own (`rules/fwdtp.py`)
SETTINGS = {
  'beta': config_lib.non_negative('β: output target τ_L = h_L − β·∂ℓ/∂h_L, ℓ per example', 0.01),
  'noise': config_lib.positive("σ of the feedback losses' Gaussian noise", 0.01),
  'feedback_steps': config_lib.positive(
    'K: feedback steps on each batch before its forward step', 5
  ),
  'pretrain_steps': config_lib.non_negative(
    'the first N steps train only V (K feedback steps each; counted in num_epochs)', 0
  ),
  'init_scale': config_lib.positive('V_l ~ U(±init_scale)', 0.01),
  'scale_by_noise': Setting(
    False, "divide the feedback losses by σ² (MEUL's form); False: FWDTP's, unscaled"
  ),
}


def check_net(config) -> None:
  """The TP net is a bias-free MLP with linear logits, trained by cross-entropy."""
  if config.model != 'mlp':
    raise UserError(f"rule '{config.rule}' runs on model 'mlp', not '{config.model}'")
  if config.mlp.use_bias or config.mlp.output_activation != 'none':
    raise UserError(
      f"rule '{config.rule}' builds its MLP without biases and with linear logits: set "
      "config.mlp.use_bias=False and config.mlp.output_activation='none'"
    )
  if config.loss != 'ce':
    raise UserError(f"rule '{config.rule}' needs config.loss='ce', not '{config.loss}'")


def check(config) -> None:
  """`check_net`, and a constant feedback lr (the feedback tree steps K times per step)."""
  check_net(config)
  fb = config.optimizer.feedback
  if fb.schedule != 'constant' or fb.warmup_steps:
    raise UserError(
      f"rule '{config.rule}' takes K feedback steps per training step, so a feedback lr "
      "schedule would run K times too fast: set config.optimizer.feedback.schedule='constant' "
      'and warmup_steps=0'
    )


def normalize(z: jax.Array, axis: BatchAxis) -> jax.Array:
  """FWDTP's batch normalisation N(z) = (z − mean)/(std + 1e-12), statistics of the global batch
  (unbiased std), no affine parameters."""
  rows = axis.rows(z)
  return (z - rows.mean(0)) / (jnp.std(rows, axis=0, ddof=1) + 1e-12)


@dataclasses.dataclass(frozen=True)
class Net:
  """The forward maps f_l, feedback maps g_l and the difference correction of an L-layer TP net.

  Kernels are read from {'layer_l': {'kernel': ...}} trees: W_l (n_{l−1}, n_l), V_l (n_l, n_{l−1}).
  `axis` is the batch the normalisation and the noise see (the data-parallel axis in training).
  """

  num_layers: int
  act: Callable[[jax.Array], jax.Array]
  batch_norm: bool = False
  axis: BatchAxis = BatchAxis()

  def _n(self, z: jax.Array) -> jax.Array:
    return normalize(z, self.axis) if self.batch_norm else z

  def f(self, l: int, forward: dict, h: jax.Array) -> jax.Array:
    """f_l(h): φ(h W_l) (N'd in the BN variant) for a hidden layer, h W_L for the output."""
    z = h @ forward[f'layer_{l}']['kernel']
    return z if l == self.num_layers else self._n(self.act(z))

  def g(self, l: int, feedback: dict, u: jax.Array) -> jax.Array:
    """g_l(u) = φ(u V_l) (N'd in the BN variant): layer l's output back to h_{l−1}'s space."""
    return self._n(self.act(u @ feedback[f'layer_{l}']['kernel']))

  def difference(
    self, l: int, feedback: dict, target: jax.Array, h: list[jax.Array], cut: bool = True
  ) -> jax.Array:
    """τ_{l−1} = g_l(τ_l) + h_{l−1} − g_l(h_l) (N'd in the BN variant); `cut`: no gradient
    through the correction term g_l(h_l) (FWDTP's `difference_function`)."""
    correction = self.g(l, feedback, h[l])
    return self._n(self.g(l, feedback, target) + h[l - 1] - (sg(correction) if cut else correction))

  def forward(self, forward: dict, x: jax.Array) -> list[jax.Array]:
    """[h_0 = x flattened, h_1, ..., h_L = logits]."""
    hs = [x.reshape(x.shape[0], -1)]
    for l in range(1, self.num_layers + 1):
      hs.append(self.f(l, forward, hs[-1]))
    return hs

  def noise(self, rng: jax.Array, like: jax.Array, std: float) -> jax.Array:
    """N(0, std²) noise shaped like `like`, each row keyed by its place in the global batch."""
    start = self.axis.index() * like.shape[0]
    rows = start + jnp.arange(like.shape[0])
    draw = lambda i: jax.random.normal(jax.random.fold_in(rng, i), like.shape[1:], like.dtype)
    return std * jax.vmap(draw)(rows)


def sq(x: jax.Array) -> jax.Array:
  """mean over the batch of the per-example squared norm."""
  return jnp.mean(jnp.sum(x * x, axis=-1))


# One layer's feedback loss: (net, l, forward, feedback with only V_l live, activations h,
# noise key, σ) -> scalar. Each rule module defines its own.
FeedbackLoss = Callable[[Net, int, dict, dict, list, jax.Array, float], jax.Array]


def targets(net: Net, feedback: dict, h: list[jax.Array], beta: float, labels, loss: str):
  """[τ_1, ..., τ_L] (index 0 unused) by difference target propagation, no gradient."""
  h = [sg(x) for x in h]
  per_example = jax.grad(lambda o: base.task_loss(o, labels, loss))(h[-1]) * h[-1].shape[0]
  taus = [None] * (net.num_layers + 1)
  taus[-1] = h[-1] - beta * per_example
  for l in range(net.num_layers, 1, -1):
    taus[l - 1] = net.difference(l, feedback, taus[l], h)
  return [sg(t) if t is not None else None for t in taus]


def uniform_feedback(rng: jax.Array, widths: list[int], scale: float) -> dict:
  """{'layer_l': {'kernel': V_l ~ U(±scale), (n_l, n_{l−1})}} for l = 2..L."""
  return {
    f'layer_{l}': {
      'kernel': jax.random.uniform(
        jax.random.fold_in(rng, l), (widths[l], widths[l - 1]), minval=-scale, maxval=scale
      )
    }
    for l in range(2, len(widths))
  }


class TargetProp(base.Rule):
  """A difference-target-propagation net whose feedback V is trained by `feedback_loss` (None:
  V is fixed, FW-DTP) with the settings `settings` (β, and for trained V: σ, K, pre-training)."""

  def __init__(
    self,
    config,
    task,
    batch_axis,
    settings,
    feedback_loss: FeedbackLoss | None,
    batch_norm: bool = False,
  ):
    super().__init__(config, task, batch_axis)
    self.settings = settings
    self.feedback_loss = feedback_loss
    self.widths = [math.prod(task.image_shape), *config.mlp.hidden, task.num_classes]
    act = mlp.ACTIVATIONS[config.mlp.activation]
    self.net = Net(len(self.widths) - 1, act, batch_norm, batch_axis)
    self.eval_net = dataclasses.replace(self.net, axis=BatchAxis())  # one device, whole batch

  # -- parameters and prediction -------------------------------------------------------------
  def init_params(self, rng, images):
    init = mlp.kernel_init(self.config.mlp.init)
    forward = {
      f'layer_{l}': {'kernel': init(jax.random.fold_in(rng, l), self.widths[l - 1 : l + 1])}
      for l in range(1, len(self.widths))
    }
    scale = float(self.settings.init_scale)
    feedback = uniform_feedback(jax.random.fold_in(rng, 0), self.widths, scale)
    return {'forward': forward, 'feedback': feedback}, {}

  def predict(self, params, images, extra=None):
    return self.eval_net.forward(params['forward'], images)[-1]

  # -- the feedback steps --------------------------------------------------------------------
  def feedback_objective(self, net, feedback, forward, h, rng):
    """Σ_l the rule's loss of layer l, each with only V_l live (over σ² if `scale_by_noise`)."""
    sigma = float(self.settings.noise)
    total = jnp.zeros((), jnp.float32)
    for l in range(2, net.num_layers + 1):
      name = f'layer_{l}'
      only = {k: (v if k == name else sg(v)) for k, v in feedback.items()}
      total = total + self.feedback_loss(
        net, l, forward, only, h, jax.random.fold_in(rng, l), sigma
      )
    return total / sigma**2 if self.settings.scale_by_noise else total

  def before_update(self, state, batch, rng, step_tree):
    """K feedback steps on this batch, each through the feedback optimizer (W fixed meanwhile)."""
    if self.feedback_loss is None:
      return state, {}
    h = [sg(x) for x in self.net.forward(state.params['forward'], batch['image'])]
    rng = jax.random.fold_in(rng, 1)

    def body(i, carry):
      state, _ = carry
      loss, grads = jax.value_and_grad(self.feedback_objective, argnums=1)(
        self.net, state.params['feedback'], state.params['forward'], h, jax.random.fold_in(rng, i)
      )
      return step_tree(state, 'feedback', grads), loss

    state, loss = jax.lax.fori_loop(
      0, int(self.settings.feedback_steps), body, (state, jnp.zeros((), jnp.float32))
    )
    return state, {'feedback_loss': loss}

  # -- the forward step ----------------------------------------------------------------------
  def layer_losses(self, net, forward, taus, h):
    """Σ_l mean_batch ‖τ_l − f_l(sg(h_{l−1}))‖²: its gradient is every layer's TP update."""
    return sum(sq(taus[l] - net.f(l, forward, sg(h[l - 1]))) for l in range(1, net.num_layers + 1))

  def forward_gradients(self, net, params, batch):
    h = net.forward(params['forward'], batch['image'])
    taus = targets(
      net, params['feedback'], h, float(self.settings.beta), batch['label'], self.config.loss
    )
    loss, grads = jax.value_and_grad(self.layer_losses, argnums=1)(net, params['forward'], taus, h)
    return grads, loss, h[-1]

  def gradients(self, state, batch, rng):
    grads, layer_loss, out = self.forward_gradients(self.net, state.params, batch)
    metrics = {
      'loss': base.task_loss(out, batch['label'], self.config.loss),
      'accuracy': base.accuracy(out, batch['label']),
      'layer_loss': layer_loss,
    }
    return {'forward': grads, 'feedback': {}}, metrics, state.extra

  def steps_tree(self, state, tree):
    """Pre-training: the first `pretrain_steps` updates step the feedback weights only (the
    forward weights and their optimizer state, schedule count included, wait)."""
    pretrain = int(self.settings.get('pretrain_steps', 0)) if self.feedback_loss else 0
    return state.step >= pretrain if pretrain and tree == 'forward' else None

  # -- alignment metrics ---------------------------------------------------------------------
  def analyze(self, state, batch):
    """update_angle/layer_l: ∠(TP's update, BP's) on the batch; weight_angle/layer_l: ∠(W_l,
    V_lᵀ); and, for a trained V, recon_error/layer_l = mean ‖g_l(f_l(h_{l−1})) − h_{l−1}‖²."""
    net, params = self.eval_net, state.params
    ours = self.forward_gradients(net, params, batch)[0]
    bp = jax.grad(
      lambda f: base.task_loss(net.forward(f, batch['image'])[-1], batch['label'], self.config.loss)
    )(params['forward'])
    out = metrics_lib.update_angles(ours, bp)
    h = net.forward(params['forward'], batch['image'])
    for l in range(2, net.num_layers + 1):
      w, v = params['forward'][f'layer_{l}']['kernel'], params['feedback'][f'layer_{l}']['kernel']
      out[f'weight_angle/layer_{l}'] = metrics_lib.angle_degrees(w, v.T)
      if self.feedback_loss is not None:
        out[f'recon_error/layer_{l}'] = sq(net.g(l, params['feedback'], h[l]) - h[l - 1])
    return out
