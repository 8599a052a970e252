"""predsim on VGG8b, CIFAR-10 (SPEC §3)."""

from ccl_jax import config as config_lib


def get_config():
  c = config_lib.local_losses('cifar10', 'predsim', 'vgg8b')
  return c
