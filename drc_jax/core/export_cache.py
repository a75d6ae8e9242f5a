"""A jitted program kept as its lowered form (``jax.export``), so a repeat run skips tracing it.

JAX's persistent compilation cache spares a repeat run XLA's compilation but not JAX's tracing
and lowering of the Python function, which for the audit's scorer (seven attacks in one program)
costs seconds on a CPU each run. ``Exported(fn, what, key)`` wraps a jitted ``fn``: at the first
call for a given argument signature it looks for ``<cache>/exported/<digest>.jaxexport``, where the
digest covers ``key`` (everything the caller's closure depends on: its config, the target's
description), the arguments' tree structure, shapes, dtypes and shardings, the JAX version and
settings that change lowering, and the source of the whole ``drc_jax`` package (any code change
is a new program). Found, the serialized program is deserialized and called; not found, the
function is exported (traced and lowered once), saved, and called the same way. Either way the
run executes ``jax.jit(exported.call)``, so a first and a repeat run compute with the same program.

Without a compilation cache directory the export is kept in memory only. In a multi-process run,
or where exporting fails (a function ``jax.export`` cannot serialize), the plain jitted function
runs, with a log line saying why.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jaxlib
from absl import logging

from drc_jax.core import fileio, parallel

SUFFIX = '.jaxexport'


@functools.cache
def package_source_sha256() -> str:
  """SHA-256 over the ``drc_jax`` package's Python source (names and bytes, in sorted order)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  h = hashlib.sha256()
  for d, dirs, files in sorted(os.walk(root)):
    dirs.sort()
    for name in sorted(f for f in files if f.endswith('.py')):
      path = os.path.join(d, name)
      h.update(os.path.relpath(path, root).encode() + b'\0')
      with open(path, 'rb') as f:
        h.update(f.read())
  return h.hexdigest()


def signature(args: tuple) -> str:
  """The arguments' tree structure and each leaf's shape, dtype and sharding, as text."""
  leaves, tree = jax.tree_util.tree_flatten(args)
  parts = [str(tree)]
  for x in leaves:
    sharding = getattr(x, 'sharding', None)
    parts.append(f'{getattr(x, "shape", ())}|{getattr(x, "dtype", type(x).__name__)}|{sharding}')
  return '\n'.join(parts)


def digest(key: str, args: tuple) -> str:
  """The file name (without suffix) of the program for ``key`` and these arguments."""
  doc = {
    'key': key,
    'signature': signature(args),
    'jax': jax.__version__,
    'jaxlib': jaxlib.__version__,
    'devices': [f'{d.platform}:{d.device_kind}' for d in jax.devices()],
    'threefry_partitionable': bool(jax.config.jax_threefry_partitionable),
    'matmul_precision': str(jax.config.jax_default_matmul_precision),
    'enable_x64': bool(jax.config.jax_enable_x64),
    'source': package_source_sha256(),
  }
  return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


class Exported:
  """``fn`` (jitted), run through its ``jax.export`` form kept on disk (see the module doc).

  Attributes other than calling (``lower``, ``trace``...) are ``fn``'s.
  """

  def __init__(
    self,
    fn: Callable,
    what: str,
    key: str,
    donate_argnums: tuple[int, ...] = (),
    out_like: Callable | None = None,
  ):
    """``donate_argnums``: as ``fn`` donates them (jit's argument). ``out_like(*args)``: a tree
    with the structure of ``fn``'s output, given where the output holds integer keys or named
    tuples (serialization takes neither): the program then returns flat leaves, rebuilt here."""
    self.fn, self.what, self.key = fn, what, key
    self.donate_argnums = tuple(donate_argnums)
    self.out_like = out_like
    self._programs: dict[str, Callable] = {}  # by digest
    self._by_shape: dict[tuple, Callable] = {}  # by the top-level arrays' shapes and dtypes

  def _program(self, args: tuple) -> Callable:
    if jax.process_count() > 1:
      return self.fn
    name = digest(self.key, args)
    if name in self._programs:
      return self._programs[name]
    cache = parallel.compilation_cache_dir()
    path = os.path.join(cache, 'exported', name + SUFFIX) if cache else ''
    exported = None
    if path and os.path.exists(path):
      try:
        with open(path, 'rb') as f:
          exported = jax.export.deserialize(bytearray(f.read()))
        logging.info('%s: its lowered program loaded from %s', self.what, path)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('%s: %s unreadable (%s); lowering it again', self.what, path, e)
    leaves, tree = jax.tree_util.tree_flatten(args)
    out_tree = None if self.out_like is None else jax.tree_util.tree_structure(self.out_like(*args))
    if exported is None:
      # Exported as a function of the flat leaves: serialization takes only string-keyed
      # trees, and params hold integer keys (an NNX list's entries).
      def flat(*leaves):
        out = self.fn(*jax.tree_util.tree_unflatten(tree, leaves))
        if out_tree is None:
          return out
        got, structure = jax.tree_util.tree_flatten(out)
        if structure != out_tree:
          raise ValueError(f'the output is {structure}, out_like said {out_tree}')
        return got

      try:
        exported = jax.export.export(jax.jit(flat))(*leaves)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('%s: not exportable (%s); it runs as a plain jitted program', self.what, e)
        self._programs[name] = self.fn
        return self.fn
      if path:
        try:
          blob = bytes(exported.serialize())
        except Exception as e:  # pylint: disable=broad-except
          logging.warning('%s: not serializable (%s); kept in memory only', self.what, e)
        else:
          os.makedirs(os.path.dirname(path), exist_ok=True)
          fileio.atomic_write_bytes(path, blob)
    # the leaves of the donated arguments are donated again (the export does not carry it)
    sizes = [len(jax.tree_util.tree_leaves(a)) for a in args]
    starts = [sum(sizes[:i]) for i in range(len(args))]
    donated = tuple(j for i in self.donate_argnums for j in range(starts[i], starts[i] + sizes[i]))
    call = jax.jit(exported.call, donate_argnums=donated)
    if out_tree is None:
      program = lambda *a: call(*jax.tree_util.tree_leaves(a))  # noqa: E731
    else:
      program = lambda *a: jax.tree_util.tree_unflatten(  # noqa: E731
        out_tree, call(*jax.tree_util.tree_leaves(a))
      )
    self._programs[name] = program
    return program

  def __call__(self, *args) -> Any:
    # Per call only the shapes of the arrays at the top and one dict level down are looked at (a
    # batch, its keys), much as progress.Announced does: the full digest flattens every params
    # leaf, and the params of a program's closure keep their structure (exported.call refuses
    # any other).
    quick = tuple(
      (i, k, x.shape, x.dtype)
      for i, a in enumerate(args)
      for k, x in (a.items() if isinstance(a, dict) else [(None, a)])
      if hasattr(x, 'shape')
    )
    program = self._by_shape.get(quick)
    if program is None:
      program = self._by_shape[quick] = self._program(args)
    return program(*args)

  def __getattr__(self, name: str) -> Any:
    if name == 'fn':  # not set yet (copying, unpickling)
      raise AttributeError(name)
    return getattr(self.fn, name)
