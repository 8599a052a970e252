"""ImageNet ResNet-50, BP (Akrout et al. 2019; recipes.akrout_imagenet)."""

from ccl_jax import recipes


def get_config():
  return recipes.akrout_imagenet('bp', 'resnet50')
