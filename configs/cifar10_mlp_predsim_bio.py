"""predsim-bio on the CIFAR-10 MLP 3×3000: fixed random label codes, FA pred heads, β 0.01 (SPEC §3)."""

from ccl_jax import config as config_lib


def get_config():
  c = config_lib.local_losses('cifar10', 'predsim', 'mlp', bio=True)
  return c
