"""The streaming input pipeline (`config.pipeline='stream'`): Grain over random-access sources.

The memory pipeline (`data.py`) decodes each dataset whole and draws batches on the device; this
one reads batch by batch, so a dataset never has to fit in memory:

- sources: the tfds `array_record` data source of each split (`tfds.data_source`, decoding per
  read) or, for the embedded digits, the numpy arrays (`ArraySource`). The training and validation
  examples are those of the memory pipeline (`data.split_indices`), so both learn the same task.
- order: epoch e is a Grain shuffle of the training examples seeded by (seed, e), cut to whole
  batches; the epochs are concatenated into one dataset whose k-th batch is global step k.
  Process p of P reads elements p, p+P, ... of it (its shard), in local batches of B/P, so the
  P local batches of step k are together global batch k, whatever P.
- decoding, normalisation and augmentation (`Decode`: pad-crop + flip as `data.crop_pad` and
  `data.flip` say, or a random-resized crop + flip with `data.resized_crop`) run in Grain's map,
  in `data.threads` threads and `data.workers` worker processes; each example's augmentation is
  keyed by (seed, epoch, example index), so it does not depend on P or the number of workers.
- `TrainFeed` hands the training loop stacked chunks of batches placed on the devices (sharded
  over the batch axis of `config.parallel`); the loop places the next chunk while the current
  one computes. Its `state()` (Grain's iterator state after the last batch handed out, with the
  step it stands at) is saved in the same Orbax checkpoint as the TrainState (`checkpoint.py`'s
  'data' item, checksummed in meta), and `start()` restores it: a killed run resumes exactly,
  mid-epoch included.
- evaluation streams the validation and test splits in order (`StreamSplit.batches`), decoded and
  normalised without augmentation (with `data.resized_crop`: resized and centre-cropped); every
  process evaluates the whole split, as in memory.
- ImageNet-scale sets (`data.TFDS`): imagenet2012 and imagenette hold JPEGs of varying size, read
  only here, each training image random-resized-cropped to `data.resized_crop` (+ flip); their
  test set is tfds' 'validation' split (`data.TEST_SPLIT`), their validation set a held-out share
  of train.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ccl_jax import data as data_lib
from ccl_jax.errors import UserError


# -- sources ------------------------------------------------------------------------------------
class ArraySource:
  """A random-access source over in-memory arrays, read like a tfds data source."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, labels

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i: int) -> dict:
    return {'image': self.images[i], 'label': self.labels[i]}

  def __getitems__(self, ids) -> list[dict]:
    return [self[int(i)] for i in ids]


def _read(source, ids: np.ndarray) -> list[dict]:
  ids = [int(i) for i in ids]
  if hasattr(source, '__getitems__'):
    return list(source.__getitems__(ids))
  return [source[i] for i in ids]


# -- random numbers keyed by example --------------------------------------------------------------
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser, on uint64 arrays."""
  with np.errstate(over='ignore'):
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniforms(seed: int, epochs: np.ndarray, ids: np.ndarray, n: int) -> np.ndarray:
  """(len(ids), n) floats in [0, 1), a pure function of (seed, epoch, example index, column)."""
  with np.errstate(over='ignore'):
    golden = np.uint64(0x9E3779B97F4A7C15)
    h = _mix(np.uint64(seed) * golden + np.uint64(0x632BE59BD9B4E019))
    h = _mix(h ^ (np.asarray(epochs, np.int64).astype(np.uint64) * golden))[..., None]
    h = _mix(
      h ^ np.asarray(ids, np.int64).astype(np.uint64)[:, None] * np.uint64(0xD6E8FEB86659FD93)
    )
    h = _mix(h + np.arange(1, n + 1, dtype=np.uint64) * golden)
  return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


# -- augmentation (numpy, in Grain's map) -------------------------------------------------------
def pad_crop_flip(images: np.ndarray, u: np.ndarray, pad: int, flip: bool, mode: str) -> np.ndarray:
  """Random crops (pad each side by `pad`, crop back) and horizontal flips of a (B, H, W, C)
  batch, drawn from `u` (B, 3) uniforms; 'zero' pads with 0 (the channel mean of standardised
  images), 'edge' repeats the border."""
  out = images
  b, h, w = images.shape[:3]
  if pad:
    widths = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    padded = np.pad(images, widths, mode='edge' if mode == 'edge' else 'constant')
    dy = np.minimum((u[:, 0] * (2 * pad + 1)).astype(np.int64), 2 * pad)
    dx = np.minimum((u[:, 1] * (2 * pad + 1)).astype(np.int64), 2 * pad)
    out = np.stack([padded[i, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])
  if flip:
    out = np.where((u[:, 2] < 0.5)[:, None, None, None], out[:, :, ::-1], out)
  return np.ascontiguousarray(out)


def random_resized_crop(
  image: np.ndarray, u: np.ndarray, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> np.ndarray:
  """Inception-style crop of a uint8 (H, W, C) image: a box of random area share (`scale`) and
  aspect ratio (`ratio`, log-uniform), 10 tries from `u` (>= 20 uniforms in [0, 1)), else the
  centre crop at the clipped ratio; resized to (size, size) bilinearly."""
  h, w = image.shape[:2]
  area = h * w
  log_r = np.log(ratio)
  for t in range(10):
    target = area * (scale[0] + (scale[1] - scale[0]) * u[2 * t])
    r = np.exp(log_r[0] + (log_r[1] - log_r[0]) * u[2 * t + 1])
    cw, ch = int(round(np.sqrt(target * r))), int(round(np.sqrt(target / r)))
    if 0 < cw <= w and 0 < ch <= h:
      y = min(int(u[(2 * t + 2) % len(u)] * (h - ch + 1)), h - ch)
      x = min(int(u[(2 * t + 3) % len(u)] * (w - cw + 1)), w - cw)
      return _resize(image[y : y + ch, x : x + cw], size, size)
  r = w / h
  if r < ratio[0]:
    cw, ch = w, int(round(w / ratio[0]))
  elif r > ratio[1]:
    cw, ch = int(round(h * ratio[1])), h
  else:
    cw, ch = w, h
  y, x = (h - ch) // 2, (w - cw) // 2
  return _resize(image[y : y + ch, x : x + cw], size, size)


def centre_crop(image: np.ndarray, size: int, crop_share: float = 0.875) -> np.ndarray:
  """Evaluation's view for `random_resized_crop`: the central `crop_share` square of the shorter
  side, resized to (size, size)."""
  h, w = image.shape[:2]
  side = max(1, int(round(min(h, w) * crop_share)))
  y, x = (h - side) // 2, (w - side) // 2
  return _resize(image[y : y + side, x : x + side], size, size)


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  if image.shape[:2] == (height, width):
    return image
  from PIL import Image

  grey = image.ndim == 3 and image.shape[-1] == 1
  pil = Image.fromarray(image[..., 0] if grey else image)
  out = np.asarray(pil.resize((width, height), Image.BILINEAR))
  return out[..., None] if grey else out


@dataclasses.dataclass(frozen=True)
class Decode:
  """Grain's map: a batch of (epoch, example index) rows -> {'image' (B, H, W, C) float32,
  'label' (B,) int32, 'index' (B,) int64}: read, decoded, normalised like `data.load` does
  (bitwise), and augmented when `train`."""

  source: Any
  scale: float  # pixels / scale ... 255 for uint8 images, 1 for digits (already in [0, 1])
  mean: Any  # per-channel, or None
  std: Any
  seed: int = 0
  train: bool = False
  crop_pad: int = 0
  flip: bool = False
  pad_mode: str = 'zero'
  resized_crop: int = 0

  def __call__(self, rows: np.ndarray) -> dict:
    rows = np.asarray(rows, np.int64).reshape(-1, 2)
    epochs, ids = rows[:, 0], rows[:, 1]
    records = _read(self.source, ids)
    images = [np.asarray(r['image']) for r in records]
    u = uniforms(self.seed, epochs, ids, 24) if self.train else None
    if self.resized_crop:
      size = self.resized_crop
      images = [
        random_resized_crop(x, u[i, 3:], size) if self.train else centre_crop(x, size)
        for i, x in enumerate(images)
      ]
    x = np.stack(images)
    if self.scale != 1:
      x = x.astype(np.float32) / float(self.scale)
    x = x.astype(np.float32, copy=False)
    if self.mean is not None:
      x = (x - self.mean) / self.std
    if self.train and (self.crop_pad or self.flip):
      x = pad_crop_flip(x, u, self.crop_pad, self.flip, self.pad_mode)
    labels = np.asarray([r['label'] for r in records]).astype(np.int32)
    return {'image': x, 'label': labels, 'index': ids}


class _Rows:
  """(epoch, example index) rows of `ids`: the element a pipeline starts from."""

  def __init__(self, ids: np.ndarray, epoch: int):
    self.ids, self.epoch = np.asarray(ids, np.int64), int(epoch)

  def __len__(self) -> int:
    return len(self.ids)

  def __getitem__(self, j: int) -> np.ndarray:
    return np.array([self.epoch, self.ids[j]], np.int64)


# -- splits -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StreamSplit:
  """The examples `ids` of a source, read through `decode` (`data.Split`'s interface)."""

  ids: np.ndarray
  decode: Decode
  threads: int = 2
  prefetch: int = 4

  def __len__(self) -> int:
    return len(self.ids)

  @property
  def image_shape(self) -> tuple[int, ...]:
    return tuple(self.head(1)[0].shape[1:])

  def head(self, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `n` examples (images, labels), unaugmented."""
    b = self.decode(np.stack([[-1, i] for i in self.ids[:n]]))
    return b['image'], b['label']

  def dataset(self, batch_size: int):
    import grain

    rows = grain.MapDataset.source(_Rows(self.ids, -1))
    return rows.batch(batch_size).map(dataclasses.replace(self.decode, train=False))

  def batches(self, batch_size: int):
    """(images, labels) of consecutive batches in order, decoded in `threads` threads."""
    if not len(self):
      return
    import grain

    options = grain.ReadOptions(num_threads=self.threads, prefetch_buffer_size=self.prefetch)
    for b in self.dataset(batch_size).to_iter_dataset(options):
      yield b['image'], b['label']


def epoch_seed(seed: int, epoch: int) -> int:
  """The shuffle seed of `epoch`, in [0, 2**32)."""
  return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0])


def load(config) -> data_lib.Dataset:
  """`config.dataset` as streamed splits: the same train/validation/test examples as
  `data.load`, read batch by batch."""
  data_lib.check_dataset(config, 'stream')
  name, d = config.dataset, config.data
  how = d.normalize
  opts = {'threads': int(d.threads), 'prefetch': int(d.prefetch)}
  if name == 'digits':
    train, test, k = data_lib._digits(standardise=False)
    mean = std = None
    if how == 'mean_std':  # as `data._digits` standardises: the training pixels' statistics
      mean, std = train.images.mean(), train.images.std()
    train_src, test_src, scale = (
      ArraySource(train.images, train.labels),
      ArraySource(test.images, test.labels),
      1,
    )
  else:
    tfds_name, mean, std, k = data_lib.TFDS[name]
    where = data_lib.data_dir(config)
    train_src = data_lib.open_tfds(tfds_name, d.get('train_split', 'train'), where)
    test_src = data_lib.open_tfds(tfds_name, data_lib.TEST_SPLIT.get(name, 'test'), where)
    scale = 255
    if how == 'imagenet':
      mean, std = data_lib.IMAGENET
    if how == 'unit':
      mean = std = None
    else:
      mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  common = dict(scale=scale, mean=mean, std=std, resized_crop=int(d.resized_crop))
  train_decode = Decode(
    train_src,
    seed=int(config.seed),
    crop_pad=int(d.crop_pad),
    flip=bool(d.flip),
    pad_mode=d.pad_mode,
    **common,
  )
  val_idx, tr_idx = data_lib.split_indices(config, len(train_src))
  train = StreamSplit(tr_idx, train_decode, **opts)
  val = StreamSplit(val_idx, train_decode, **opts)
  test = StreamSplit(np.arange(len(test_src)), Decode(test_src, **common), **opts)
  shape = train.image_shape
  if how == 'imagenet' and shape[-1] != 3:
    raise UserError(f"config.normalize='imagenet' needs RGB images, not {shape[-1]} channel(s)")
  return data_lib.Dataset(train, val, test, k)


# -- training -----------------------------------------------------------------------------------
def train_dataset(
  split: StreamSplit,
  batch_size: int,
  steps_per_epoch: int,
  num_epochs: int,
  seed: int,
  shuffle: bool,
  process_index: int = 0,
  process_count: int = 1,
):
  """The Grain MapDataset of this process's local batches of every epoch: batch k is its
  B/P-example share of global step k (see the module doc)."""
  import grain

  if batch_size % process_count:
    raise UserError(
      f'config.batch_size={batch_size} does not divide over {process_count} processes'
    )
  per_epoch = steps_per_epoch * batch_size
  epochs = []
  for e in range(num_epochs):
    ds = grain.MapDataset.source(_Rows(split.ids, e))
    if shuffle:
      ds = ds.shuffle(seed=epoch_seed(seed, e))
    epochs.append(ds[:per_epoch])
  ds = grain.MapDataset.concatenate(epochs)[process_index::process_count]
  return ds.batch(batch_size // process_count, drop_remainder=True).map(
    dataclasses.replace(split.decode, train=True)
  )


class TrainFeed:
  """This process's training batches, as chunks on the devices; its iterator state for the
  checkpoint. `start(step, saved)` opens the iterator at global step `step`; `take(n)` returns
  the next `n` steps as the compiled chunk's arguments."""

  def __init__(self, config, split: StreamSplit, steps_per_epoch: int, para):
    import jax

    self.config, self.split, self.para = config, split, para
    self.steps_per_epoch = steps_per_epoch
    self.process_index, self.process_count = jax.process_index(), jax.process_count()
    if self.process_count > 1 and para.mode == 'none':
      raise UserError(
        "config.pipeline='stream' over several processes needs config.parallel='pmap' or "
        "'shard_map' (each process reads only its share of every batch)"
      )
    self.workers = int(config.data.workers)
    self.iterator = None
    self.position = self.offset = 0

  def dataset(self):
    c = self.config
    return train_dataset(
      self.split,
      c.batch_size,
      self.steps_per_epoch,
      c.num_epochs,
      c.seed,
      c.data.shuffle,
      self.process_index,
      self.process_count,
    )

  def start(self, step: int, saved: dict | None = None) -> str:
    """Opens the iterator at global step `step`: from `saved` (a `state()` of a checkpoint at
    that step) by Grain's `set_state` when it was written with this many workers, else by
    starting a new iterator at that batch (the dataset is random access, so both are exact).
    Returns which ('start', 'state' or 'skip')."""
    import grain

    self.close()
    if saved is not None and int(saved.get('position', -1)) != step:
      raise UserError(
        f'the checkpoint at step {step} holds the input pipeline at step {saved.get("position")}'
      )
    by_state = (
      saved is not None and saved.get('iterator') is not None and saved['workers'] == self.workers
    )
    self.offset = int(saved.get('offset', 0)) if by_state else step
    ds = self.dataset()
    if self.offset:
      ds = ds[self.offset :]  # a fresh iterator over the batches from there
    c = self.config.data
    it = ds.to_iter_dataset(
      grain.ReadOptions(num_threads=int(c.threads), prefetch_buffer_size=int(c.prefetch))
    )
    if self.workers:
      _absl_flags_parsed()
      it = it.mp_prefetch(
        grain.MultiprocessingOptions(
          num_workers=self.workers, per_worker_buffer_size=int(c.prefetch)
        )
      )
    self.iterator = iter(it)
    if by_state:
      self.iterator.set_state(saved['iterator'])
    self.position = step
    return 'state' if by_state else 'skip' if step else 'start'

  def state(self) -> dict:
    """Where the feed stands, the same on every process (each has read as many batches of its
    own shard): the global step; Grain's iterator state, over the dataset's batches from
    `offset` on, with the worker count it belongs to."""
    return {
      'position': self.position,
      'offset': self.offset,
      'workers': self.workers,
      'iterator': self.iterator.get_state() if self.iterator is not None else None,
    }

  def take(self, epoch: int, offset: int, n: int) -> tuple[tuple, dict]:
    """Steps offset..offset+n of `epoch`, the next `n` the iterator holds: ((images, labels)
    on the devices, the feed's state after them)."""
    if epoch * self.steps_per_epoch + offset != self.position:
      raise RuntimeError(
        f'the input pipeline stands at step {self.position}, not at step '
        f'{epoch * self.steps_per_epoch + offset} (epoch {epoch}, offset {offset})'
      )
    batches = [next(self.iterator) for _ in range(n)]
    self.position += n
    images = np.stack([b['image'] for b in batches])
    labels = np.stack([b['label'] for b in batches])
    return self.para.put_batches(images, labels), self.state()

  def close(self) -> None:
    if self.iterator is not None and hasattr(self.iterator, 'close'):
      self.iterator.close()
    self.iterator = None


def _absl_flags_parsed() -> None:
  """Grain's worker processes read absl flags; outside `main` (tests, scripts) mark them parsed."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
