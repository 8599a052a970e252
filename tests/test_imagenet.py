"""ImageNet-scale datasets (`data.TFDS`): variable-size images stream through random-resized crops
(tfds' mock data in imagenette's shapes: random sizes 5-49 px a side), a tiny ResNet trains on
them, and the memory pipeline and a missing imagenet2012 are refused in one line."""

import dataclasses
import json
import math

import numpy as np
import pytest

from ccl_jax import config as config_lib
from ccl_jax import data as data_lib
from ccl_jax import stream, train
from ccl_jax.errors import UserError

from conftest import load_config

# A tiny ResNet-18 (8 channels, 24×24 crops) on 40 mock images a split: 4 steps of 8, then eval
# (about a minute on 2 busy CPU cores, nearly all of it compiling).
TINY = {
  'dataset': 'imagenette',
  'resnet__width_mult': 0.125,
  'data__resized_crop': 24,
  'data__workers': 0,
  'data__val_fraction': 0.2,
  'compute_dtype': 'float32',
  'parallel': 'none',
  'batch_size': 8,
  'num_epochs': 1,
  'steps_per_call': 2,
  'eval_batch_size': 8,  # the validation split's size: one evaluation shape
  'conv_impl': 'xla',  # compiles faster on CPU than im2col
  'analysis_batch_size': 8,
  'checkpoint_every_steps': 0,
  'progress': False,
}


@pytest.fixture
def mock_imagenette(monkeypatch):
  """tfds' mock data source (40 random examples a split, images of random size)."""
  import tensorflow_datasets as tfds
  from tensorflow_datasets.testing import mocking

  # tfds 4.9.10's mock sets `__getitems__` on a MagicMock, where it is not bound: drop its `self`.
  monkeypatch.setattr(
    mocking, '_getitems', lambda keys, generator, serialized=False: [generator[k] for k in keys]
  )
  with tfds.testing.mock_data(num_examples=40):
    yield


@pytest.mark.parametrize('name', ['imagenet2012', 'imagenette'])
def test_the_memory_pipeline_refuses_variable_size_images_in_one_line(name):
  c = config_lib.finalize(load_config('imagenet_resnet18_bp', dataset=name, pipeline='memory'))
  with pytest.raises(UserError, match=f"^dataset '{name}' has images of varying size") as e:
    data_lib.load(c)
  assert '--config.pipeline=stream' in str(e.value) and '\n' not in str(e.value)
  with pytest.raises(UserError, match='data.resized_crop=N'):  # streamed, but not cropped
    stream.load(config_lib.finalize(load_config('imagenet_resnet18_bp', data__resized_crop=0)))


def test_a_missing_imagenet2012_says_how_to_download_it_by_hand(tmp_path):
  c = config_lib.finalize(load_config('imagenet_resnet18_kp', data_dir=str(tmp_path)))
  with pytest.raises(UserError) as e:
    stream.load(c)
  text = str(e.value)
  assert text.startswith("dataset 'imagenet2012' (train) is not prepared") and '\n' not in text
  for needle in ('ILSVRC2012_img_train.tar', 'tfds build imagenet2012 --manual_dir', str(tmp_path)):
    assert needle in text, (needle, text)


def test_random_resized_crops_have_the_configured_size(mock_imagenette):
  c = config_lib.finalize(load_config('imagenet_resnet18_bp', **TINY))
  ds = stream.load(c)
  assert ds.num_classes == 10 and (len(ds.train), len(ds.val), len(ds.test)) == (32, 8, 40)
  raw = {np.shape(ds.train.decode.source[i]['image']) for i in range(10)}
  assert len(raw) > 1, raw  # the source's images vary in size
  rows = np.stack([[0, i] for i in ds.train.ids[:8]])
  train_view = dataclasses.replace(ds.train.decode, train=True)(rows)['image']
  assert train_view.shape == (8, 24, 24, 3) and np.isfinite(train_view).all()
  for split in (ds.train, ds.val, ds.test):  # evaluation: resized and centre-cropped
    assert split.head(3)[0].shape == (3, 24, 24, 3)
  assert not np.array_equal(train_view, ds.train.head(8)[0])  # training crops are random


def test_a_tiny_kp_resnet18_streams_variable_size_images_with_finite_losses(
  mock_imagenette, tmp_path
):
  final = train.train_and_evaluate(load_config('imagenet_resnet18_kp', **TINY), str(tmp_path))
  assert math.isfinite(final['test_loss']) and 0 <= final['test_accuracy'] <= 1, final
  records = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  losses = [v for r in records for k, v in r.items() if k.endswith('loss')]
  assert losses and all(math.isfinite(v) for v in losses), records
