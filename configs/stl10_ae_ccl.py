"""CCL paper §4.3, Fig. 5 (STL-10 AE; test MSE BP 0.0059, CCL 0.0086): CCL on the strided AE."""

from ccl_jax import config as config_lib


def get_config():
  c = config_lib.base()
  c.rule = 'ccl'
  c.dataset = 'stl10'
  c.model = 'ae'
  c.ae.widths = (128, 256, 1024, 2048)  # 96 → 48 → 24 → 12 → 6
  c.batch_size = 32
  c.num_epochs = 50
  c.data.normalize = 'unit'  # pixel MSE on [0, 1]
  c.data.crop_pad = 4  # RandomCrop(96, padding=4) with black padding, as the reference
  c.data.flip = True
  c.data.pad_mode = 'zero'
  c.ccl.loss_scale = 1.0
  c.ccl.loss_warmup_steps = 100
  c.optimizer.forward.update(
    name='sgd',
    lr=0.01,
    momentum=0.9,
    weight_decay=1e-4,
    clip=0.2,
    schedule='cosine',
    min_lr=0.001,
    grad_centralization=True,
  )
  c.optimizer.feedback = c.optimizer.forward.copy_and_resolve_references()
  c.eval_batch_size = 500
  return c
