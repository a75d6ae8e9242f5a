"""Atomic file writes on local disks and object storage (``gs://`` through etils epath).

A reader never sees a half-written file: data goes to a temporary name in the same directory and
is then renamed over the final name (an atomic ``rename(2)`` locally; a copy-then-delete on object
storage, where the final object appears whole or not at all).
"""

from __future__ import annotations

import os
import uuid

from etils import epath


def _tmp_name(path: epath.Path) -> epath.Path:
  return path.parent / f'.{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}'


def atomic_write_bytes(path, data: bytes) -> None:
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = _tmp_name(path)
  with tmp.open('wb') as f:
    f.write(data)
    if hasattr(f, 'fileno'):
      f.flush()
      os.fsync(f.fileno())
  tmp.replace(path)


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
