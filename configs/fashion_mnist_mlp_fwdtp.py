"""CCL paper Table 1: FWDTP-BN on Fashion-MNIST, the tanh MLP 784-256×5-10."""

from ccl_jax import config as config_lib


def get_config():
  c = config_lib.base()
  c.rule = 'fwdtp'
  c.dataset = 'fashion_mnist'
  c.model = 'mlp'
  c.mlp.hidden = (256, 256, 256, 256, 256)
  c.mlp.activation = 'tanh'
  c.mlp.use_bias = False
  c.mlp.init = 'orthogonal'
  c.batch_size = 256
  c.num_epochs = 100
  c.fwdtp.beta = 0.01
  c.fwdtp.batch_norm = True
  c.fwdtp.init_scale = 0.001
  c.optimizer.forward.update(
    name='sgd', lr=1.0, momentum=0.0, weight_decay=0.0, clip=0.0, schedule='constant'
  )
  return c
