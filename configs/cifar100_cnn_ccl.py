"""CCL paper Table 3: CCL on CIFAR-100, the 5-layer cnn_pool conv net."""

from ccl_jax import config as config_lib


def get_config():
  c = config_lib.base()
  c.rule = 'ccl'
  c.dataset = 'cifar100'
  c.model = 'cnn'
  c.cnn.channels = (128, 128, 256, 256, 512)
  c.cnn.activation = 'elu'
  c.batch_size = 128
  c.num_epochs = 100
  c.data.normalize = 'imagenet'
  c.data.crop_pad = 4
  c.data.flip = True
  c.data.pad_mode = 'edge'
  c.ccl.loss_scale = 1.0
  c.ccl.loss_warmup_steps = 100
  c.optimizer.forward.update(
    name='sgd',
    lr=1.0,
    momentum=0.5,
    weight_decay=1e-06,
    clip=1.0,
    schedule='cosine',
    min_lr=0.001,
    grad_centralization=True,
  )
  c.optimizer.feedback = c.optimizer.forward.copy_and_resolve_references()
  c.steps_per_call = 8
  c.scan_unroll = 0
  return c
