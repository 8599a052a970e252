"""Sign symmetry on cifar10: the weight-transport paper's sigmoid MLP and settings (SPEC §2)."""

from ccl_jax import config as config_lib


def get_config():
  return config_lib.reference_sigmoid_mlp('cifar10', 'sign_symmetry')
