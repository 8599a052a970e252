"""Global BP on VGG8b (BN, ReLU) on CIFAR-10: the local-loss paper's baseline (SPEC §3)."""

from ccl_jax import config as config_lib


def get_config():
  c = config_lib.local_losses('cifar10', 'global', 'vgg8b')
  return c
