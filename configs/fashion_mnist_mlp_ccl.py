"""CCL on fashion_mnist: the CCL paper's ELU MLP (SPEC §1.1)."""

from ccl_jax import config as config_lib


def get_config():
  return config_lib.reference_mlp('fashion_mnist', 'ccl')
