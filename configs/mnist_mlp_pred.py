"""Nøkland & Eidnes 2019, test-error tables: pred on MNIST, MLP."""

from ccl_jax import config as config_lib


def get_config():
  c = config_lib.base()
  c.rule = 'pred'
  c.dataset = 'mnist'
  c.model = 'mlp'
  c.mlp.hidden = (1024, 1024, 1024)
  c.mlp.activation = 'relu'
  c.batch_size = 128
  c.num_epochs = 100
  c.data.crop_pad = 2
  c.local.dropout = 0.1
  c.local.dim_in_decoder = 1024
  c.optimizer.forward.update(
    name='adam',
    lr=0.0005,
    b1=0.9,
    b2=0.999,
    weight_decay=0.0,
    clip=0.0,
    schedule='step',
    milestones=(0.5, 0.75, 0.89, 0.94),
    decay_factor=0.25,
  )
  return c
