"""Runs nobody can corrupt: the workdir lock, checkpoint checksums, one-line failures.

The CLI tests run `python -m ccl_jax.main` on the embedded default config (digits) for 3 epochs;
the rest test `workdir`, `Checkpointer` and `main.run_in` directly. About a minute on 2 CPUs.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from ccl_jax import workdir as workdir_lib
from ccl_jax.checkpoint import Checkpointer
from ccl_jax.errors import UserError

# One parallel test worker for the whole file: its tests share a module fixture.
pytestmark = pytest.mark.xdist_group('reliability')

ROOT = pathlib.Path(__file__).resolve().parents[1]
EPOCHS = 3


def cli(workdir, *flags: str, timeout: float = 180) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, '-m', 'ccl_jax.main', '--workdir', str(workdir), *flags],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def one_line_error(p: subprocess.CompletedProcess) -> str:
  """The failure's last stderr line, after checking it failed in one line, without a traceback."""
  assert p.returncode != 0, p.stdout + p.stderr
  assert 'Traceback' not in p.stdout + p.stderr, p.stderr
  last = p.stderr.strip().splitlines()[-1]
  assert last.startswith('error:'), p.stderr
  return last


def epoch_records(workdir) -> tuple[list[int], list[dict]]:
  records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  return [r['epoch'] for r in records if not r.get('final')], [r for r in records if r.get('final')]


def steps_of(workdir) -> list[int]:
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit())


def largest_file(folder) -> str:
  files = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs]
  return max(files, key=os.path.getsize)


def overwrite_middle(path: str, data: bytes) -> None:
  n = os.path.getsize(path)
  with open(path, 'r+b') as f:
    f.seek(n // 2)
    f.write(data[: max(1, n - n // 2)])


def flip_bit(path: str) -> None:
  n = os.path.getsize(path)
  with open(path, 'r+b') as f:
    f.seek(n // 2)
    byte = f.read(1)[0]
    f.seek(n // 2)
    f.write(bytes([byte ^ 0x08]))


def wait_for(predicate, timeout: float, what: str) -> None:
  deadline = time.monotonic() + timeout
  while not predicate():
    if time.monotonic() > deadline:
      raise AssertionError(f'timed out waiting for {what}')
    time.sleep(0.1)


# -- workdir ---------------------------------------------------------------------------------------
def test_prepare_refuses_a_file_in_one_line(tmp_path):
  (tmp_path / 'f').write_text('x')
  for path in (tmp_path / 'f', tmp_path / 'f' / 'sub'):
    with pytest.raises(UserError) as e:
      workdir_lib.prepare(str(path))
    assert '\n' not in str(e.value) and str(path) in str(e.value) and 'file' in str(e.value)
  assert workdir_lib.prepare(str(tmp_path / 'a' / 'b')) == str(tmp_path / 'a' / 'b')
  assert os.listdir(tmp_path / 'a' / 'b') == []  # the write test leaves nothing behind


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes into a chmod 0o555 folder anyway')
def test_prepare_refuses_a_read_only_workdir(tmp_path):
  ro = tmp_path / 'ro'
  ro.mkdir()
  ro.chmod(0o555)
  try:
    for path in (ro, ro / 'sub'):
      with pytest.raises(UserError) as e:
        workdir_lib.prepare(str(path))
      assert '\n' not in str(e.value) and 'ermission' in str(e.value), e.value
  finally:
    ro.chmod(0o755)


def test_lock_names_the_holder_and_is_released(tmp_path):
  w = str(tmp_path)
  with workdir_lib.Lock(w):
    info = json.load(open(tmp_path / '.lock'))
    assert info['pid'] == os.getpid() and info['host'] and info['started']
    with pytest.raises(UserError) as e:  # a second open file description conflicts, too
      workdir_lib.Lock(w).acquire()
    assert f'in use by process {os.getpid()}' in str(e.value) and '\n' not in str(e.value)
    with workdir_lib.Lock(w, enabled=False):  # processes > 0 of a multi-host run
      pass
  assert not (tmp_path / '.lock').exists()
  with workdir_lib.Lock(w):  # free again
    pass


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
  code = (
    'import os, signal, sys; from ccl_jax import workdir; '
    'workdir.Lock(sys.argv[1]).acquire(); os.kill(os.getpid(), signal.SIGKILL)'
  )
  p = subprocess.Popen([sys.executable, '-c', code, str(tmp_path)], cwd=ROOT)
  assert p.wait(timeout=60) == -signal.SIGKILL
  assert json.load(open(tmp_path / '.lock'))['pid'] == p.pid  # left behind
  with workdir_lib.Lock(str(tmp_path)):
    assert json.load(open(tmp_path / '.lock'))['pid'] == os.getpid()


def test_default_names_do_not_collide():
  names = {workdir_lib.default_name('default') for _ in range(50)}
  assert len(names) == 50
  assert all(re.fullmatch(r'runs/default-\d{8}-\d{6}-\d+-[0-9a-f]{4}', n) for n in names)


# -- main.run_in: one line, nothing lost -----------------------------------------------------------
def run_in_message(workdir, error: BaseException) -> str:
  def fail(w):
    raise error

  with pytest.raises(SystemExit) as e:
    workdir_lib.run_in(str(workdir), fail)
  return str(e.value.code)


def test_failed_run_removes_only_the_empty_folder_it_made(tmp_path):
  new = tmp_path / 'new'
  msg = run_in_message(new, UserError('config.seed=-1 must be in [0, 2**32)'))
  assert msg == 'error: config.seed=-1 must be in [0, 2**32)' and not new.exists()
  kept = tmp_path / 'kept'
  kept.mkdir()
  run_in_message(kept, UserError('x'))
  assert kept.is_dir()  # the user's folder stays, even empty
  with pytest.raises(RuntimeError):  # a bug keeps its traceback
    workdir_lib.run_in(str(new), lambda w: (_ for _ in ()).throw(RuntimeError('bug')))
  assert not new.exists()


def test_os_errors_end_in_one_line(tmp_path):
  full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / 'w' / 'metrics.jsonl'))
  msg = run_in_message(tmp_path / 'w', full)
  assert msg.startswith(f'error: No space left on device: {tmp_path}/w/metrics.jsonl')
  denied = PermissionError(errno.EACCES, 'Permission denied', '/x/config.json')
  assert run_in_message(tmp_path / 'w', denied) == 'error: Permission denied: /x/config.json'
  tensorstore = ValueError(  # how Orbax's writer reports a full disk
    'RESOURCE_EXHAUSTED: Error writing "a/0.0" in OCDBT database at local file "/c/40/tree/": '
    'Failed writing: "/c/40/tree/d/6aa6": Failed to write 975366 bytes to file 15: No space '
    "left on device [os_error_code='28']"
  )
  msg = run_in_message(tmp_path / 'w', tensorstore)
  assert msg.startswith('error: No space left on device: /c/40/tree/d/6aa6') and '\n' not in msg


# -- Checkpointer ----------------------------------------------------------------------------------
def small_tree(step: int) -> dict:
  return {'a': np.arange(100_000, dtype=np.float32) + step, 'b': {'c': np.full((3, 4), step)}}


def zeros_like(tree: dict) -> dict:
  return {'a': np.zeros_like(tree['a']), 'b': {'c': np.zeros_like(tree['b']['c'])}}


def test_checksum_detects_damage_in_newest_and_older(tmp_path, capsys):
  ckpt = Checkpointer(str(tmp_path), keep=3)
  for step in (1, 2, 3):
    ckpt.save(step, small_tree(step), {'epoch': step})
  flip_bit(largest_file(tmp_path / 'checkpoints' / '3'))
  overwrite_middle(largest_file(tmp_path / 'checkpoints' / '1'), os.urandom(4096))
  tree, meta = ckpt.restore(zeros_like(small_tree(0)), {})
  np.testing.assert_array_equal(tree['a'], small_tree(2)['a'])
  assert meta == {'epoch': 2}  # checksums stay inside the checkpoint
  warnings = [l for l in capsys.readouterr().out.splitlines() if l.startswith('warning:')]
  assert len(warnings) == 2, warnings
  assert 'step 3' in warnings[0] and 'checksum (damaged)' in warnings[0]
  assert 'falling back to an older one' in warnings[0]
  assert 'step 1' in warnings[1] and 'the newer step 2 is intact' in warnings[1]
  assert ckpt.steps() == [2]
  assert sorted(n.split('-')[0] for n in os.listdir(tmp_path / 'corrupt_checkpoints')) == ['1', '3']


def test_damaged_meta_is_detected(tmp_path, capsys):
  ckpt = Checkpointer(str(tmp_path))
  for step in (1, 2):
    ckpt.save(step, small_tree(step), {'epoch': step, 'best_val_loss': 0.5})
  path = tmp_path / 'checkpoints' / '2' / 'meta' / 'metadata'
  path.write_text(path.read_text().replace('0.5', '0.6'))  # still valid JSON, silently wrong
  _, meta = ckpt.restore(zeros_like(small_tree(0)), {})
  assert meta['epoch'] == 1 and 'checksum (damaged)' in capsys.readouterr().out


def test_checkpoint_without_checksum_restores_silently(tmp_path, capsys):
  import orbax.checkpoint as ocp

  ckpt = Checkpointer(str(tmp_path))
  ckpt.manager.save(
    5,
    args=ocp.args.Composite(  # as written before checksums existed
      tree=ocp.args.StandardSave(small_tree(5)), meta=ocp.args.JsonSave({'epoch': 5})
    ),
    force=True,
  )
  ckpt.manager.wait_until_finished()
  tree, meta = ckpt.restore(zeros_like(small_tree(0)), {})
  np.testing.assert_array_equal(tree['b']['c'], small_tree(5)['b']['c'])
  assert meta == {'epoch': 5} and capsys.readouterr().out == ''


def test_no_good_checkpoint_is_one_line(tmp_path, capsys):
  ckpt = Checkpointer(str(tmp_path))
  for step in (1, 2):
    ckpt.save(step, small_tree(step), {'epoch': step})
    flip_bit(largest_file(tmp_path / 'checkpoints' / str(step)))
  with pytest.raises(UserError) as e:
    ckpt.restore(zeros_like(small_tree(0)), {})
  assert '\n' not in str(e.value) and 'no readable checkpoint' in str(e.value)
  assert 'no older one is left' in capsys.readouterr().out
  assert len(os.listdir(tmp_path / 'corrupt_checkpoints')) == 2  # set aside, not deleted


def test_unreadable_checkpoint_falls_back_without_tracebacks(tmp_path):
  """A truncated file makes Orbax's restore raise mid-read; the in-flight TensorStore reads then
  call back into its closed event loop ('Event loop is closed' tracebacks, now dropped)."""
  code = textwrap.dedent("""
      import os, sys
      import numpy as np
      from ccl_jax.checkpoint import Checkpointer
      tree = lambda s: {f'k{i}': np.full((20_000,), s + i, np.float32) for i in range(8)}
      ckpt = Checkpointer(sys.argv[1])
      for step in (1, 2):
        ckpt.save(step, tree(step), {'epoch': step})
      d = os.path.join(sys.argv[1], 'checkpoints', '2')
      files = [os.path.join(p, f) for p, _, fs in os.walk(d) for f in fs]
      open(max(files, key=os.path.getsize), 'w').close()
      restored, meta = ckpt.restore(tree(0), {})
      print('restored epoch', meta['epoch'], float(restored['k0'][0]))
  """)
  p = subprocess.run(
    [sys.executable, '-c', code, str(tmp_path)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert p.returncode == 0, p.stderr
  assert 'Traceback' not in p.stderr and 'Event loop is closed' not in p.stderr, p.stderr
  lines = p.stdout.strip().splitlines()
  assert len(lines) == 2 and 'step 2' in lines[0] and 'unreadable' in lines[0], lines
  assert lines[1] == 'restored epoch 1 1.0'


# -- the CLI ---------------------------------------------------------------------------------------
def test_second_run_on_a_workdir_refuses_while_the_first_finishes(tmp_path):
  w = tmp_path / 'run'
  first = subprocess.Popen(
    [sys.executable, '-m', 'ccl_jax.main', '--workdir', str(w), f'--config.num_epochs={EPOCHS}'],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  try:

    def locked() -> bool:
      try:
        return json.load(open(w / '.lock')).get('pid') == first.pid
      except (OSError, ValueError):
        return first.poll() is not None

    wait_for(locked, 120, 'the first run to lock its workdir')
    first.send_signal(signal.SIGSTOP)  # holds the lock, deterministically, while the second runs
    try:
      second = cli(w, f'--config.num_epochs={EPOCHS}')
    finally:
      first.send_signal(signal.SIGCONT)
    line = one_line_error(second)
    assert f'in use by process {first.pid}' in line and str(w) in line
    out, _ = first.communicate(timeout=180)
  finally:
    if first.poll() is None:
      first.kill()
  assert first.returncode == 0, out
  epochs, final = epoch_records(w)
  assert epochs == list(range(1, EPOCHS + 1)) and len(final) == 1


@pytest.fixture(scope='module')
def trained(tmp_path_factory) -> pathlib.Path:
  """A finished 3-epoch run, started in a workdir whose lock a killed process left behind."""
  w = tmp_path_factory.mktemp('trained') / 'run'
  w.mkdir()
  code = (
    'import os, signal, sys; from ccl_jax import workdir; '
    'workdir.Lock(sys.argv[1]).acquire(); os.kill(os.getpid(), signal.SIGKILL)'
  )
  subprocess.run([sys.executable, '-c', code, str(w)], cwd=ROOT)
  assert (w / '.lock').exists()
  p = cli(w, f'--config.num_epochs={EPOCHS}')
  assert p.returncode == 0, p.stdout + p.stderr
  return w


def test_stale_lock_does_not_block_a_run(trained):
  epochs, final = epoch_records(trained)
  assert epochs == list(range(1, EPOCHS + 1)) and len(final) == 1
  assert not (trained / '.lock').exists()


@pytest.mark.parametrize('damage', ['random-4k', 'bit-flip'])
def test_damaged_checkpoint_is_set_aside_and_the_run_resumes(trained, tmp_path, damage):
  w = tmp_path / 'run'
  shutil.copytree(trained, w)
  steps = steps_of(w)
  assert len(steps) == 2  # keep_checkpoints defaults to 2
  target = largest_file(w / 'checkpoints' / str(steps[-1]))
  if damage == 'random-4k':
    overwrite_middle(target, os.urandom(4096))
  else:
    flip_bit(target)
  p = cli(w, '--config.num_epochs=5')
  assert p.returncode == 0, p.stdout + p.stderr
  out = p.stdout + p.stderr
  assert 'Traceback' not in out and 'Event loop is closed' not in out, out
  warnings = [l for l in out.splitlines() if l.startswith('warning:')]
  assert len(warnings) == 1 and f'step {steps[-1]}' in warnings[0], out
  assert re.search(r'checksum \(damaged\)|unreadable', warnings[0])
  assert f'at step {steps[0]} ' in out  # resumed from the older one
  aside = os.listdir(w / 'corrupt_checkpoints')
  assert [n.split('-')[0] for n in aside] == [str(steps[-1])]  # set aside, not deleted
  epochs, final = epoch_records(w)
  assert epochs == [1, 2, 3, 4, 5] and len(final) == 1 and final[0]['epoch'] == 5


def test_workdir_that_is_a_file_fails_in_one_line(tmp_path):
  f = tmp_path / 'file'
  f.write_text('x')
  line = one_line_error(cli(f))
  assert str(f) in line and 'is a file' in line
  assert f.read_text() == 'x'


def test_config_with_a_syntax_error_names_file_and_line(tmp_path):
  bad = tmp_path / 'bad_config.py'
  bad.write_text(
    'from ccl_jax import config as config_lib\n\n\ndef get_config():\n'
    '  c = config_lib.base()\n  c.num_epochs = = 3\n  return c\n'
  )
  w = tmp_path / 'run'
  line = one_line_error(cli(w, '--config', str(bad)))
  assert str(bad) in line and 'line 6' in line, line
  line = one_line_error(cli(w, f'--config={bad}', '--config.num_epochs=2'))
  assert str(bad) in line and 'line 6' in line, line
  assert not w.exists()


# -- force_retrain, lr changes after a NaN stop, extending a run (train.resume) --------------------
def test_force_retrain_resumes_its_own_interrupted_run(tmp_path):
  """A killed `force_retrain` run, rerun with the same command, resumes; a finished one restarts."""
  flags = ('--config.force_retrain=True', '--config.num_epochs=30', '--config.mlp.hidden=(512,512)')
  proc = subprocess.Popen(
    [sys.executable, '-m', 'ccl_jax.main', '--workdir', str(tmp_path), *flags],
    cwd=ROOT,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  wait_for(
    lambda: (
      os.path.isdir(tmp_path / 'checkpoints')
      and len(steps_of(tmp_path)) >= 1
      or proc.poll() is not None
    ),
    300,
    'a first checkpoint',
  )
  assert proc.poll() is None, 'the run finished before it could be killed'
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  saved = steps_of(tmp_path)
  again = cli(tmp_path, *flags[:1], '--config.num_epochs=3', '--config.mlp.hidden=(512,512)')
  assert again.returncode == 0, again.stderr
  assert 'resuming it' in again.stdout and f'at step {saved[-1]} ' in again.stdout, again.stdout
  assert not any(p.name.startswith('previous-') for p in tmp_path.iterdir())
  done = cli(tmp_path, *flags[:1], '--config.num_epochs=3', '--config.mlp.hidden=(512,512)')
  assert done.returncode == 0 and 'previous run is finished' in done.stdout, done.stdout
  assert len([p for p in tmp_path.iterdir() if p.name.startswith('previous-')]) == 1


def test_after_a_nan_stop_a_lower_lr_resumes_from_the_last_good_checkpoint(tmp_path):
  ok = cli(tmp_path, '--config.num_epochs=2')
  assert ok.returncode == 0, ok.stderr
  # Continue at an absurd learning rate: the run stops, naming the checkpoint and the way back.
  bad = cli(
    tmp_path,
    '--config.num_epochs=4',
    '--config.optimizer.forward.lr=1e30',
    '--config.resume_override=optimizer.forward.lr',
  )
  line = one_line_error(bad)
  assert 'non-finite loss at step' in line and 'resume from its step 40' in line, line
  assert '--config.resume_override=optimizer.forward.lr' in line, line
  assert steps_of(tmp_path)[-1] == 40  # nothing saved after the blow-up
  # Without the override a changed lr is refused; with it the run finishes from step 40.
  refused = one_line_error(
    cli(tmp_path, '--config.num_epochs=4', '--config.optimizer.forward.lr=0.5')
  )
  assert 'changed keys: optimizer.forward.lr' in refused, refused
  fixed = cli(
    tmp_path,
    '--config.num_epochs=4',
    '--config.optimizer.forward.lr=0.5',
    '--config.resume_override=optimizer.forward.lr',
  )
  assert fixed.returncode == 0 and 'at step 40 ' in fixed.stdout, fixed.stdout + fixed.stderr
  epochs, final = epoch_records(tmp_path)
  assert epochs == [1, 2, 3, 4] and len(final) == 1


def test_extending_a_run_never_moves_its_schedule_silently(tmp_path):
  cosine = (
    '--config.optimizer.forward.schedule=cosine',
    '--config.optimizer.feedback.schedule=cosine',
  )
  assert cli(tmp_path, '--config.num_epochs=2', *cosine).returncode == 0
  line = one_line_error(cli(tmp_path, '--config.num_epochs=4', *cosine))
  assert 'num_epochs 2 -> 4 would move the cosine schedule' in line, line
  assert '--config.resume_override=num_epochs' in line
  extended = cli(tmp_path, '--config.num_epochs=4', *cosine, '--config.resume_override=num_epochs')
  assert extended.returncode == 0, extended.stderr
  assert epoch_records(tmp_path)[0] == [1, 2, 3, 4]
