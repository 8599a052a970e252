"""Command-line entry: `python -m ccl_jax.main --config configs/cifar10_ccl.py --workdir DIR`."""

from __future__ import annotations

import os
import re
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from ccl_jax.errors import UserError

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              'configs', 'default.py')
FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Where the run writes; default runs/<config>-<time>.')
flags.DEFINE_bool('jax_distributed', False, 'Call jax.distributed.initialize() (multi-host).')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (auto on TPU/Slurm).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (auto on TPU/Slurm).')
flags.DEFINE_integer('process_id', None, 'This process (auto on TPU/Slurm).')


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.ERROR)  # keep JAX's backend probing and tfds chatter out
  if FLAGS.jax_distributed:
    import jax
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  from ccl_jax import train  # after flags: keeps --help fast
  try:
    config = FLAGS.config
    config.get('rule')  # config_flags defers loading errors to first access
  except OSError as e:  # config_flags defers a bad --config file to first access
    sys.exit('error: cannot load --config: ' + ' '.join(str(e).split()[-8:]))
  name = os.path.splitext(os.path.basename(config_flags.get_config_filename(FLAGS['config'])))[0]
  workdir = FLAGS.workdir or os.path.join('runs', f'{name}-{time.strftime("%Y%m%d-%H%M%S")}')
  try:
    train.train_and_evaluate(config, workdir)
  except UserError as e:
    sys.exit(f'error: {e}')
  except KeyboardInterrupt:
    sys.exit(f'interrupted; resume with the same --workdir {workdir}')


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with a bad --config.key=value reported in one line."""
  try:
    if 'config' not in FLAGS:  # defining it already applies --config.* overrides from argv
      config_flags.DEFINE_config_file('config', DEFAULT_CONFIG, 'Experiment config file.',
                                      lock_config=True)
    return FLAGS(argv)
  except flags.Error as e:
    sys.exit('error: ' + ' '.join(str(e).split()))
  except Exception as e:  # ml_collections raises AttributeError/KeyError/TypeError on overrides
    text = str(e.args[0] if e.args else e).splitlines()[0].strip('"\'')
    key = re.findall(r"'([^']+)'", text)
    key = key[0] if key else text
    culprit = [a for a in argv[1:] if a.startswith('--config') and key in a]
    where = culprit[0] if culprit else ' '.join(a for a in argv[1:] if a.startswith('--config'))
    sys.exit(f'error: bad config flag {where}: {type(e).__name__} {key!r} '
             '(unknown key, unreadable config file, or a value of the wrong type)')


def run() -> None:
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
