"""Kolen-Pollack on conv layers: a narrow cnn_pool body (8-16-16-32-32 channels) on mnist, 2 epochs."""

from ccl_jax import config as config_lib


def get_config():
  return config_lib.small_cnn('mnist', 'kp')
