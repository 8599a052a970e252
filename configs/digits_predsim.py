"""predsim on the embedded digits: MLP 64-3×256-10, batch 32, Adam 1e-3, 10 epochs; seconds on a CPU."""

from ccl_jax import config as config_lib


def get_config():
  c = config_lib.local_losses('digits', 'predsim', 'mlp')
  c.batch_size = 32
  c.num_epochs = 10
  c.optimizer.forward.lr = 1e-3
  return c
