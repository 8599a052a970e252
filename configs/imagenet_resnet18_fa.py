"""ImageNet ResNet-18, FA (Akrout et al. 2019; recipes.akrout_imagenet)."""

from ccl_jax import recipes


def get_config():
  return recipes.akrout_imagenet('fa', 'resnet18')
