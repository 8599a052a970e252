"""Nøkland & Eidnes 2019, test-error tables: predsim on CIFAR-10, MLP."""

from ccl_jax import config as config_lib


def get_config():
  c = config_lib.base()
  c.rule = 'predsim'
  c.dataset = 'cifar10'
  c.model = 'mlp'
  c.mlp.hidden = (3000, 3000, 3000)
  c.mlp.activation = 'leaky_relu'
  c.batch_size = 128
  c.num_epochs = 400
  c.data.crop_pad = 4
  c.data.flip = True
  c.local.dropout = 0.1
  c.optimizer.forward.update(
    name='adam',
    lr=0.0005,
    b1=0.9,
    b2=0.999,
    weight_decay=0.0,
    clip=0.0,
    schedule='step',
    milestones=(0.5, 0.75, 0.875, 0.9375),
    decay_factor=0.25,
  )
  return c
