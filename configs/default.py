"""Default: CCL on the embedded sklearn digits (8×8), an ELU MLP 64-256-256-10; about 20 s on 2 CPUs."""

from ccl_jax import config as config_lib


def get_config():
  c = config_lib.base()
  c.dataset = 'digits'
  c.hidden = (256, 256)
  c.batch_size = 64
  c.num_epochs = 20
  return c
