"""CCL on the CIFAR-10 cnn_pool conv net (SPEC §1.2); the same as cifar10_ccl.py."""

from ccl_jax import config as config_lib


def get_config():
  return config_lib.reference_cnn('cifar10', 'ccl')
