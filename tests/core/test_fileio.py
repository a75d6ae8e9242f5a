"""Atomic writes: a reader sees the old file or the new one, never a part, even on a full disk."""

import errno
import os

import pytest

from drc_jax.core import errors, fileio


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
  path = tmp_path / 'report.html'
  fileio.atomic_write_text(path, 'old')

  def full(fd):
    raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(os, 'fsync', full)
  with pytest.raises(errors.WorkdirError, match=r'report.html: cannot write \(No space left'):
    fileio.atomic_write_text(path, 'new')
  assert path.read_text() == 'old' and os.listdir(tmp_path) == ['report.html']
