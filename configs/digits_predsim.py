"""predsim on the embedded digits (a seconds-long smoke run of the local-loss rules)."""

from ccl_jax import config as config_lib


def get_config():
  c = config_lib.base()
  c.rule = 'predsim'
  c.dataset = 'digits'
  c.model = 'mlp'
  c.mlp.hidden = (256, 256, 256)
  c.mlp.activation = 'leaky_relu'
  c.batch_size = 32
  c.num_epochs = 10
  c.local.dropout = 0.1
  c.optimizer.forward.update(
    name='adam',
    lr=0.001,
    b1=0.9,
    b2=0.999,
    weight_decay=0.0,
    clip=0.0,
    schedule='step',
    milestones=(0.5, 0.75, 0.89, 0.94),
    decay_factor=0.25,
  )
  return c
