"""An image's caption as part of the data: what a text-conditioned target is audited under.

``config.text.captions`` says where each image's caption comes from:

* ``''``: none (an unconditional target);
* ``'class_template'``: ``config.text.template`` filled with the image's class name, lower case
  (Fashion-MNIST's label 7 -> 'a photo of a sneaker'; a folder's first-level subfolder name);
* ``'file'``: a captions file. For an image folder (``config.data.source='folder'``, or the
  folders of ``config.split.members_dir`` / ``nonmembers_dir``) each folder's
  ``captions.jsonl`` (or ``config.text.captions_file``): one JSON object per line,
  ``{"file": "<path relative to the folder>", "text": "..."}``; or, for an image with no line,
  a ``.txt`` file beside it with the same stem (``cat.png`` -> ``cat.txt``, the caption its
  stripped text). A COCO annotations file (``captions_*.json``: ``images`` with ``id`` and
  ``file_name``, ``annotations`` with ``image_id`` and ``caption``) is read as well; an image's
  first caption in file order is its caption. For any other source
  (``fashion_mnist``, ``tfds``) ``config.text.captions_file`` is a JSONL file of
  ``{"index": <index in the source>, "text": "..."}``.

A missing caption, an unreadable line, a duplicate or a caption for no image is a ``DataError``
naming the file and line; so the audit never runs an image under a caption it was not given.
Sources that carry their captions themselves (the target's own samples, images given to the
Python API) have a ``captions`` attribute, a sequence of str by index, read first.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

import numpy as np

from drc_jax.data import sources as data_lib

KINDS = ('', 'class_template', 'file')
CAPTIONS_JSONL = 'captions.jsonl'


def _unwrap(source):
  while isinstance(source, data_lib.CachedSource):
    source = source.source
  return source


def is_text_conditioned(config) -> bool:
  """Whether the run's images carry captions (``config.text.captions`` set)."""
  return bool(config.get('text') and config.text.get('captions', ''))


def _read_jsonl(path: str, key: str) -> dict:
  """{file or index: text} of a JSONL captions file."""
  out = {}
  try:
    with open(path, encoding='utf-8') as f:
      lines = f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise data_lib.DataError(f'{path}: unreadable captions file ({e})') from e
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      doc = json.loads(line)
    except json.JSONDecodeError as e:
      raise data_lib.DataError(f'{path}:{n}: not a JSON object ({e.msg})') from e
    text = doc.get('text', doc.get('caption')) if isinstance(doc, dict) else None
    if not isinstance(text, str) or key not in doc:
      raise data_lib.DataError(f'{path}:{n}: expected {{"{key}": ..., "text": "<caption>"}}')
    k = doc[key]
    if key == 'index':
      if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise data_lib.DataError(f'{path}:{n}: "index" must be an integer >= 0, got {k!r}')
    elif not isinstance(k, str) or not k:
      raise data_lib.DataError(f'{path}:{n}: "file" must be a relative path, got {k!r}')
    else:
      k = os.path.normpath(k)
    if k in out:
      raise data_lib.DataError(f'{path}:{n}: a second caption for {key} {k!r}')
    out[k] = text
  return out


def _read_coco(path: str) -> dict:
  """{file_name: first caption} of a COCO captions annotations file."""
  try:
    with open(path, encoding='utf-8') as f:
      doc = json.load(f)
    names = {im['id']: os.path.normpath(im['file_name']) for im in doc['images']}
    out = {}
    for a in doc['annotations']:
      out.setdefault(names[a['image_id']], str(a['caption']).strip())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
    raise data_lib.DataError(f'{path}: not a COCO captions file ({type(e).__name__}: {e})') from e
  return out


def _read_file(path: str, key: str) -> dict:
  if path.endswith('.json'):
    if key != 'file':
      raise data_lib.DataError(f'{path}: a COCO captions file names files: use an image folder')
    return _read_coco(path)
  return _read_jsonl(path, key)


class _FolderCaptions:
  """The captions of one ``FolderSource``: its captions file, else each image's ``.txt``."""

  def __init__(self, folder: data_lib.FolderSource, captions_file: str):
    root = folder._root  # noqa: SLF001 (the folder the files are relative to)
    path = captions_file or os.path.join(root, CAPTIONS_JSONL)
    self.path = path if os.path.exists(path) else None
    if captions_file and self.path is None:
      raise data_lib.DataError(
        f'{captions_file}: captions file not found (config.text.captions_file)'
      )
    table = _read_file(self.path, 'file') if self.path else {}
    rel = [os.path.normpath(os.path.relpath(f, root)) for f in folder.files]
    unknown = sorted(set(table) - set(rel))
    if unknown:
      raise data_lib.DataError(
        f'{self.path}: captions for {len(unknown)} files not in {root} (first: {unknown[0]!r})'
      )
    self.files, self.rel, self.table = folder.files, rel, table

  def __call__(self, indices) -> list[str]:
    out = []
    for i in indices:
      f, rel = self.files[i], self.rel[i]
      if rel in self.table:
        out.append(self.table[rel])
        continue
      sidecar = os.path.splitext(f)[0] + '.txt'
      try:
        with open(sidecar, encoding='utf-8') as fh:
          out.append(fh.read().strip())
      except FileNotFoundError:
        where = self.path or os.path.join(os.path.dirname(self.files[0]), CAPTIONS_JSONL)
        raise data_lib.DataError(
          f'{f}: no caption (neither a line in {where} nor {sidecar})'
        ) from None
      except (OSError, UnicodeDecodeError) as e:
        raise data_lib.DataError(f'{sidecar}: unreadable caption ({e})') from e
    return out


def _class_names(source) -> Sequence[str]:
  names = getattr(source, 'label_names', ())
  if not names and isinstance(source, data_lib.FashionMnistSource):
    names = data_lib.FASHION_MNIST_CLASSES
  return names


def make_captioner(config, source: data_lib.ImageSource) -> Callable[[Sequence[int]], list[str]]:
  """``captions(indices) -> [str]`` of ``source``'s images (``config.text``, module docstring).

  Raises:
    DataError: a captions file is missing or malformed (naming it), or the source has no class
      names for ``'class_template'``.
  """
  text = config.text
  kind = text.captions
  if kind not in KINDS or not kind:
    raise data_lib.DataError(f'config.text.captions: {kind!r} not one of {KINDS[1:]}')
  inner = _unwrap(source)
  if kind == 'class_template':
    names = tuple(_class_names(inner))
    template = text.template
    try:
      template.format('x')
    except (IndexError, KeyError, ValueError) as e:
      raise data_lib.DataError(f'config.text.template: {template!r} is not a template ({e})') from e
    if not names:
      raise data_lib.DataError(
        f"config.text.captions='class_template': {source.name} has no class names"
      )

    def from_labels(indices):
      _, labels = source.read(np.asarray(indices, np.int64))
      out = []
      for i, lab in zip(indices, labels):
        if not 0 <= lab < len(names):
          raise data_lib.DataError(f'{source.name} index {i}: label {lab} has no class name')
        out.append(template.format(names[lab].lower()))
      return out

    return from_labels
  # 'file'
  if isinstance(inner, data_lib.FolderSource):
    return _FolderCaptions(inner, text.captions_file)
  if isinstance(inner, data_lib.ConcatSource) and all(
    isinstance(p, data_lib.FolderSource) for p in inner.parts
  ):
    parts = [_FolderCaptions(p, '') for p in inner.parts]

    def from_parts(indices):
      idx = np.asarray(indices, np.int64)
      part = np.searchsorted(inner.offsets, idx, side='right') - 1
      return [parts[k]([int(i - inner.offsets[k])])[0] for i, k in zip(idx, part)]

    return from_parts
  if not text.captions_file:
    raise data_lib.DataError(
      f"config.text.captions='file': {source.name} is not an image folder; set "
      f'config.text.captions_file to a JSONL file of {{"index": i, "text": ...}}'
    )
  if not os.path.exists(text.captions_file):
    raise data_lib.DataError(
      f'{text.captions_file}: captions file not found (config.text.captions_file)'
    )
  table = _read_file(text.captions_file, 'index')
  big = [i for i in table if i >= len(source)]
  if big:
    raise data_lib.DataError(
      f'{text.captions_file}: index {big[0]} beyond the {len(source)} images of {source.name}'
    )

  def from_index(indices):
    missing = [int(i) for i in indices if int(i) not in table]
    if missing:
      raise data_lib.DataError(
        f'{text.captions_file}: no caption for index {missing[0]} of {source.name}'
      )
    return [table[int(i)] for i in indices]

  return from_index


class Captions:
  """The captions of any source a run reads (the split's, a suspect folder, the target's samples,
  API images), a captioner made once per source: a source's own ``captions`` attribute (a
  sequence of str by index) first, else ``make_captioner(config, source)``."""

  def __init__(self, config):
    self.config = config
    self._made: dict[str, Callable[[Sequence[int]], list[str]]] = {}

  def __call__(self, source, indices) -> list[str]:
    own = getattr(source, 'captions', None)
    if own is not None:
      if len(own) != len(source):
        raise data_lib.DataError(f'{source.name}: {len(own)} captions for {len(source)} images')
      return [str(own[int(i)]) for i in indices]
    name = source.name
    if name not in self._made:
      self._made[name] = make_captioner(self.config, source)
    return self._made[name](indices)
