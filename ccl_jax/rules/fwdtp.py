"""FW-DTP, fixed-weight difference target propagation (Shibuya et al. 2023; SPEC §4.6; FWDTP
`--algorithm=FWDTP[-BN]`): DTP whose feedback maps g_l(u) = φ(u B_l) keep their random B_l.

B_l ~ U(±`fwdtp.init_scale`) (the reference's default 1e-3) is never trained: no feedback loss,
no feedback steps, no pre-training, no lr_b; its gradient tree is empty, so B stays bitwise
fixed. `fwdtp.batch_norm` (default on: FWDTP-BN, most likely the CCL paper's row, whose Table 2
names it and whose App. 6.1 gives it no backward lr) normalises every hidden f_l, every g_l and
every propagated target, τ_{l−1} = N(g_l(τ_l) + h_{l−1} − g_l(h_l)), N without affine
parameters and with batch statistics at test time too (`target_prop.normalize`); the output
layer stays linear (the reference's default `forward_last_activation`).
"""

from __future__ import annotations

from ccl_jax import config as config_lib
from ccl_jax.config import Setting
from ccl_jax.rules import target_prop

SETTINGS = {
  'beta': target_prop.SETTINGS['beta'],
  'batch_norm': Setting(True, 'FWDTP-BN: batch-normalise f_l, g_l and the targets'),
  'init_scale': config_lib.positive('B_l ~ U(±init_scale), fixed', 1e-3),
}
check = target_prop.check_net


def make(config, task, batch_axis):
  return target_prop.TargetProp(
    config, task, batch_axis, config.fwdtp, None, batch_norm=bool(config.fwdtp.batch_norm)
  )
