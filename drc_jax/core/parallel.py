"""Device mesh, shardings and multi-host set-up: batch on P('data'), everything else replicated.

Multi-host runs set ``DRC_JAX_DISTRIBUTED=1`` (the launchers in ``launch/`` do), which makes
``initialize()`` call ``jax.distributed.initialize()``; on Cloud TPU and under SLURM it reads the
coordinator and process ids from the environment, elsewhere from ``DRC_JAX_COORDINATOR``,
``DRC_JAX_NUM_PROCESSES`` and ``DRC_JAX_PROCESS_ID``. Each process then feeds its own slice of
every global batch (``jax.make_array_from_process_local_data``), and only process 0 writes files
shared by all.
"""

from __future__ import annotations

import importlib.metadata
import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

_initialized = False


def set_cpu_defaults() -> None:
  """XLA:CPU runs convolutions through its YNNPACK fusions on one thread; with them off, Eigen's
  convolutions use every core (1.7x on a 3x3 convolution of the default UNet on 2 cores,
  launch/profile_unet.py, docs/measurements.md). Entry points call this before JAX starts its CPU
  backend; importing drc_jax changes nothing. Only for the jaxlib release it was measured on (an
  unknown XLA flag stops XLA), never over a user's own setting; DRC_JAX_XLA_DEFAULTS=0 turns it
  off."""
  if os.environ.get('DRC_JAX_XLA_DEFAULTS', '1') == '0':
    return
  flags = os.environ.get('XLA_FLAGS', '')
  if 'ynn_fusion_type' in flags:
    return
  try:
    major_minor = tuple(int(v) for v in importlib.metadata.version('jaxlib').split('.')[:2])
  except (importlib.metadata.PackageNotFoundError, ValueError):  # leave XLA as it is
    return
  if major_minor == (0, 10):  # the releases this default was measured on
    os.environ['XLA_FLAGS'] = (flags + ' --xla_cpu_experimental_ynn_fusion_type=').strip()


def default_cache_dir() -> str:
  """Where entry points keep compiled programs: ``$DRC_JAX_CACHE_DIR``, else
  ``$XDG_CACHE_HOME/drc_jax/jax`` (``~/.cache/drc_jax/jax``)."""
  if os.environ.get('DRC_JAX_CACHE_DIR'):
    return os.environ['DRC_JAX_CACHE_DIR']
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'drc_jax', 'jax')


def enable_compilation_cache(directory: str) -> None:
  """JAX's persistent compilation cache in ``directory`` ('' = off), so a second run of the same
  programs loads them instead of compiling (the scorer of a config compiles for minutes on a
  CPU). A cache directory the user gave JAX itself (``JAX_COMPILATION_CACHE_DIR``) wins."""
  if not directory or jax.config.jax_compilation_cache_dir:
    return
  jax.config.update('jax_compilation_cache_dir', directory)
  # Every program, the small ones too: a run compiles hundreds of sub-second programs (eager
  # operations, key derivations, metrics), which together cost a repeat run more than its scorer.
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def compilation_cache_dir() -> str:
  """Where JAX keeps compiled programs for later runs now ('' = nowhere): what
  ``enable_compilation_cache`` or the user (``JAX_COMPILATION_CACHE_DIR``) set."""
  return jax.config.jax_compilation_cache_dir or ''


def initialize() -> None:
  """Starts jax.distributed when DRC_JAX_DISTRIBUTED=1 (idempotent)."""
  global _initialized
  if _initialized or os.environ.get('DRC_JAX_DISTRIBUTED', '0') != '1':
    return
  kw = {}
  if os.environ.get('DRC_JAX_COORDINATOR'):
    kw = dict(
      coordinator_address=os.environ['DRC_JAX_COORDINATOR'],
      num_processes=int(os.environ['DRC_JAX_NUM_PROCESSES']),
      process_id=int(os.environ['DRC_JAX_PROCESS_ID']),
    )
  # Must not touch the backend before jax.distributed.initialize(); the CPU collectives setting
  # only matters for CPU devices (tests, CPU clusters) and is harmless on GPU/TPU.
  jax.config.update(
    'jax_cpu_collectives_implementation', os.environ.get('DRC_JAX_CPU_COLLECTIVES', 'gloo')
  )
  jax.distributed.initialize(**kw)
  _initialized = True


def host_allocator() -> str:
  """'tcmalloc' when this process has it loaded (the launchers preload it: launch/tcmalloc.sh),
  else 'default'. On glibc's malloc every XLA:CPU run faults its temporaries in again."""
  try:
    with open('/proc/self/maps') as f:
      return 'tcmalloc' if 'libtcmalloc' in f.read() else 'default'
  except OSError:
    return 'unknown'


def make_mesh(devices=None) -> Mesh:
  """A 1-D ('data',) mesh over ``devices`` (default: every device of every process)."""
  return Mesh(np.asarray(jax.devices() if devices is None else devices), ('data',))


def data_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, field: str) -> None:
  n = jax.device_count()
  if batch_size % n:
    raise ValueError(f'{field}={batch_size} is not divisible by the {n} devices')


def shard_batch(mesh: Mesh, local: np.ndarray) -> jax.Array:
  """A global batch sharded on P('data') from this process's rows."""
  return jax.make_array_from_process_local_data(data_sharding(mesh), np.asarray(local))


def replicate(mesh: Mesh, tree):
  """Puts a pytree (identical on every process) on every device."""
  return jax.device_put(tree, replicated(mesh))


def to_host(x: jax.Array) -> np.ndarray:
  """The full value of a (possibly multi-host sharded) array on every process."""
  if jax.process_count() == 1 or x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def is_writer() -> bool:
  """Only process 0 writes files shared by all processes."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def shardings(mesh: Mesh | None, ins: str, outs: str) -> dict:
  """``jax.jit`` keyword arguments placing a program on ``mesh`` (none when ``mesh`` is None).

  ``ins`` / ``outs``: one letter per argument / result, 'r' replicated (params) or 'd' split on
  the batch axis ('data'); several results give a tuple. The programs are jitted at their program
  boundary (audit, train, bench, sweep), each with one call of ``jax.jit(fn, **shardings(...))``.
  """
  if mesh is None:
    return {}
  kinds = {'r': replicated(mesh), 'd': data_sharding(mesh)}
  out = tuple(kinds[c] for c in outs)
  return {
    'in_shardings': tuple(kinds[c] for c in ins),
    'out_shardings': out[0] if len(out) == 1 else out,
  }
