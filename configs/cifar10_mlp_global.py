"""Global BP on the local-loss MLP 3072-3×3000-10 (BN, ReLU) on CIFAR-10 (SPEC §3)."""

from ccl_jax import config as config_lib


def get_config():
  c = config_lib.local_losses('cifar10', 'global', 'mlp')
  return c
