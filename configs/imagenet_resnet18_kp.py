"""ImageNet ResNet-18, Kolen-Pollack (Akrout et al. 2019; recipes.akrout_imagenet)."""

from ccl_jax import recipes


def get_config():
  return recipes.akrout_imagenet('kp', 'resnet18')
