"""Test helpers: configs and data paths.

The data-parallel tests start their own subprocesses with 8 simulated CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`); everything else runs on the one default
device, as the CLI does, so numbers match what a user sees.
"""

import importlib.util
import os
import pathlib
import shutil
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA_DIR = pathlib.Path(
  os.environ.get('CCL_JAX_DATA_DIR', ROOT.parent / 'shared' / 'data' / 'tfds')
)


def pytest_configure(config):
  """One XLA compilation cache for the whole session: both xdist workers and every subprocess a
  test starts (a resumed run, the 8-device re-runs) inherit it, so a program compiled once is
  read back instead of compiled again. It changes no result: the cache holds XLA executables."""
  if hasattr(config, 'workerinput') or 'JAX_COMPILATION_CACHE_DIR' in os.environ:
    return  # an xdist worker (the controller made the cache), or the user chose one
  config._xla_cache = tempfile.mkdtemp(prefix='ccl_jax_test_xla_cache_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = config._xla_cache
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')


def pytest_collection_modifyitems(items):
  """Heavy tests first (a stable sort), so that no test worker starts one as the others finish."""
  items.sort(key=lambda item: item.get_closest_marker('heavy') is None)


def pytest_unconfigure(config):
  if getattr(config, '_xla_cache', None):
    shutil.rmtree(config._xla_cache, ignore_errors=True)
    del os.environ['JAX_COMPILATION_CACHE_DIR']


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
