"""DRL, the difference reconstruction loss (Meulemans et al. 2020; SPEC §4.4): g_l learns so that
a perturbation of h_{l−1}, run forward to the output and propagated back by the difference rule,
comes back to where it started.

    h̃ = h_{l−1} + ε,  r_L = f_L∘…∘f_l(h̃),  r_{k−1} = g_k(r_k) + h_{k−1} − g_k(h_k)  (k = L..l)
    loss_l = mean_batch ‖r_{l−1} − h̃‖²   (gradient: V_l only, through both g_l terms)

This is MEUL's form (`lib/dtpdrl_layers.py`): the reconstruction is compared with the *noisy*
input h̃. FWDTP's `--loss_feedback=DRL` compares it with the clean h_{l−1} (an apparent bug: that
loss is minimised by collapsing g_l) and is not reproduced. MEUL's 1/σ² factor is
`tp.scale_by_noise` (on in the configs: unscaled, the O(σ²) loss barely moves V at the grid's
lr_b); MEUL's feedback weight decay is left out, as in FWDTP. The loss of layer l runs the net
from l to L and back, O(L²) per feedback step. Everything else is `target_prop`'s.
"""

from __future__ import annotations

from ccl_jax.rules import target_prop

SECTION = target_prop.SECTION
SETTINGS = target_prop.SETTINGS
check = target_prop.check


def feedback_loss(net, l, forward, feedback, h, rng, sigma):
  noisy = h[l - 1] + net.noise(rng, h[l - 1], sigma)
  r = noisy
  for k in range(l, net.num_layers + 1):
    r = net.f(k, forward, r)
  for k in range(net.num_layers, l, -1):  # the layers above: V_k is stop_gradient'd here
    r = net.difference(k, feedback, r, h)
  return target_prop.sq(net.difference(l, feedback, r, h, cut=False) - noisy)


def make(config, task, batch_axis):
  return target_prop.TargetProp(config, task, batch_axis, config.tp, feedback_loss)
