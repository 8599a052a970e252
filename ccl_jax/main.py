"""Command-line entry: `python -m ccl_jax.main --config configs/cifar10_ccl.py --workdir DIR`."""

from __future__ import annotations

import glob
import os
import re
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from ccl_jax import workdir as workdir_lib

DEFAULT_CONFIG = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs', 'default.py'
)
FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Where the run writes; default runs/<config>-<time>.')
flags.DEFINE_bool('jax_distributed', False, 'Call jax.distributed.initialize() (multi-host).')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (auto on TPU/Slurm).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (auto on TPU/Slurm).')
flags.DEFINE_integer('process_id', None, 'This process (auto on TPU/Slurm).')
flags.DEFINE_bool('list', False, 'List the experiment configs and every config key, then exit.')


def listing() -> str:
  """The experiment configs (with their docstrings) and every config key with its doc."""
  from ccl_jax import config as config_lib

  lines = [f'Experiment configs (--config FILE) in {_shown(os.path.dirname(DEFAULT_CONFIG))}/:']
  for path in sorted(glob.glob(os.path.join(os.path.dirname(DEFAULT_CONFIG), '*.py'))):
    with open(path) as f:
      doc = f.read().split('"""')
    lines.append(f'  {os.path.basename(path):32s} {doc[1].strip() if len(doc) > 2 else ""}')
  return '\n'.join(lines + ['', config_lib.describe()])


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.ERROR)  # keep JAX's backend probing and tfds chatter out
  if FLAGS.list:
    print(listing())
    return
  if FLAGS.jax_distributed:
    import jax

    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  from ccl_jax import cpu_tuning, train  # after flags: keeps --help fast

  cpu_tuning.tune_allocator()  # this process's malloc: XLA:CPU's large buffers stay mapped

  path = config_flags.get_config_filename(FLAGS['config'])
  try:
    config = FLAGS.config
    config.get('rule')  # config_flags defers an OSError while loading to first access
  except Exception as e:
    where = _config_load_error(e, path)
    sys.exit('error: ' + (where or 'cannot load --config: ' + ' '.join(str(e).split()[-8:])))
  name = os.path.splitext(os.path.basename(path))[0]
  is_main = True
  if FLAGS.jax_distributed:
    import jax

    is_main = jax.process_index() == 0
    if not FLAGS.workdir and jax.process_count() > 1:
      sys.exit('error: a multi-process run needs --workdir, one folder all processes share')
  workdir_lib.run_in(
    FLAGS.workdir or workdir_lib.default_name(name),
    lambda w: train.train_and_evaluate(config, w),
    is_main,
  )


def _config_path(argv: list[str]) -> str:
  """The --config file named in `argv` (without a `:args` suffix), else the default."""
  path = DEFAULT_CONFIG
  for i, a in enumerate(argv[1:], 1):
    if a in ('--config', '-config') and i + 1 < len(argv):
      path = argv[i + 1]
    elif a.startswith(('--config=', '-config=')):
      path = a.split('=', 1)[1]
  return path.split(':', 1)[0]


def _shown(path: str) -> str:
  rel = os.path.relpath(path)
  return path if rel.startswith('..') else rel


def _config_load_error(e: BaseException, path: str) -> str | None:
  """'FILE line N: what went wrong' if `e`, or an exception it came from, arose running the
  config file `path`; 'cannot load --config FILE: no such file' if it is missing; else None."""
  if not os.path.isfile(path):
    return f'cannot load --config {_shown(path)}: no such file'
  target = os.path.realpath(path)
  same = lambda f: bool(f) and os.path.realpath(f) == target
  chain, seen = [], set()
  while e is not None and id(e) not in seen:  # ml_collections and absl re-raise `from` it
    seen.add(id(e))
    chain.append(e)
    e = e.__cause__ or e.__context__
  for exc in chain:
    if isinstance(exc, SyntaxError) and same(exc.filename):
      return f'{_shown(path)} line {exc.lineno}: {exc.msg}'
  for exc in chain:
    lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if same(f.filename)]
    if lines:
      text = str(exc).strip().splitlines()
      return f'{_shown(path)} line {lines[-1]}: {type(exc).__name__}' + (
        f': {text[0]}' if text else ''
      )
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with a bad --config.key=value reported in one line."""
  try:
    if 'config' not in FLAGS:  # defining it already applies --config.* overrides from argv
      config_flags.DEFINE_config_file(
        'config',
        DEFAULT_CONFIG,
        'Experiment config file (--list shows them and every key).',
        lock_config=True,
      )
    return FLAGS(argv)
  except Exception as e:  # a config file that fails to run surfaces here, named with its line
    where = _config_load_error(e, _config_path(argv))
    if where is None and isinstance(e, flags.Error):
      where = ' '.join(str(e).split())
    if where is not None:
      sys.exit(f'error: {where}')
    # ml_collections raises AttributeError/KeyError/TypeError on bad overrides
    text = str(e.args[0] if e.args else e).splitlines()[0].strip('"\'')
    key = re.findall(r"'([^']+)'", text)
    key = key[0] if key else text
    culprit = [a for a in argv[1:] if a.startswith('--config') and key in a]
    where = culprit[0] if culprit else ' '.join(a for a in argv[1:] if a.startswith('--config'))
    sys.exit(
      f'error: bad config flag {where}: {type(e).__name__} {key!r} '
      '(unknown key, unreadable config file, or a value of the wrong type)'
    )


def run() -> None:
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
