"""CCL on the CIFAR-100 cnn_pool conv net (SPEC §1.2)."""

from ccl_jax import config as config_lib


def get_config():
  return config_lib.reference_cnn('cifar100', 'ccl')
