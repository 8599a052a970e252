"""Kolen-Pollack conv layers on MNIST: a narrow cnn_pool (quick conv check; no paper table)."""

from ccl_jax import config as config_lib


def get_config():
  c = config_lib.base()
  c.rule = 'kp'
  c.dataset = 'mnist'
  c.model = 'cnn'
  c.cnn.channels = (8, 16, 16, 32, 32)
  c.cnn.activation = 'elu'
  c.batch_size = 128
  c.num_epochs = 2
  c.optimizer.forward.update(
    name='sgd', lr=0.02, momentum=0.9, weight_decay=0.0, clip=1.0, schedule='constant'
  )
  c.steps_per_call = 8
  c.scan_unroll = 0
  return c
