"""predsim on the CIFAR-10 MLP 3×3000 (SPEC §3)."""

from ccl_jax import config as config_lib


def get_config():
  c = config_lib.local_losses('cifar10', 'predsim', 'mlp')
  return c
