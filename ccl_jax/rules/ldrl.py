"""L-DRL, the local difference reconstruction loss (Ernoult et al. 2022; SPEC §4.5; FWDTP
`--loss_feedback=L-DRL`): g_l learns from layer l alone.

    ε ~ N(0, σ²) on h = h_{l−1},  η ~ N(0, σ²) on y = h_l = f_l(h)
    loss_l = mean_batch [ −ε · (g_l(f_l(h + ε)) − g_l(y)) + ½ ‖g_l(y + η) − g_l(y)‖² ]

differentiated through every g_l term, as ERN (`target_prop/feedback_loss.py`, whose loss is
twice this). FWDTP's difference function cuts the g_l(y) terms: the same expected gradient, but
its estimate then carries zero-mean terms of size ‖y‖/σ (−ε yᵀ, η yᵀ for linear g) that swamp
the signal; with them cut V did not align on MNIST. For linear f(u) = uW, g(u) = uQ the expected
loss is σ²(−tr(QW) + ½‖Q‖²_F), minimised at Q = Wᵀ: the difference targets become BP's. The
configs divide it by σ² (`tp.scale_by_noise`): the expected gradient is then Q − Wᵀ whatever σ.
Everything else is `target_prop`'s.
"""

from __future__ import annotations

import jax

from ccl_jax.rules import target_prop

SECTION = target_prop.SECTION
SETTINGS = target_prop.SETTINGS
check = target_prop.check


def feedback_loss(net, l, forward, feedback, h, rng, sigma):
  x, y = h[l - 1], h[l]
  eps = net.noise(jax.random.fold_in(rng, 0), x, sigma)
  eta = net.noise(jax.random.fold_in(rng, 1), y, sigma)
  rec = net.difference(l, feedback, net.f(l, forward, x + eps), h, cut=False) - x
  rec_y = net.difference(l, feedback, y + eta, h, cut=False) - x
  return -(eps * rec).sum(-1).mean() + 0.5 * target_prop.sq(rec_y)


def make(config, task, batch_axis):
  return target_prop.TargetProp(config, task, batch_axis, config.tp, feedback_loss)
