"""DTP, difference target propagation (Lee et al. 2015; SPEC §4.3; FWDTP `--algorithm=DTP
--loss_feedback=DTP`): each g_l learns to invert f_l around the batch's activations.

    q = h_{l−1} + ε, ε ~ N(0, σ²):   loss_l = mean_batch ‖g_l(f_l(q)) − q‖²   (gradient: V_l)

The targets, the forward step, the K feedback steps per batch and the pre-training steps are
`target_prop`'s (section `tp`). Unlike Lee's original, the penultimate layer gets a difference
target too, as in FWDTP.
"""

from __future__ import annotations

from ccl_jax.rules import target_prop

SECTION = target_prop.SECTION
SETTINGS = target_prop.SETTINGS
check = target_prop.check


def feedback_loss(net, l, forward, feedback, h, rng, sigma):
  q = h[l - 1] + net.noise(rng, h[l - 1], sigma)
  return target_prop.sq(net.g(l, feedback, net.f(l, forward, q)) - q)


def make(config, task, batch_axis):
  return target_prop.TargetProp(config, task, batch_axis, config.tp, feedback_loss)
