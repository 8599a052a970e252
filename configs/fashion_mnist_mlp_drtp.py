"""CCL paper Table 1: DRTP on Fashion-MNIST, the tanh MLP 784-256×5-10."""

from ccl_jax import config as config_lib


def get_config():
  c = config_lib.base()
  c.rule = 'drtp'
  c.dataset = 'fashion_mnist'
  c.model = 'mlp'
  c.mlp.hidden = (256, 256, 256, 256, 256)
  c.mlp.activation = 'tanh'
  c.mlp.use_bias = True
  c.batch_size = 256
  c.num_epochs = 100
  c.drtp.mean = 0.0
  c.drtp.std = 0.3
  c.optimizer.forward.update(
    name='sgd', lr=0.3, momentum=0.0, weight_decay=0.0, clip=1.0, schedule='constant'
  )
  return c
