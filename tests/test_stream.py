"""The streaming input pipeline (`config.pipeline='stream'`, `stream.py`): exact resume (after whole
epochs, and after SIGKILL mid-epoch), disjoint shards over two processes, the same task as the
memory pipeline, and a real MNIST epoch."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ccl_jax import config as config_lib
from ccl_jax import data as data_lib
from ccl_jax import stream, train
from ccl_jax.checkpoint import Checkpointer

from conftest import ROOT, load_config

# One parallel test worker for the whole file: its tests share a module fixture.
pytestmark = pytest.mark.xdist_group('stream')

# One small streamed digits run shared by the tests below (the CLI flags and the config agree).
FLAGS = {
  'pipeline': 'stream',
  'num_epochs': 4,
  'checkpoint_every_steps': 10,  # a mid-epoch checkpoint (20 steps an epoch) ...
  'checkpoint_every_epochs': 100,  # ... and none at epoch ends but the last
  'progress': False,
}


def config(**kw):
  return load_config('default', **{**FLAGS, **kw})


def cli_flags(**kw) -> list[str]:
  out = []
  for k, v in {**FLAGS, **kw}.items():
    v = '(' + ','.join(map(str, v)) + ',)' if isinstance(v, tuple) else v
    out.append(f'--config.{k}={v}')
  return out


def records(workdir) -> list[dict]:
  """metrics.jsonl without the wall-clock keys."""
  out = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  for r in out:
    r.pop('samples_per_second', None)
  return out


def final_tree(workdir) -> dict:
  ckpt = Checkpointer(str(workdir), write=False)
  step = ckpt.steps()[-1]
  return ckpt.manager.restore(step, args=ocp.args.Composite(tree=ocp.args.StandardRestore()))[
    'tree'
  ]


def assert_same_run(a, b) -> None:
  jax.tree.map(np.testing.assert_array_equal, final_tree(a), final_tree(b))
  assert records(a) == records(b)


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """A straight 4-epoch streamed run: (workdir, final record)."""
  workdir = tmp_path_factory.mktemp('straight')
  return workdir, train.train_and_evaluate(config(), str(workdir))


def test_resumed_after_two_of_four_epochs_is_bit_identical(straight, tmp_path):
  train.train_and_evaluate(config(num_epochs=2), str(tmp_path))
  data = Checkpointer(str(tmp_path), write=False)
  step = data.steps()[-1]
  saved = data.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))['data']
  assert saved['position'] == step == 40 and saved['iterator'] == {'next_index': 40}, saved
  train.train_and_evaluate(config(), str(tmp_path))
  assert_same_run(straight[0], tmp_path)


def test_sigkill_mid_epoch_then_resume_is_bit_identical(straight, tmp_path):
  def run(*extra):
    return subprocess.Popen(
      [sys.executable, '-m', 'ccl_jax.main', f'--workdir={tmp_path}', *cli_flags(), *extra],
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )

  killed = run()
  ckpts = tmp_path / 'checkpoints'
  deadline = time.time() + 120
  while time.time() < deadline and killed.poll() is None:
    if ckpts.is_dir() and any(p.name.isdigit() and int(p.name) > 20 for p in ckpts.iterdir()):
      break  # a mid-epoch checkpoint of epoch 2 or later is written
    time.sleep(0.005)
  assert killed.poll() is None, 'the run finished before it could be killed'
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  resumed = run()
  out = resumed.communicate(timeout=300)[0]
  assert resumed.returncode == 0, out
  step = int(out.split('resumed from ')[1].split(' at step ')[1].split()[0])
  assert step % 20 and step < 80, out  # mid-epoch
  assert_same_run(straight[0], tmp_path)


def test_streamed_and_in_memory_pipelines_learn_the_same_task(straight, tmp_path):
  c = config_lib.finalize(config())
  streamed, memory = stream.load(c), data_lib.load(c)
  for part in ('train', 'val', 'test'):  # the same examples, decoded to the same bits
    s, m = getattr(streamed, part), getattr(memory, part)
    images, labels = s.head(len(s))
    np.testing.assert_array_equal(images, m.images)
    np.testing.assert_array_equal(labels, m.labels)
  final = train.train_and_evaluate(config(pipeline='memory'), str(tmp_path))
  got = straight[1]['test_accuracy']
  assert got >= 0.85 and final['test_accuracy'] >= 0.85, (got, final)
  assert abs(got - final['test_accuracy']) <= 0.04, (got, final)


def test_augmentation_is_keyed_by_seed_epoch_and_example():
  images = np.random.default_rng(0).normal(size=(6, 8, 8, 3)).astype(np.float32)
  src = stream.ArraySource(images, np.arange(6, dtype=np.int32))
  decode = stream.Decode(src, 1, None, None, seed=7, train=True, crop_pad=2, flip=True)
  rows = np.array([[3, i] for i in range(6)])
  whole = decode(rows)['image']
  np.testing.assert_array_equal(decode(rows[[4, 1]])['image'], whole[[4, 1]])  # batch-invariant
  assert not np.array_equal(decode(rows + [[1, 0]])['image'], whole)  # another epoch
  assert whole.shape == images.shape and not np.array_equal(whole, images)
  flipped = np.array_equal(whole[0], images[0][:, ::-1])
  assert flipped or not np.array_equal(whole[0], images[0])
  u = stream.uniforms(7, np.zeros(1000, np.int64), np.arange(1000), 4)
  assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.02
  big = np.random.default_rng(1).integers(0, 255, (40, 60, 3), dtype=np.uint8)
  assert stream.random_resized_crop(big, u[0].repeat(6), 16).shape == (16, 16, 3)
  assert stream.centre_crop(big, 16).shape == (16, 16, 3)


def test_worker_processes_give_the_same_batches_and_state_resumes_without_them():
  from ccl_jax.parallel import DataParallel

  def feed(workers):
    c = config_lib.finalize(config(**{'data.workers': workers}))
    data = stream.load(c)
    return stream.TrainFeed(c, data.train, len(data.train) // c.batch_size, DataParallel('none'))

  with_workers = feed(1)
  assert with_workers.start(0) == 'start'
  (x3, y3), state = with_workers.take(0, 0, 3)
  (x2, y2), _ = with_workers.take(0, 3, 2)
  with_workers.close()
  assert state['workers'] == 1 and state['position'] == 3
  in_process = feed(0)
  assert in_process.start(0) == 'start'
  (a3, b3), _ = in_process.take(0, 0, 3)
  np.testing.assert_array_equal(np.asarray(a3), np.asarray(x3))
  np.testing.assert_array_equal(np.asarray(b3), np.asarray(y3))
  assert in_process.start(3, state) == 'skip'  # another worker count: skips to the batch
  (a2, b2), _ = in_process.take(0, 3, 2)
  np.testing.assert_array_equal(np.asarray(a2), np.asarray(x2))
  np.testing.assert_array_equal(np.asarray(b2), np.asarray(y2))


def test_damaged_pipeline_state_falls_back_to_the_previous_checkpoint(tmp_path, capsys):
  ckpt = Checkpointer(str(tmp_path), keep=3)
  tree = {'w': np.arange(3.0)}
  for step in (1, 2):
    ckpt.save(step, tree, {'epoch': step}, {'position': step, 'iterator': {'next_index': step}})
  for f in (tmp_path / 'checkpoints' / '2' / 'data').rglob('*'):
    if f.is_file() and 'next_index' in f.read_text(errors='ignore'):
      f.write_text(f.read_text().replace('"next_index": 2', '"next_index": 9'))
  _, meta, data = ckpt.restore(tree, {}, with_data=True)
  assert data == {'position': 1, 'iterator': {'next_index': 1}} and meta['epoch'] == 1
  assert 'checkpoint step 2' in capsys.readouterr().out


def test_two_processes_read_disjoint_shards_covering_each_batch(straight, tmp_path):
  """Two JAX processes (gloo, as tests/test_scale.py's multi-host test): each reads only its
  share of every global batch; together they read the one-process epoch, batch by batch; and
  an epoch trained so (pmap over both) ends where the one-process run's first epoch does."""
  env = dict(
    os.environ,
    XLA_FLAGS='--xla_force_host_platform_device_count=1',
    JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo',
  )
  import socket

  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  procs = [
    subprocess.Popen(
      [sys.executable, __file__, str(tmp_path), str(port), str(i)],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=120)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outs
  a, b = (np.load(tmp_path / f'ids{i}.npy') for i in range(2))  # (steps, B/2) each
  one = shard_ids(config_lib.finalize(config(parallel='shard_map')), 0, 1)  # (steps, B)
  assert a.shape == b.shape == (one.shape[0], one.shape[1] // 2)
  assert not set(a.ravel()) & set(b.ravel())
  for s in range(len(one)):
    np.testing.assert_array_equal(np.sort(np.concatenate([a[s], b[s]])), np.sort(one[s]))
  assert len(set(one.ravel())) == one.size  # the epoch reads each example at most once
  a, b = records(straight[0])[0], records(tmp_path / 'run')[0]
  assert a['epoch'] == b['epoch'] == 1 and abs(a['test_accuracy'] - b['test_accuracy']) <= 0.01
  np.testing.assert_allclose(a['val_loss'], b['val_loss'], rtol=1e-4)


def shard_ids(c, index: int, count: int) -> np.ndarray:
  """The example indices process `index` of `count` reads in epoch 1 (its local batches)."""
  data = stream.load(c)
  steps = len(data.train) // c.batch_size
  ds = stream.train_dataset(data.train, c.batch_size, steps, 2, c.seed, True, index, count)
  return np.stack([ds[steps + s]['index'] for s in range(steps)])


def test_real_mnist_epoch_streamed(data_dir, tmp_path):
  c = load_config(
    'mnist_mlp_bp',
    pipeline='stream',
    data_dir=data_dir,
    num_epochs=1,
    train_subset=8192,
    batch_size=64,
    steps_per_call=32,
    progress=False,
    **{'data.val_fraction': 0.02, 'mlp.hidden': (256,), 'data.threads': 2},
  )
  data = stream.load(config_lib.finalize(c))
  assert (len(data.train), len(data.val), len(data.test)) == (8192, 1200, 10000)
  images, labels = data.val.head(16)  # decoded and normalised as `data.load` does, bitwise
  raw = [data.val.decode.source[int(i)] for i in data.val.ids[:16]]
  raw = data_lib.Split(np.stack([r['image'] for r in raw]), np.array([r['label'] for r in raw]))
  expected = data_lib._normalise(raw, *data_lib.TFDS['mnist'][1:3])
  np.testing.assert_array_equal(images, expected.images)
  np.testing.assert_array_equal(labels, expected.labels)
  final = train.train_and_evaluate(c, str(tmp_path))
  assert final['test_accuracy'] >= 0.85, final


if __name__ == '__main__':  # one process of the two-process test
  out, port, index = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
  jax.distributed.initialize(f'127.0.0.1:{port}', 2, index)
  from ccl_jax.parallel import DataParallel

  c = config_lib.finalize(config(parallel='shard_map'))
  assert jax.process_index() == index and jax.process_count() == 2
  data = stream.load(c)
  steps = len(data.train) // c.batch_size
  feed = stream.TrainFeed(c, data.train, steps, DataParallel('shard_map'))
  feed.start(steps)  # epoch 1, read by this process's own iterator
  ids = np.stack([next(feed.iterator)['index'] for _ in range(steps)])
  feed.start(steps)
  (images, labels), state = feed.take(1, 0, 2)
  assert images.shape == (2, c.batch_size, 8, 8, 1) and labels.shape == (2, c.batch_size)
  assert state['position'] == steps + 2
  np.save(out / f'ids{index}.npy', ids)
  feed.close()
  train.train_and_evaluate(config(parallel='pmap', num_epochs=1), str(out / 'run'))
