"""CCL on CIFAR-10: the paper's 3072-1024×3-10 ELU MLP (SPEC §1.1); the CNN follows in a later issue."""

from ccl_jax import config as config_lib


def get_config():
  return config_lib.reference_mlp('cifar10', 'ccl')
