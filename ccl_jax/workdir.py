"""The run's folder: created and checked before training, locked for the run's life.

`prepare` turns a file, a read-only or unwritable path into one `UserError` line. `Lock` holds an
exclusive `flock` on `workdir/.lock`; the kernel drops it when the holder dies, so a lock file
left by a killed run never blocks the next one.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import socket
import sys
import tempfile
import time
from collections.abc import Callable

from ccl_jax.errors import UserError

LOCK_NAME = '.lock'


def default_name(config_name: str) -> str:
  """`runs/<config>-<YYYYmmdd-HHMMSS>-<pid>-<random>`: unique even for runs started together."""
  stamp = time.strftime('%Y%m%d-%H%M%S')
  return os.path.join('runs', f'{config_name}-{stamp}-{os.getpid()}-{secrets.token_hex(2)}')


def _cause(e: OSError) -> str:
  return e.strerror or str(e) or type(e).__name__


def prepare(path: str) -> str:
  """Creates `path` (and its parents) and checks that a file can be written there; returns it."""
  if not path:
    raise UserError('empty --workdir; name a folder')
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f'workdir {path!r} is a file, not a folder; choose another --workdir')
  try:
    os.makedirs(path, exist_ok=True)
  except FileExistsError:
    raise UserError(f'workdir {path!r} is a file, not a folder; choose another --workdir') from None
  except NotADirectoryError:
    raise UserError(
      f'workdir {path!r}: a parent of it is a file, not a folder; choose another --workdir'
    ) from None
  except OSError as e:
    raise UserError(
      f'cannot create workdir {path!r}: {_cause(e)}; choose another --workdir'
    ) from None
  try:  # os.access is no proof (root, read-only mounts, ACLs): write a file
    with tempfile.TemporaryFile(dir=path, prefix='.write-test-'):
      pass
  except OSError as e:
    raise UserError(
      f'workdir {path!r} is not writable: {_cause(e)}; choose another --workdir'
    ) from None
  return path


def remove_if_empty(path: str) -> bool:
  """Removes `path` if it holds nothing but a lock file; True if it was removed."""
  try:
    names = os.listdir(path)
    if set(names) - {LOCK_NAME}:
      return False
    if names:
      os.unlink(os.path.join(path, LOCK_NAME))
    os.rmdir(path)
    return True
  except OSError:
    return False


class Lock:
  """`with Lock(workdir):` one run per workdir; a second gets a `UserError` naming the holder.

  Only process 0 of a multi-process run locks (`enabled=False` on the others): they share the
  workdir by design.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.path = os.path.join(workdir, LOCK_NAME)
    self.workdir = workdir
    self.enabled = enabled
    self._fd: int | None = None

  def holder(self) -> dict:
    """What the lock file says about its (last) holder: pid, host, started; {} if unreadable."""
    try:
      with open(self.path) as f:
        info = json.loads(f.read() or '{}')
      return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
      return {}

  def acquire(self) -> None:
    if not self.enabled or self._fd is not None:
      return
    for _ in range(10):  # retried only if the file is replaced between open and flock
      try:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      except OSError as e:
        raise UserError(
          f'cannot lock workdir {self.workdir!r}: {_cause(e)} ({self.path}); '
          'choose another --workdir'
        ) from None
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
          raise UserError(self._busy_message()) from None
        print(
          f'warning: cannot lock workdir {self.workdir} ({_cause(e)}: the file system has no '
          'locks); make sure no other run uses it',
          flush=True,
        )
        return
      try:  # the file we locked must still be the one at self.path
        same = os.path.samestat(os.fstat(fd), os.stat(self.path))
      except OSError:
        same = False
      if same:
        break
      os.close(fd)
    else:
      raise UserError(f'cannot lock workdir {self.workdir!r}: its lock file keeps changing')
    info = {
      'pid': os.getpid(),
      'host': socket.gethostname(),
      'started': time.strftime('%Y-%m-%d %H:%M:%S'),
    }
    try:  # stale content of a dead holder is simply overwritten
      os.ftruncate(fd, 0)
      os.pwrite(fd, (json.dumps(info) + '\n').encode(), 0)
    except OSError:
      pass  # the flock itself is the lock; the note is for the message of a refused run
    self._fd = fd

  def _busy_message(self) -> str:
    info = self.holder()
    pid = info.get('pid')
    who = f'process {pid}' if pid else 'another process'
    if info.get('host') and info.get('host') != socket.gethostname():
      who += f' on {info["host"]}'
    when = f' (started {info["started"]})' if info.get('started') else ''
    return (
      f'workdir {self.workdir} is in use by {who}{when}; wait for it, or choose another --workdir'
    )

  def release(self) -> None:
    """Removes the lock file, then unlocks (`acquire` retries if its file was removed)."""
    if self._fd is not None:
      fd, self._fd = self._fd, None
      try:
        if os.path.samestat(os.fstat(fd), os.stat(self.path)):
          os.unlink(self.path)
      except OSError:
        pass
      try:
        fcntl.flock(fd, fcntl.LOCK_UN)
      finally:
        os.close(fd)

  def __enter__(self) -> Lock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def run_in(workdir: str, fn: Callable[[str], object], is_main: bool = True) -> None:
  """Runs `fn(workdir)` in a prepared, locked workdir; every failure a user can cause, a full
  disk included, ends in one line and a non-zero exit. Nothing saved is deleted; only a workdir
  this call created and left empty is removed again."""
  created = not os.path.lexists(workdir)
  try:
    prepare(workdir)
    with Lock(workdir, enabled=is_main):
      fn(workdir)
    return
  except UserError as e:
    message = f'error: {e}'
  except KeyboardInterrupt:
    message = f'interrupted; resume with the same --workdir {workdir}'
  except BaseException as e:
    os_error = _os_error_of(e) if isinstance(e, Exception) else None
    if os_error is None:  # a bug: its traceback is wanted
      if created and is_main:
        remove_if_empty(workdir)
      raise
    message = f'error: {_os_error_line(os_error)}'
  if created and is_main and remove_if_empty(workdir):
    message = message.replace(f'; resume with the same --workdir {workdir}', ' (nothing was saved)')
  sys.exit(message)


def _os_error_of(e: BaseException) -> OSError | None:
  """The OSError behind `e`: itself, one it came from, or one TensorStore (Orbax's writer)
  reports as text with `os_error_code='N'` (a full disk while checkpointing)."""
  chain, seen = [], set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    chain.append(e)
    e = e.__cause__ or e.__context__
  for exc in chain:
    if isinstance(exc, OSError):
      return exc
  for exc in chain:
    code = re.search(r"os_error_code='(\d+)'", str(exc))
    if code:
      files = re.findall(r'"(/[^"]+)"', str(exc))
      number = int(code.group(1))
      return OSError(number, os.strerror(number), files[-1] if files else None)
  return None


def _os_error_line(e: OSError) -> str:
  """`<strerror>: <filename>` (plus what to do for a full disk) on one line."""
  what = e.strerror or (str(e).splitlines()[0] if str(e) else type(e).__name__)
  line = f'{what}: {e.filename}' if e.filename else what
  if e.errno in (errno.ENOSPC, errno.EDQUOT):
    line += '; free some space, then rerun with the same --workdir to resume'
  return line
