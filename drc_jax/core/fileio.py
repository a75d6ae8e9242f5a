"""Atomic file writes on local disks and object storage (``gs://`` through etils epath).

A reader never sees a half-written file: data goes to a temporary name in the same directory and
is then renamed over the final name (an atomic ``rename(2)`` locally; a copy-then-delete on object
storage, where the final object appears whole or not at all).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator

from etils import epath

from drc_jax.core import errors


def _tmp_name(path: epath.Path) -> epath.Path:
  return path.parent / f'.{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}'


def atomic_write_bytes(path, data: bytes) -> None:
  """Writes ``data`` to ``path`` whole or not at all; a failed write (a full disk) removes its
  temporary file and is one ``errors.WorkdirError`` naming ``path``."""
  path = epath.Path(path)
  tmp = _tmp_name(path)
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tmp.open('wb') as f:
      f.write(data)
      if hasattr(f, 'fileno'):
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
  except OSError as e:
    with contextlib.suppress(OSError):
      tmp.unlink(missing_ok=True)
    raise errors.WorkdirError(
      f'{path}: cannot write ({e.strerror or e}); free space or use another --workdir '
      f'(what was written before is intact)'
    ) from e


def atomic_write_text(path, text: str) -> None:
  atomic_write_bytes(path, text.encode())


def move(src, dst) -> None:
  """Moves a file or a folder tree ``src`` to ``dst`` (which must not exist).

  Local paths are renamed (atomic for each entry); object storage has no folders to rename, so
  each file is copied, then the source tree removed.
  """
  src, dst = epath.Path(src), epath.Path(dst)
  if '://' not in str(src) and '://' not in str(dst):
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.rename(src, dst)
    return
  if not src.is_dir():
    src.copy(dst)
    src.unlink()
    return
  for f in src.rglob('*'):
    if not f.is_dir():
      target = dst / f.relative_to(src)
      target.parent.mkdir(parents=True, exist_ok=True)
      f.copy(target)
  src.rmtree()


LOCK_FILE = '.drc_jax.lock'


@contextlib.contextmanager
def workdir_lock(workdir, error: type[Exception]) -> Iterator[None]:
  """Holds an exclusive lock on a local ``workdir`` for the ``with`` block; a second holder is
  refused with ``error`` naming the first one's pid, host and start time.

  The lock is ``flock`` on ``W/.drc_jax.lock``: the kernel releases it when its process ends,
  however it ends, so a lock left by a killed run never blocks (its file only records who held
  it). Object-store workdirs (``gs://``) have no such lock and are not locked.
  """
  path = epath.Path(workdir)
  if re.match(r'^[a-z][a-z0-9+.-]*://', os.fspath(workdir)):
    yield
    return
  path.mkdir(parents=True, exist_ok=True)
  fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 4096, 0).decode(errors='replace').strip() or 'another process'
      raise error(
        f'{path}: in use by another drc_jax run ({holder}); wait for it to end or use another '
        f'--workdir'
      ) from None
    os.ftruncate(fd, 0)
    started = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime())
    os.pwrite(fd, f'pid {os.getpid()} on {socket.gethostname()}, since {started}'.encode(), 0)
    yield
  finally:
    os.close(fd)  # releases the lock
