"""CCL paper Table 1: CCL on MNIST, the ELU MLP."""

from ccl_jax import config as config_lib


def get_config():
  c = config_lib.base()
  c.rule = 'ccl'
  c.dataset = 'mnist'
  c.model = 'mlp'
  c.mlp.hidden = (256, 256, 256, 256, 256)
  c.mlp.activation = 'elu'
  c.batch_size = 256
  c.num_epochs = 100
  c.ccl.loss_scale = 0.5
  c.optimizer.forward.update(
    name='sgd', lr=1.0, momentum=0.0, weight_decay=0.0, clip=1.0, schedule='constant'
  )
  c.optimizer.feedback = c.optimizer.forward.copy_and_resolve_references()
  return c
