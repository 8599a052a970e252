"""CCL paper Table 1: DRL on CIFAR-100, the tanh MLP 3072-1024×3-100."""

from ccl_jax import config as config_lib


def get_config():
  c = config_lib.base()
  c.rule = 'drl'
  c.dataset = 'cifar100'
  c.model = 'mlp'
  c.mlp.hidden = (1024, 1024, 1024)
  c.mlp.activation = 'tanh'
  c.mlp.use_bias = False
  c.mlp.init = 'orthogonal'
  c.batch_size = 256
  c.num_epochs = 100
  c.tp.beta = 0.1
  c.tp.noise = 0.01
  c.tp.feedback_steps = 5
  c.tp.pretrain_steps = 20
  c.tp.init_scale = 0.01
  c.tp.scale_by_noise = True
  c.optimizer.forward.update(
    name='sgd', lr=1.0, momentum=0.0, weight_decay=0.0, clip=0.0, schedule='constant'
  )
  c.optimizer.feedback.update(
    name='sgd', lr=0.01, momentum=0.0, weight_decay=0.0, clip=0.0, schedule='constant'
  )
  return c
