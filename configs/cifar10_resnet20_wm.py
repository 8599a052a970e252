"""CIFAR-10 ResNet-20 (He et al. 2016's recipe), trained by weight mirrors (Akrout et al. 2019)."""

from ccl_jax import config as config_lib


def get_config():
  c = config_lib.base()
  c.rule = 'wm'
  c.wm.keep_norm = True  # B keeps its norm: summed conv mirror steps would grow it each step
  c.dataset = 'cifar10'
  c.model = 'resnet20'
  c.resnet.width_mult = 1.0
  c.batch_size = 128
  c.num_epochs = 164  # 64k iterations of batch 128
  c.data.crop_pad = 4
  c.data.flip = True
  c.optimizer.forward.update(
    name='sgd',
    lr=0.1,
    momentum=0.9,
    weight_decay=0.0001,
    clip=0.0,
    schedule='step',
    milestones=(0.5, 0.75),
    decay_factor=0.1,
  )
  c.steps_per_call = 8
  c.scan_unroll = 0  # XLA:CPU runs convs faster inlined than in a loop
  return c
