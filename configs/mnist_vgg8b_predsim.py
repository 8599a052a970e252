"""predsim on VGG8b, MNIST (SPEC §3)."""

from ccl_jax import config as config_lib


def get_config():
  c = config_lib.local_losses('mnist', 'predsim', 'vgg8b')
  return c
