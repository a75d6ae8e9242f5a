"""Test set-up: 8 fake CPU devices (for sharding tests), strict rank promotion, quiet logs."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# programs that tests run (python -m drc_jax.main) keep their compiled programs here, not in ~
os.environ.setdefault(
  'DRC_JAX_CACHE_DIR',
  os.path.join(os.environ.get('TMPDIR', '/tmp'), f'drc_jax_test_cache_{os.getuid()}'),
)

from drc_jax.core import config_base, parallel  # noqa: E402  (imports jax; its backend starts later)

parallel.set_cpu_defaults()  # the XLA defaults the entry points set

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update('jax_numpy_rank_promotion', 'raise')
# Identical programs compiled by different tests (each train()/audit() call builds its own jit)
# are compiled once per session through the persistent cache.
jax.config.update('jax_compilation_cache_dir', os.environ['DRC_JAX_CACHE_DIR'])
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg: str | None = None):
  """Loads configs/<name>.py[:arg] the way --config does."""
  path = os.path.join(REPO, 'configs', f'{name}.py')
  return config_base.load_config(f'{path}:{arg}' if arg else path)


@pytest.fixture
def fmnist_local():
  """The embedded default shrunk to a smoke run (real Fashion-MNIST images, tiny UNet)."""
  return load_config('fashion_mnist', 'runlocal')
