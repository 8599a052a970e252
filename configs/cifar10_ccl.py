"""CCL on CIFAR-10: the paper's cnn_pool conv net (SPEC §1.2); the MLP is cifar10_mlp_ccl.py."""

from ccl_jax import config as config_lib


def get_config():
  return config_lib.reference_cnn('cifar10', 'ccl')
