"""Akrout et al. 2019 reference run (sigmoid MLP): Kolen-Pollack on CIFAR-10."""

from ccl_jax import config as config_lib


def get_config():
  c = config_lib.base()
  c.rule = 'kp'
  c.dataset = 'cifar10'
  c.model = 'mlp'
  c.mlp.hidden = (1000,)
  c.mlp.activation = 'sigmoid'
  c.mlp.output_activation = 'sigmoid'
  c.mlp.init = 'glorot_normal'
  c.loss = 'bce'
  c.batch_size = 128
  c.num_epochs = 400
  c.data.normalize = 'unit'
  c.data.shuffle = False
  c.optimizer.forward.update(
    name='sgd', lr=0.3, momentum=0.0, weight_decay=0.0, clip=0.0, schedule='constant'
  )
  return c
