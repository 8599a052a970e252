"""ImageNet ResNet-50, BP (Akrout et al. 2019; the PyTorch ImageNet recipe)."""

# The recipe (Akrout et al. 2019 trained torchvision ResNets with the PyTorch ImageNet example):
# SGD, momentum 0.9, lr 0.1 for batch 256, ×0.1 every 30 of 90 epochs, weight decay 1e-4 on
# every parameter, random-resized crop 224 + flip; test: the centre 224 crop of the image
# resized to 256. Assumptions where the paper is silent are marked below.

from ccl_jax import config as config_lib


def get_config():
  c = config_lib.base()
  c.rule = 'bp'
  c.dataset = 'imagenet2012'
  c.model = 'resnet50'
  c.pipeline = 'stream'
  c.parallel = 'shard_map'  # every local device (and host), data-parallel; BN over the batch
  c.compute_dtype = 'bfloat16'  # bf16 convs, f32 parameters (FA/SS/KP/WM: float32 only)
  c.resnet.width_mult = 1.0
  c.resnet.zero_init_residual = False  # torchvision's default, which the example used
  c.batch_size = 256
  c.num_epochs = 90
  c.data.resized_crop = 224  # train: scale 0.08-1, ratio 3/4-4/3; test: centre 87.5 % → 224
  c.data.flip = True
  c.data.val_fraction = 0.01  # assumption: 12.8k training images held out for model selection
  c.data.workers = 16  # JPEG decode + crop processes per host; raise it if devices wait
  c.data.threads = 8  # per process and worker; evaluation decodes in these threads only
  c.data.prefetch = 2
  c.optimizer.forward.update(
    name='sgd',
    lr=0.1,
    momentum=0.9,
    weight_decay=0.0001,
    clip=0.0,
    schedule='step',
    milestones=(1 / 3, 2 / 3),  # epochs 30 and 60
    decay_factor=0.1,
  )
  c.steps_per_call = 4
  c.eval_batch_size = 500
  c.checkpoint_every_steps = 1000  # ~1/5 epoch: a preempted run loses little
  return c
