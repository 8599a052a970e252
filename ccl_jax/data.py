"""Datasets: the embedded sklearn digits and tfds data sources, decoded once and held in memory.

Every split is a pair of numpy arrays: images (N, H, W, C) float32, normalised per channel, and
labels (N,) int32. Batches are drawn on the device by index (see `train.epoch_indices`). This is
`config.pipeline='memory'`; `stream.py` reads the same splits batch by batch ('stream').

ImageNet-scale sets: `imagenet2012` (manual download, see `MANUAL`), `imagenet_resized/32x32` and
`/64x64` (fixed-size, both pipelines) and `imagenette` (variable-size JPEGs, like imagenet2012: the
stream pipeline only, cropped to `data.resized_crop`). None has a labelled test split: tfds'
'validation' split is the test set (`TEST_SPLIT`), and the model-selection split is a held-out
share of train (`data.val_fraction`), as for every dataset.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os

import numpy as np

from ccl_jax import config as config_lib
from ccl_jax.config import Setting
from ccl_jax.errors import UserError

SETTINGS = {
  'normalize': Setting(
    'mean_std',
    "'mean_std' (the dataset's per-channel statistics), "
    "'imagenet' (ImageNet's) or 'unit' (pixels/255 only)",
    choices=('mean_std', 'imagenet', 'unit'),
  ),
  'cache_dir': Setting(
    '~/.cache/ccl_jax', "decoded tfds splits are cached here as .npz; '' = no cache"
  ),
  'val_fraction': config_lib.fraction(
    'share of the training set held out for model selection', 0.1
  ),
  'shuffle': Setting(True, 'reshuffle the training set every epoch'),
  'crop_pad': config_lib.non_negative(
    'random crops on device: pad each side by this, crop back (0 = off)', 0
  ),
  'flip': Setting(False, 'random horizontal flips on device'),
  'pad_mode': Setting(
    'zero', "crop padding: 'zero' (the channel mean) or 'edge'", choices=('zero', 'edge')
  ),
  'workers': config_lib.non_negative(
    "pipeline='stream': Grain worker processes decoding and augmenting (0 = in this process)", 0
  ),
  'threads': config_lib.non_negative(
    "pipeline='stream': threads reading and decoding batches ahead in each process", 2
  ),
  'prefetch': config_lib.positive(
    "pipeline='stream': batches decoded ahead (per process, and per worker)", 4
  ),
  'resized_crop': config_lib.non_negative(
    "pipeline='stream': random-resized crop (ImageNet-style) to N×N for training, resize and "
    'centre crop for evaluation; 0 = off',
    0,
  ),
  'train_split': Setting(
    'train',
    "tfds split(s) the training and validation sets come from: 'train', or "
    "'train+unlabelled' (STL-10's 100k unlabelled images too: autoencoders only)",
    choices=('train', 'train+unlabelled'),
  ),
}

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # torchvision's per-channel stats

# name -> (tfds name, per-channel mean, per-channel std, classes); stats from SPEC §1.1.
TFDS = {
  'mnist': ('mnist', (0.1307,), (0.3081,), 10),
  'fashion_mnist': ('fashion_mnist', (0.2860,), (0.3530,), 10),
  'cifar10': ('cifar10', (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 10),
  'cifar100': ('cifar100', (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 100),
  'stl10': ('stl10', (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713), 10),  # 96×96
  'imagenet2012': ('imagenet2012', *IMAGENET, 1000),  # JPEGs of varying size
  'imagenet_resized/32x32': ('imagenet_resized/32x32', *IMAGENET, 1000),
  'imagenet_resized/64x64': ('imagenet_resized/64x64', *IMAGENET, 1000),
  'imagenette': ('imagenette/320px-v2', *IMAGENET, 10),  # shorter side 320 px, varying size
}
# The split used as the test set where it is not 'test' (ImageNet's test labels are not public).
TEST_SPLIT = {
  'imagenet2012': 'validation',
  'imagenet_resized/32x32': 'validation',
  'imagenet_resized/64x64': 'validation',
  'imagenette': 'validation',
}
# Images of varying size: streamed only, random-resized-cropped to `data.resized_crop`.
VARIABLE_SIZE = frozenset({'imagenet2012', 'imagenette'})
# tfds name -> how to prepare a dataset tfds cannot download itself.
MANUAL = {
  'imagenet2012': (
    'it needs a manual download: get ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from '
    'https://image-net.org/download-images (free registration), put both in a folder MANUAL, '
    "then `pip install '.[prepare]'` and `tfds build imagenet2012 --manual_dir=MANUAL "
    '--data_dir={where} --file_format=array_record` (see the README, ImageNet)'
  ),
}
DATASETS = ('digits',) + tuple(TFDS)


@dataclasses.dataclass(frozen=True)
class Split:
  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def image_shape(self) -> tuple[int, ...]:
    return self.images.shape[1:]

  def head(self, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `n` examples (images, labels)."""
    return self.images[:n], self.labels[:n]

  def batches(self, batch_size: int):
    """(images, labels) of consecutive batches, in order; the last may be short."""
    for start in range(0, len(self), batch_size):
      yield self.images[start : start + batch_size], self.labels[start : start + batch_size]


@dataclasses.dataclass(frozen=True)
class Dataset:
  train: Split
  val: Split
  test: Split
  num_classes: int

  @property
  def image_shape(self) -> tuple[int, ...]:
    return tuple(self.train.image_shape)


def _digits(standardise: bool = True) -> tuple[Split, Split, int]:
  """sklearn's bundled 8x8 digits, split deterministically 80/20 train/test; in [0, 1] unless
  `standardise` (then zero mean, unit std over the training pixels)."""
  from sklearn.datasets import load_digits

  d = load_digits()
  images = (d.images / 16.0).astype(np.float32)[..., None]
  labels = d.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(labels))
  cut = int(0.8 * len(labels))
  tr, te = order[:cut], order[cut:]
  if standardise:
    mean, std = images[tr].mean(), images[tr].std()
    images = (images - mean) / std
  return Split(images[tr], labels[tr]), Split(images[te], labels[te]), 10


def open_tfds(name: str, split: str, data_dir: str):
  """The tfds array_record data source of `name`'s `split` (random access, decodes per read)."""
  import tensorflow_datasets as tfds

  try:
    return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
  except Exception as e:  # tfds raises several types for "not there"
    where = data_dir or '~/tensorflow_datasets'
    if name in MANUAL:
      raise UserError(
        f"dataset '{name}' ({split}) is not prepared in data_dir '{where}' "
        f'({type(e).__name__}); ' + MANUAL[name].format(where=where)
      ) from None
    raise UserError(
      f"dataset '{name}' ({split}) is not prepared in data_dir '{where}' "
      f"({type(e).__name__}); run `pip install '.[prepare]'` and "
      f"`python -c \"import tensorflow_datasets as t; t.builder('{name}', data_dir='{where}', "
      f"file_format='array_record').download_and_prepare()\"` on a machine with internet, "
      f'or point --config.data_dir at a prepared copy'
    ) from None


def _read_tfds(name: str, split: str, data_dir: str) -> Split:
  source = open_tfds(name, split, data_dir)
  n = len(source)
  first = source[0]
  images = np.empty((n,) + first['image'].shape, np.uint8)
  labels = np.empty((n,), np.int32)
  chunk = 4096
  for start in range(0, n, chunk):
    idx = list(range(start, min(n, start + chunk)))
    for i, rec in zip(idx, source.__getitems__(idx)):
      images[i] = rec['image']
      labels[i] = rec['label']
  return Split(images, labels)


def _cached(name: str, split: str, data_dir: str, cache_dir: str) -> Split:
  """Decodes a tfds split once; later runs read the uint8 arrays from `cache_dir`."""
  if not cache_dir:
    return _read_tfds(name, split, data_dir)
  key = hashlib.sha1(
    os.path.abspath(os.path.expanduser(data_dir or '~/tensorflow_datasets')).encode()
  ).hexdigest()[:10]
  stem = name.replace('/', '_')
  path = os.path.join(os.path.expanduser(cache_dir), f'{stem}-{split}-{key}.npz')
  if os.path.exists(path):
    try:
      with np.load(path) as f:
        return Split(f['images'], f['labels'])
    except (OSError, ValueError, KeyError):
      pass  # a broken cache file is rebuilt below
  s = _read_tfds(name, split, data_dir)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f'{path}.{os.getpid()}.tmp.npz'
  np.savez(tmp, images=s.images, labels=s.labels)
  os.replace(tmp, path)
  return s


def _normalise(s: Split, mean, std, how: str = 'mean_std') -> Split:
  """pixels/255, then per-channel standardisation with the dataset's statistics ('mean_std') or
  ImageNet's ('imagenet', RGB only); 'unit' stops at pixels/255."""
  x = s.images.astype(np.float32) / 255.0
  if how == 'imagenet':
    if x.shape[-1] != 3:
      raise UserError(f"config.normalize='imagenet' needs RGB images, not {x.shape[-1]} channel(s)")
    mean, std = IMAGENET
  if how in ('mean_std', 'imagenet'):
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  return Split(x, s.labels)


def check_dataset(config, pipeline: str | None = None) -> None:
  """Refuses a dataset/normalisation/split combination `pipeline` (default: the config's) cannot
  read."""
  name, d = config.dataset, config.data
  pipeline = pipeline or config.get('pipeline', 'memory')
  if name not in DATASETS:
    raise UserError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}")
  if name in VARIABLE_SIZE and pipeline != 'stream':
    raise UserError(
      f"dataset '{name}' has images of varying size, which the memory pipeline cannot hold: "
      'use --config.pipeline=stream (with --config.data.resized_crop=N)'
    )
  if name in VARIABLE_SIZE and not d.get('resized_crop', 0):
    raise UserError(
      f"dataset '{name}' has images of varying size: set --config.data.resized_crop=N "
      '(e.g. 224) to train on random-resized N×N crops and test on centre crops'
    )
  if name == 'digits' and d.normalize == 'imagenet':
    raise UserError("config.normalize='imagenet' needs RGB images; digits are grey")
  split = d.get('train_split', 'train')
  if split != 'train':
    from ccl_jax import models

    if name != 'stl10' or models.task_kind(config.model) != 'reconstruction':
      raise UserError(
        f"config.data.train_split='{split}' adds STL-10's unlabelled images, for a "
        f"reconstruction model ('ae'), not dataset '{name}' with model '{config.model}'"
      )
  if d.get('resized_crop', 0) and pipeline != 'stream':
    raise UserError('config.data.resized_crop needs --config.pipeline=stream')


def split_indices(config, n: int) -> tuple[np.ndarray, np.ndarray]:
  """(validation, training) indices into the `n` examples of the training split: a held-out
  share drawn by the seed, both sorted; `train_subset` keeps the first training ones. Both
  pipelines use these, so they learn the same task."""
  order = np.random.default_rng(config.seed).permutation(n)
  n_val = int(round(config.data.val_fraction * n))
  val_idx, tr_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
  if config.train_subset:
    tr_idx = tr_idx[: config.train_subset]
  if len(tr_idx) < config.batch_size:
    raise UserError(
      f'config.batch_size={config.batch_size} is larger than the '
      f'{len(tr_idx)} training examples of {config.dataset}'
    )
  return val_idx, tr_idx


def load(config) -> Dataset:
  """Loads `config.dataset` into memory, with the validation split carved from train."""
  check_dataset(config, 'memory')
  name, d = config.dataset, config.data
  how = d.normalize
  if name == 'digits':
    train, test, k = _digits(standardise=how == 'mean_std')
  else:
    tfds_name, mean, std, k = TFDS[name]
    split = d.get('train_split', 'train')
    train = _normalise(_cached(tfds_name, split, data_dir(config), d.cache_dir), mean, std, how)
    test_split = TEST_SPLIT.get(name, 'test')
    test = _normalise(_cached(tfds_name, test_split, data_dir(config), d.cache_dir), mean, std, how)
  val_idx, tr_idx = split_indices(config, len(train))
  val = Split(train.images[val_idx], train.labels[val_idx])
  train = Split(train.images[tr_idx], train.labels[tr_idx])
  return Dataset(train, val, test, k)


def augment(images, indices, key, pad: int, flip: bool, padding: str = 'zero'):
  """Random crop (pad each side by `pad`, crop back to size) and random horizontal flip, on device.

  Every example's draw is keyed by (`key`, its dataset index), so it does not depend on how the
  batch is split over devices. `padding`: 'edge' repeats the border, 'zero' pads with 0 (the
  channel mean, as images are standardised).
  """
  import jax
  import jax.numpy as jnp

  def one(image, index):
    k_crop, k_flip = jax.random.split(jax.random.fold_in(key, index))
    out = image
    if pad:
      widths = ((pad, pad), (pad, pad), (0, 0))
      padded = jnp.pad(image, widths, mode='edge' if padding == 'edge' else 'constant')
      dy, dx = jax.random.randint(k_crop, (2,), 0, 2 * pad + 1)
      out = jax.lax.dynamic_slice(padded, (dy, dx, 0), image.shape)
    if flip:
      out = jnp.where(jax.random.bernoulli(k_flip), out[:, ::-1], out)
    return out

  return jax.vmap(one)(images, indices)


def augmenter(config):
  """`(images, indices, key) -> images` for the config's augmentation, or None when it has none."""
  pad, flip = int(config.data.crop_pad), bool(config.data.flip)
  if not pad and not flip:
    return None
  return functools.partial(augment, pad=pad, flip=flip, padding=config.data.pad_mode)


def data_dir(config) -> str:
  """The tfds data_dir: `config.data_dir`, else $CCL_JAX_DATA_DIR, else tfds' default ('')."""
  return config.data_dir or os.environ.get('CCL_JAX_DATA_DIR', '')
