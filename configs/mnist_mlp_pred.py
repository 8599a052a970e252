"""pred: Nøkland & Eidnes' local classifier losses on the MNIST MLP 3×1024 (SPEC §3)."""

from ccl_jax import config as config_lib


def get_config():
  c = config_lib.local_losses('mnist', 'pred', 'mlp')
  return c
