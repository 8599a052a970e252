"""Test helpers: configs and data paths.

The data-parallel tests start their own subprocesses with 8 simulated CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`); everything else runs on the one default
device, as the CLI does, so numbers match what a user sees.
"""

import importlib.util
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA_DIR = pathlib.Path(
  os.environ.get('CCL_JAX_DATA_DIR', ROOT.parent / 'shared' / 'data' / 'tfds')
)


def load_config(name: str, **overrides):
  """`configs/<name>.py`'s get_config(), with dotted-key overrides ('optimizer.forward.lr'; as a
  keyword, `__` stands for the dot: `mlp__hidden=(5, 4)`)."""
  spec = importlib.util.spec_from_file_location(name, ROOT / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for key, value in overrides.items():
    node = config
    *path, last = key.replace('__', '.').split('.')
    for part in path:
      node = node[part]
    if last not in node:
      raise KeyError(f'configs/{name}.py has no key {key!r}')
    node[last] = value
  return config


@pytest.fixture
def data_dir() -> str:
  """The prepared tfds datasets beside the project (../shared/data/tfds); skip where absent."""
  if not (DATA_DIR / 'mnist').is_dir():
    pytest.skip(f'no prepared tfds data at {DATA_DIR} (set CCL_JAX_DATA_DIR to a prepared copy)')
  return str(DATA_DIR)
