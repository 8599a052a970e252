"""CCL paper §4.3, Fig. 5's autoencoder on CIFAR-10 32×32 (3 stride levels, CPU-sized): BP."""

from ccl_jax import config as config_lib


def get_config():
  c = config_lib.base()
  c.rule = 'bp'
  c.dataset = 'cifar10'
  c.model = 'ae'
  # One stride level fewer than STL-10's (32 → 16 → 8 → 4) and a quarter of its widths, so an
  # epoch runs on 2 CPU cores (~0.3 s per step of 32); the paper's widths: (128, 256, 1024).
  c.ae.widths = (32, 64, 256)
  c.batch_size = 32
  c.num_epochs = 20
  c.data.val_fraction = 0.02  # 1000 validation images: evaluation stays short on a CPU
  c.data.normalize = 'unit'  # pixel MSE on [0, 1]
  c.data.crop_pad = 4  # RandomCrop(32, padding=4) with black padding, as the reference
  c.data.flip = True
  c.data.pad_mode = 'zero'
  c.optimizer.forward.update(
    name='sgd',
    lr=0.01,
    momentum=0.9,
    weight_decay=1e-4,
    clip=0.2,
    schedule='cosine',
    min_lr=0.001,
    grad_centralization=True,
    warmup_steps=100,  # the reference warms the loss up; BP warms the learning rate
  )
  c.eval_batch_size = 1000
  c.steps_per_call = 8
  c.scan_unroll = 0
  return c
