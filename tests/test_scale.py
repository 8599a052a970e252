"""Scale and durability: parallel modes agree, exact resume after SIGKILL, bad checkpoints, NaN."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ccl_jax import data as data_lib
from ccl_jax import rules, train
from ccl_jax import step as step_lib
from ccl_jax.checkpoint import Checkpointer
from ccl_jax.errors import UserError
from ccl_jax.parallel import DataParallel
from ccl_jax.rules.base import Task

from conftest import ROOT, load_config

DEVICES = 8


def in_subprocess_with_devices(test_id: str) -> None:
  """Re-runs one test in a fresh interpreter with 8 simulated CPU devices."""
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={DEVICES}')
  out = subprocess.run(
    [
      sys.executable,
      '-m',
      'pytest',
      '-q',
      '-x',
      '-p',
      'no:cacheprovider',
      f'{__file__}::{test_id}',
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=1800,  # every rule's compiles, on a loaded 2-core CI machine
  )
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]


# pmap as well for: plain gradients, CCL's pair loss, WM's noise, the local losses' similarity
# matrices, DFA's broadcast error, TP's feedback steps, and BatchNorm over the global batch.
PMAP_CASES = {
  ('bp', None),
  ('ccl', None),
  ('wm', None),
  ('predsim', None),
  ('dfa', None),
  ('dtp', None),
  ('bp', 'resnet20'),
}


# The conv cases use XLA's convolution: it compiles several times faster on CPU than the
# default Winograd one, holds no cross-device term, and equals it (tests/test_conv_impl.py).
XLA_CONV = {'conv_impl': 'xla'}
EVERY_RULE_CASES = [(rule, {}) for rule in rules.names()] + [
  ('predsim', {'model': 'vgg8b', 'vgg.feat_mult': 1 / 32, **XLA_CONV}),  # conv BN, channel stds
  ('predsim', {'local.bio': True}),
  ('ccl', {'model': 'cnn', 'cnn.channels': (4, 8), **XLA_CONV}),  # the gathered ĤĤᵀ term
  ('ccl', {'model': 'cnn', 'cnn.channels': (4, 8), 'ccl.filter_target': 0.1, **XLA_CONV}),
  ('bp', {'model': 'resnet20', 'resnet.width_mult': 0.25, **XLA_CONV}),  # global-batch BatchNorm
  ('kp', {'model': 'resnet20', 'resnet.width_mult': 0.25, **XLA_CONV}),
]
PARTS = 3  # the cases in 3 interleaved parts, so parallel test workers can share them


@pytest.mark.heavy
@pytest.mark.parametrize('part', range(PARTS))
def test_pmap_shard_map_and_single_device_agree_for_every_rule(part):
  """Three steps of every rule on a fixed global batch: pmap and shard_map equal one device.

  Covers custom-VJP rules (FA/sign/KP/WM) and WM's per-step noise, which must be the same on
  every device, and the local-loss rules' batch norm and batch similarity matrices, which must
  see the global batch. Every case runs under shard_map; pmap, which reaches the rules through
  the same `BatchAxis`, runs for one case of each kind of cross-device term (PMAP_CASES)."""
  if jax.device_count() < DEVICES:
    return in_subprocess_with_devices(
      f'test_pmap_shard_map_and_single_device_agree_for_every_rule[{part}]'
    )
  cases = EVERY_RULE_CASES[part::PARTS]
  for rule, extra in cases:
    # No clipping: clipping would normalise away a wrong (summed) gradient average.
    config = load_config(
      'default',
      rule=rule,
      mlp__hidden=(32, 16),
      batch_size=32,
      wm__init_steps=2,
      data__crop_pad=1,
      data__flip=True,
      **{
        'optimizer.forward.clip': 0.0,
        'optimizer.feedback.clip': 0.0,
        'optimizer.forward.lr': 0.1,
        'optimizer.feedback.lr': 0.1,
      },
      **extra,
    )
    data = data_lib.load(config)
    task = Task(data.num_classes, data.image_shape, total_steps=100)
    idx = np.arange(3 * 32).reshape(3, 32)  # 3 steps of a fixed global batch order
    finals = {}
    modes = ('pmap', 'shard_map') if (rule, extra.get('model')) in PMAP_CASES else ('shard_map',)
    # One initial state for every mode (init holds no cross-device term), jitted: eager conv
    # inits cost more than the steps.
    sample = {
      'image': jnp.asarray(data.train.images[:4]),
      'label': jnp.asarray(data.train.labels[:4]),
    }
    init = step_lib.build(config, task, DataParallel('none').batch_axis).init
    state0 = jax.device_get(jax.jit(init)(jax.random.PRNGKey(0), sample))  # steps donate state
    for mode in ('none',) + modes:
      para = DataParallel(mode)
      r = step_lib.build(config, task, para.batch_axis)
      state = para.put_state(state0)
      step = para.compile(train.make_chunk(r.update, augment=data_lib.augmenter(config)))
      state, metrics = step(
        state,
        para.put_data(data.train.images),
        para.put_data(data.train.labels),
        para.split_idx(idx),
      )
      final = jax.device_get(para.get_state(state))
      finals[mode] = (final.params, final.extra, para.get_metrics(metrics))
    for mode in modes:
      jax.tree.map(
        lambda a, b: np.testing.assert_allclose(
          a, b, rtol=1e-4, atol=1e-5, err_msg=f'{rule} {extra} {mode}'
        ),
        finals[mode],
        finals['none'],
      )


def test_batch_that_does_not_divide_over_devices_is_refused():
  if jax.device_count() < DEVICES:
    return in_subprocess_with_devices('test_batch_that_does_not_divide_over_devices_is_refused')
  with pytest.raises(UserError, match='batch_size=30 does not divide over 8 devices'):
    DataParallel('shard_map').check_batch(30)


def run_main(workdir, *flags: str, **kw):
  return subprocess.Popen(
    [sys.executable, '-m', 'ccl_jax.main', f'--workdir={workdir}', *flags],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    **kw,
  )


def final_tree(workdir) -> dict:
  ckpt = Checkpointer(str(workdir), write=False)
  step = ckpt.steps()[-1]
  return ckpt.manager.restore(step, args=ocp.args.Composite(tree=ocp.args.StandardRestore()))[
    'tree'
  ]


@pytest.mark.heavy
def test_sigkill_then_resume_is_bit_identical(tmp_path):
  flags = (
    '--config.num_epochs=8',
    '--config.mlp.hidden=(512,512)',
    '--config.keep_checkpoints=3',
    '--config.checkpoint_every_steps=7',
  )  # mid-epoch checkpoints too
  straight = run_main(tmp_path / 'straight', *flags)
  assert straight.wait(timeout=600) == 0, straight.stdout.read()

  killed = run_main(tmp_path / 'killed', *flags)
  ckpts = tmp_path / 'killed' / 'checkpoints'
  deadline = time.time() + 300
  while time.time() < deadline and killed.poll() is None:
    if ckpts.is_dir() and len([p for p in ckpts.iterdir() if p.name.isdigit()]) >= 2:
      break
    time.sleep(0.01)
  assert killed.poll() is None, 'the run finished before it could be killed'
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  resumed = run_main(tmp_path / 'killed', *flags)
  out = resumed.communicate(timeout=600)[0]
  assert resumed.returncode == 0, out
  assert 'resumed from' in out and 'at step 160' not in out, out

  a, b = final_tree(tmp_path / 'straight'), final_tree(tmp_path / 'killed')
  jax.tree.map(np.testing.assert_array_equal, a, b)
  # Every per-epoch record matches too (the resumed epoch's training means included).
  assert records(tmp_path / 'straight') == records(tmp_path / 'killed')


def records(workdir) -> list[dict]:
  """metrics.jsonl without the wall-clock keys."""
  out = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  for r in out:
    r.pop('samples_per_second', None), r.pop('epoch_train_seconds', None)
  return out


def final_record(workdir) -> dict:
  return records(workdir)[-1]


def small(tmp_path, **kw):
  return load_config('default', mlp__hidden=(32,), progress=False, **kw)


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, capsys):
  train.train_and_evaluate(small(tmp_path, num_epochs=2), str(tmp_path))
  steps = Checkpointer(str(tmp_path), write=False).steps()
  assert len(steps) == 2
  latest = tmp_path / 'checkpoints' / str(steps[-1])
  for f in latest.rglob('*'):
    if f.is_file() and 'meta' not in f.parts:
      f.write_bytes(b'\0garbage')
  capsys.readouterr()
  final = train.train_and_evaluate(small(tmp_path, num_epochs=3), str(tmp_path))
  out = capsys.readouterr().out
  assert f'checkpoint step {steps[-1]}' in out and 'falling back' in out, out
  assert f'resumed from {tmp_path / "checkpoints"} at step {steps[0]}' in out, out
  assert final['epoch'] == 3


def test_checkpoint_of_another_shape_is_refused(tmp_path):
  train.train_and_evaluate(small(tmp_path, num_epochs=1), str(tmp_path))
  with pytest.raises(UserError, match=r'does not fit this config.*changed keys: mlp.hidden'):
    train.train_and_evaluate(
      load_config('default', mlp__hidden=(48,), num_epochs=2, progress=False), str(tmp_path)
    )


@pytest.mark.parametrize('rule,where', [('bp', 'loss'), ('ccl', 'layer_loss/')])
def test_non_finite_loss_stops_with_step_rule_and_layer(rule, where, tmp_path):
  config = small(tmp_path, rule=rule, num_epochs=3)
  config.optimizer.forward.lr = config.optimizer.feedback.lr = 1e30
  config.optimizer.forward.clip = config.optimizer.feedback.clip = 0.0
  with pytest.raises(
    UserError, match=rf'non-finite loss at step \d+ .*rule {rule}\), first in {where}'
  ):
    train.train_and_evaluate(config, str(tmp_path))


def test_finished_run_prints_results_instead_of_retraining(tmp_path):
  flags = ('--config.num_epochs=2', '--config.mlp.hidden=(32,)')
  first = run_main(tmp_path, *flags)
  assert first.wait(timeout=300) == 0
  again = run_main(tmp_path, *flags)
  out = again.communicate(timeout=300)[0]
  assert again.returncode == 0
  assert 'already holds a finished run' in out and 'final: test_accuracy=' in out, out
  assert 'epoch 1/2' not in out


def free_port() -> int:
  import socket

  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.parametrize('mode', ['shard_map', 'pmap'])
def test_two_processes_match_one(mode, tmp_path):
  """Multi-host on one machine: 2 processes × 2 CPU devices, gloo collectives, one writer."""
  flags = ('--config.num_epochs=2', '--config.mlp.hidden=(64,)')
  single = run_main(tmp_path / 'single', *flags)
  assert single.wait(timeout=300) == 0
  env = dict(
    os.environ,
    XLA_FLAGS='--xla_force_host_platform_device_count=2',
    JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo',
  )
  port = free_port()
  procs = [
    run_main(
      tmp_path / 'multi',
      *flags,
      '--jax_distributed',
      f'--config.parallel={mode}',
      f'--coordinator_address=127.0.0.1:{port}',
      '--num_processes=2',
      f'--process_id={i}',
      env=env,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outs
  a, b = final_record(tmp_path / 'single'), final_record(tmp_path / 'multi')
  assert abs(a['test_accuracy'] - b['test_accuracy']) <= 0.01, (a, b)
  np.testing.assert_allclose(a['best_val_loss'], b['best_val_loss'], rtol=1e-3)
  assert len((tmp_path / 'multi' / 'metrics.jsonl').read_text().splitlines()) == 3  # one writer


def test_keys_added_to_the_package_keep_old_checkpoints_resumable():
  from ccl_jax import config as config_lib
  from ccl_jax.checkpoint import changed_keys, config_to_json

  now = config_to_json(config_lib.base())
  old = {
    **now,
    'local': {k: v for k, v in now['local'].items() if k != 'dropout'},
    'ccl': {k: v for k, v in now['ccl'].items() if k != 'loss_warmup_steps'},
  }
  old['optimizer'] = {
    t: {k: v for k, v in o.items() if k != 'milestones'} for t, o in now['optimizer'].items()
  }
  assert changed_keys(old, now) == []
  assert changed_keys(old, {**now, 'local': {**now['local'], 'dropout': 0.3}}) == ['local.dropout']
  assert changed_keys(now, {**now, 'seed': 1}) == ['seed']
