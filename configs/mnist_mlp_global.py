"""Global BP on the local-loss MLP 784-3×1024-10 (BN, ReLU) on MNIST (SPEC §3)."""

from ccl_jax import config as config_lib


def get_config():
  c = config_lib.local_losses('mnist', 'global', 'mlp')
  return c
