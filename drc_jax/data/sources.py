"""Image sources, preprocessing to the model's input and fixed-order padded batching.

A source gives random access to one split of a dataset as raw uint8 images ``[N, H, W, C]`` and
integer labels. Three kinds:

* ``FashionMnistSource``: the gzipped IDX files of the Debian package ``dataset-fashion-mnist``
  (real images, offline; the embedded default).
* ``TfdsSource``: ``tfds.data_source`` (array_record, no TensorFlow) for cifar10, cifar100, celeb_a.
* ``FolderSource``: a folder of PNG/JPEG files, in sorted path order.

``ConcatSource`` puts sources one after the other (a members folder, then a non-members folder).

Bad input (a missing file or directory, a corrupt or truncated file, a channel mismatch, an index
out of range) raises ``DataError`` naming the file or index: nothing is skipped silently.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import struct
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np
from PIL import Image

from drc_jax.core import errors

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
_FASHION_FILES = {
  'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
  'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
FASHION_MNIST_CLASSES = (
  'T-shirt/top',
  'Trouser',
  'Pullover',
  'Dress',
  'Coat',
  'Sandal',
  'Shirt',
  'Sneaker',
  'Bag',
  'Ankle boot',
)


class DataError(errors.UserError, ValueError):
  """Bad input data; the message names the file, index or field."""


class ImageSource(Protocol):
  """Random access to one split of a dataset."""

  name: str
  label_names: tuple[str, ...]  # name of label i ('' or empty tuple: unknown)

  def __len__(self) -> int: ...

  def read(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Raw images uint8 [N, H, W, C] (all the same size) and labels int64 [N]."""
    ...


def _check_indices(indices, n: int, what: str) -> np.ndarray:
  idx = np.asarray(indices, np.int64).reshape(-1)
  bad = idx[(idx < 0) | (idx >= n)]
  if bad.size:
    raise DataError(f'index {int(bad[0])} out of range for {what} ({n} images)')
  return idx


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST from IDX files.


def read_idx(path: str, expected_magic: int) -> np.ndarray:
  """Reads a (gzipped) IDX file of unsigned bytes into an array, validating its header."""
  if not os.path.exists(path):
    raise DataError(
      f'{path}: file not found (install the Debian package dataset-fashion-mnist '
      f'or set config.data.data_dir)'
    )
  try:
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rb') as f:
      raw = f.read()
  except (OSError, EOFError) as e:
    raise DataError(f'{path}: cannot read IDX file ({e})') from e
  if len(raw) < 8:
    raise DataError(f'{path}: truncated IDX header')
  magic = struct.unpack('>I', raw[:4])[0]
  if magic != expected_magic:
    raise DataError(f'{path}: bad IDX magic {magic:#x}, expected {expected_magic:#x}')
  ndim = magic & 0xFF
  dims = struct.unpack(f'>{ndim}I', raw[4 : 4 + 4 * ndim])
  body = raw[4 + 4 * ndim :]
  if len(body) != int(np.prod(dims)):
    raise DataError(f'{path}: IDX body has {len(body)} bytes, header says {dims}')
  return np.frombuffer(body, np.uint8).reshape(dims)


class FashionMnistSource:
  """Fashion-MNIST (28x28 grayscale) from the Debian package's IDX files."""

  def __init__(self, split: str = 'train', data_dir: str = ''):
    if split not in _FASHION_FILES:
      raise DataError(
        f'config.data.split: Fashion-MNIST has splits {sorted(_FASHION_FILES)}, not {split!r}'
      )
    data_dir = data_dir or FASHION_MNIST_DIR
    if not os.path.isdir(data_dir):
      raise DataError(
        f'{data_dir}: Fashion-MNIST directory not found (install the Debian package '
        f'dataset-fashion-mnist or set config.data.data_dir)'
      )
    img_file, lbl_file = (os.path.join(data_dir, f) for f in _FASHION_FILES[split])
    self._images = read_idx(img_file, 0x00000803)[..., None]  # [N, 28, 28, 1]
    self._labels = read_idx(lbl_file, 0x00000801).astype(np.int64)
    if len(self._images) != len(self._labels):
      raise DataError(
        f'{img_file}: {len(self._images)} images but {lbl_file} has {len(self._labels)} labels'
      )
    self.name = f'fashion_mnist/{split}'
    self.label_names = FASHION_MNIST_CLASSES

  def __len__(self) -> int:
    return len(self._images)

  def read(self, indices):
    idx = _check_indices(indices, len(self), self.name)
    return self._images[idx], self._labels[idx]


# ----------------------------------------------------------------------------------------------
# tensorflow-datasets through tfds.data_source (no TensorFlow needed).


class TfdsSource:
  """A tfds dataset split read with ``tfds.data_source`` (random access, array_record).

  ``order=''`` indexes the examples in tfds record order. ``order='id'`` indexes them by the
  integer that ends their ``'id'`` feature ('train_01234' is index 1234): TFDS shuffles the
  records when it builds a dataset, but the ids of cifar10 and cifar100 keep each image's index in
  the original files (cifar10's data_batch_1..5), the order torchvision reads and SecMI/PIA split
  indices point into. The id -> record map is built on first read, in one pass over the split
  (which decodes each example once: seconds for CIFAR), and must be a permutation of 0..N-1.
  """

  ORDERS = ('', 'id')

  def __init__(self, name: str, split: str = 'train', data_dir: str = '', order: str = ''):
    if order not in self.ORDERS:
      raise DataError(
        f"config.data.tfds_order: {order!r} not in {self.ORDERS} ('' = tfds record "
        f"order, 'id' = the integer in each example's 'id' feature)"
      )
    try:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise DataError(
        f"config.data.source='tfds' needs tensorflow-datasets: pip install 'drc_jax[tfds]' ({e})"
      ) from e
    try:
      self._ds = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except Exception as e:  # tfds raises many types; re-raise with the dataset and directory named
      where = data_dir or '~/tensorflow_datasets'
      raise DataError(
        f'tfds dataset {name!r} split {split!r} not readable under {where}: {e}. '
        f'Prepare it once with `tfds build {name} --data_dir=...` (needs '
        f'network and the [tf] extra), then set config.data.data_dir.'
      ) from e
    self.order = order
    self._records = None  # order 'id': dataset index -> tfds record index, built on first read
    # The order is part of the name: split manifests record it, so indices made in one order are
    # never read in the other.
    self.name = f'{name}/{split}' + (f'[order={order}]' if order else '')
    try:
      self.label_names = tuple(self._ds.dataset_info.features['label'].names)
    except (AttributeError, KeyError, TypeError):  # no class label feature, or no names
      self.label_names = ()

  def __len__(self) -> int:
    return len(self._ds)

  def _id_number(self, record: int, ex) -> int:
    if 'id' not in ex:
      raise DataError(
        f"{self.name}: examples have no 'id' feature (features: {sorted(ex)}); "
        f"config.data.tfds_order='id' needs one, use '' for this dataset"
      )
    value = ex['id']
    if isinstance(value, np.ndarray):
      value = value.item()
    if isinstance(value, bytes):
      value = value.decode('utf-8', 'replace')
    value = str(value)
    digits = value[len(value.rstrip('0123456789')) :]
    if not digits:
      raise DataError(
        f'{self.name} record {record}: id {value!r} does not end in an integer '
        f"(expected e.g. 'train_01234')"
      )
    return int(digits)

  def _record_indices(self) -> np.ndarray:
    """dataset index -> record index under ``order='id'`` (one pass over the split, cached)."""
    if self._records is None:
      n = len(self._ds)
      numbers = np.empty(n, np.int64)
      for r in range(n):
        numbers[r] = self._id_number(r, self._ds[r])
      bad = np.flatnonzero((numbers < 0) | (numbers >= n))
      if bad.size:
        raise DataError(
          f'{self.name} record {int(bad[0])}: id number {int(numbers[bad[0]])} out '
          f'of range for {n} examples: the ids are not a permutation of 0..{n - 1}'
        )
      counts = np.bincount(numbers, minlength=n)
      if np.any(counts != 1):
        dup = int(np.flatnonzero(counts > 1)[0])
        raise DataError(
          f'{self.name}: id number {dup} appears {int(counts[dup])} times (records '
          f'{np.flatnonzero(numbers == dup).tolist()}): the ids are not a '
          f'permutation of 0..{n - 1}'
        )
      records = np.empty(n, np.int64)
      records[numbers] = np.arange(n, dtype=np.int64)
      self._records = records
    return self._records

  def read(self, indices):
    idx = _check_indices(indices, len(self), self.name)
    records = self._record_indices()[idx] if self.order == 'id' else idx
    images, labels = [], []
    for i, r in zip(idx, records):
      ex = self._ds[int(r)]
      img = np.asarray(ex['image'])
      if img.ndim == 2:
        img = img[..., None]
      if img.dtype != np.uint8 or img.ndim != 3:
        raise DataError(
          f'{self.name} index {i}: image has dtype {img.dtype} shape {img.shape}, '
          f'expected uint8 [H, W, C]'
        )
      images.append(img)
      labels.append(int(ex['label']) if 'label' in ex else -1)
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
      raise DataError(f'{self.name}: images of different shapes {sorted(shapes)}')
    return np.stack(images), np.asarray(labels, np.int64)


# ----------------------------------------------------------------------------------------------
# A folder of image files.


class FolderSource:
  """PNG/JPEG files under a folder (recursively), in sorted relative-path order.

  The label of a file is the index of its first-level subfolder in sorted order (-1 for files at
  the top); ``label_names`` holds the subfolder names. Images are decoded to 8-bit grayscale or
  RGB (``to_8bit``): 16-bit images are scaled to 8 bits, alpha is dropped, palettes are
  expanded; a folder must not mix grayscale and RGB files.
  """

  def __init__(self, path: str, resolution: int, field: str = 'config.data.data_dir'):
    if not os.path.isdir(path):
      raise DataError(f'{path}: image folder not found ({field})')
    files = []
    for root, _, names in os.walk(path):
      files += [os.path.join(root, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
      raise DataError(f'{path}: no {"/".join(IMAGE_EXTENSIONS)} files found ({field})')
    self.files = sorted(files, key=lambda f: os.path.relpath(f, path))
    subdirs = sorted(
      {
        os.path.relpath(f, path).split(os.sep)[0]
        for f in self.files
        if os.sep in os.path.relpath(f, path)
      }
    )
    self._label_of = {d: i for i, d in enumerate(subdirs)}
    self.label_names = tuple(subdirs)
    self._root, self._resolution = path, resolution
    self.name = f'folder:{os.path.abspath(path)}'
    self._first: tuple[str, int] | None = None  # (file, channels) of the first image ever read

  def __len__(self) -> int:
    return len(self.files)

  @property
  def channels(self) -> int | None:
    """1 or 3: the kind of the images read so far (None before any read)."""
    return None if self._first is None else self._first[1]

  def _label(self, f: str) -> int:
    rel = os.path.relpath(f, self._root)
    return self._label_of.get(rel.split(os.sep)[0], -1) if os.sep in rel else -1

  def read(self, indices):
    idx = _check_indices(indices, len(self), self.name)
    images = []
    for i in idx:
      f = self.files[i]
      try:
        with Image.open(f) as im:
          im.load()
          im = to_8bit(im, f)
          # Folder images may differ in size: bring each to a square of the model resolution.
          arr = np.asarray(_center_square(im).resize((self._resolution,) * 2, Image.BICUBIC))
      except DataError:
        raise
      except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f'{f}: unreadable or corrupt image ({e})') from e
      images.append(arr[..., None] if arr.ndim == 2 else arr)
      if self._first is None:
        self._first = (f, images[-1].shape[-1])
      if images[-1].shape[-1] != self._first[1]:  # across reads: the whole folder is one kind
        kind = {1: 'grayscale', 3: 'RGB'}
        raise DataError(
          f'{f} is {kind[images[-1].shape[-1]]} but {self._first[0]} is '
          f'{kind[self._first[1]]}: an image folder must hold one kind '
          f'(convert the files first)'
        )
    return np.stack(images), np.asarray([self._label(self.files[i]) for i in idx], np.int64)


_SIXTEEN_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N')
_GRAY_MODES = ('1', 'L', 'LA', 'La')
_COLOR_MODES = ('P', 'PA', 'RGB', 'RGBA', 'RGBa', 'RGBX', 'CMYK', 'YCbCr', 'LAB', 'HSV')


def to_8bit(im: Image.Image, name: str) -> Image.Image:
  """An 8-bit grayscale ('L') or RGB image from any PIL mode a PNG or JPEG file decodes to.

  16-bit grayscale ('I;16*', and 'I' from a PNG: 16-bit values) is scaled to 8 bits,
  round(v / 257), so 0 and 65535 map to 0 and 255 (PIL's own conversion clips at 255 and turns
  such an image nearly white). Alpha is dropped (not composited), palettes are expanded to RGB,
  bilevel images become 0/255 grayscale. Other modes (32-bit integer or float) are refused.

  Raises:
    DataError: naming ``name`` for a mode with no faithful 8-bit reading.
  """
  if im.mode in _SIXTEEN_BIT_MODES or (im.mode == 'I' and im.format == 'PNG'):
    v = np.asarray(im).astype(np.int64)
    if v.size and (v.min() < 0 or v.max() > 65535):
      raise DataError(f'{name}: {im.mode} image with values outside 0..65535')
    return Image.fromarray(np.round(v / 257.0).astype(np.uint8), 'L')
  if im.mode in _GRAY_MODES:
    return im if im.mode == 'L' else im.convert('L')
  if im.mode in _COLOR_MODES:
    return im if im.mode == 'RGB' else im.convert('RGB')
  raise DataError(
    f'{name}: image mode {im.mode!r} ({"float" if im.mode == "F" else "32-bit"}) '
    f'has no faithful 8-bit reading; save it as 8- or 16-bit grayscale or RGB'
  )


def _center_square(im: Image.Image) -> Image.Image:
  w, h = im.size
  s = min(w, h)
  return im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))


class CachedSource:
  """An ``ImageSource`` that reads each image of the wrapped source once per run.

  An audit reads an image for several purposes (the split's training-data hashes, scoring,
  per-image calibration features, the sample-quality check, the evidence panels); this keeps the
  raw uint8 images it has read, up to ``max_bytes`` (then it reads again what it no longer holds:
  the oldest images are dropped first), so the data is read once per image per run.
  """

  def __init__(self, source: ImageSource, max_bytes: int = 2 << 30):
    self.source, self.max_bytes = source, int(max_bytes)
    self.name = source.name
    self.label_names = getattr(source, 'label_names', ())
    self._cache: dict[int, tuple[np.ndarray, int]] = {}  # insertion order = age
    self._bytes = 0
    self.reads = 0  # images read from the wrapped source (tests count them)

  def __len__(self) -> int:
    return len(self.source)

  def read(self, indices):
    indices = [int(i) for i in np.asarray(indices).reshape(-1)]
    missing = sorted({i for i in indices if i not in self._cache})
    if missing:
      raw, labels = self.source.read(missing)
      self.reads += len(missing)
      for i, im, lab in zip(missing, raw, labels):
        self._cache[i] = (im, int(lab))
        self._bytes += im.nbytes
      while self._bytes > self.max_bytes and len(self._cache) > len(missing):
        old = next(iter(self._cache))
        self._bytes -= self._cache.pop(old)[0].nbytes
    if any(i not in self._cache for i in indices):  # this one read is larger than the budget
      self.reads += len(indices)
      return self.source.read(indices)
    if not indices:
      return self.source.read([])
    images = np.stack([self._cache[i][0] for i in indices])
    return images, np.asarray([self._cache[i][1] for i in indices], np.int64)


class ConcatSource:
  """Several sources one after the other: index ``i`` of part ``k`` is ``offsets[k] + i``.

  Labels are renumbered into the sorted union of the parts' ``label_names`` (a part without
  names keeps its labels). The parts must hold one kind of image (grayscale or RGB): a mismatch
  is a ``DataError`` naming the files (``FolderSource`` parts) or indices.
  """

  def __init__(self, parts: Sequence[ImageSource], name: str):
    self.parts, self.name = list(parts), name
    self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
    self.label_names = tuple(sorted({n for p in self.parts for n in p.label_names}))
    pos = {n: i for i, n in enumerate(self.label_names)}
    self._relabel = [
      np.asarray([pos[n] for n in p.label_names], np.int64) if p.label_names else None
      for p in self.parts
    ]
    self._first: tuple[str, int] | None = None  # (image, channels) of the first image read

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def _describe(self, k: int, i: int) -> str:
    files = getattr(self.parts[k], 'files', None)
    return files[i] if files is not None else f'{self.parts[k].name} index {i}'

  def read(self, indices):
    idx = _check_indices(indices, len(self), self.name)
    part = np.searchsorted(self.offsets, idx, side='right') - 1
    images, labels = [None] * len(idx), np.empty(len(idx), np.int64)
    for k in np.unique(part):
      pos = np.flatnonzero(part == k)
      local = idx[pos] - self.offsets[k]
      raw, lab = self.parts[k].read(local)
      kind = raw.shape[-1]
      if self._first is None:
        self._first = (self._describe(k, int(local[0])), kind)
      if kind != self._first[1]:
        names = {1: 'grayscale', 3: 'RGB'}
        raise DataError(
          f'{self._describe(k, int(local[0]))} is {names.get(kind, kind)} but '
          f'{self._first[0]} is {names.get(self._first[1], self._first[1])}: the images of '
          f'{self.name} must be of one kind (convert the files first)'
        )
      relabel = self._relabel[k]
      if relabel is not None:
        lab = np.where(lab >= 0, relabel[np.clip(lab, 0, len(relabel) - 1)], lab)
      for j, p in enumerate(pos):
        images[p] = raw[j]
      labels[pos] = lab
    if not len(idx):
      return self.parts[0].read([])
    return np.stack(images), labels


def label_name(source: ImageSource, label: int) -> str:
  """What a person reads for ``label``: the class or folder name, else 'label N'."""
  names = getattr(source, 'label_names', ())
  return names[label] if 0 <= label < len(names) else f'label {label}'


def make_source(data_cfg) -> ImageSource:
  """The source named by a config's ``data`` section."""
  if data_cfg.source == 'fashion_mnist':
    return FashionMnistSource(data_cfg.split, data_cfg.data_dir)
  if data_cfg.source == 'tfds':
    return TfdsSource(
      data_cfg.name, data_cfg.split, data_cfg.data_dir, data_cfg.get('tfds_order', '')
    )
  if data_cfg.source == 'folder':
    return FolderSource(data_cfg.data_dir, data_cfg.resolution)
  raise DataError(
    f"config.data.source: unknown {data_cfg.source!r}; expected 'fashion_mnist', 'tfds' or 'folder'"
  )


# ----------------------------------------------------------------------------------------------
# Preprocessing and hashing.


def image_hashes(raw: np.ndarray) -> list[str]:
  """SHA-256 (hex) of each raw uint8 image's bytes (C order)."""
  return [hashlib.sha256(np.ascontiguousarray(im).tobytes()).hexdigest() for im in raw]


def preprocess(raw: np.ndarray, data_cfg, what: str = 'images') -> np.ndarray:
  """uint8 [N, H, W, C] -> float32 [N, R, R, channels] in [-1, 1].

  Centre-crops to ``center_crop`` (if set), resizes to ``resolution`` (bicubic, clipped), and
  checks the channel count against ``channels`` (converting only with ``convert_channels``).
  """
  if raw.dtype != np.uint8 or raw.ndim != 4:
    raise DataError(f'{what}: expected uint8 [N, H, W, C], got {raw.dtype} {raw.shape}')
  c_src, c_dst = raw.shape[-1], data_cfg.channels
  if c_src != c_dst and (not data_cfg.convert_channels or {c_src, c_dst} != {1, 3}):
    raise DataError(
      f'{what}: images have {c_src} channels but config.data.channels is '
      f'{c_dst} (set config.data.convert_channels=True to convert gray<->RGB)'
    )
  crop, res = data_cfg.center_crop, data_cfg.resolution
  out = np.empty((raw.shape[0], res, res, c_dst), np.float32)
  for i, im in enumerate(raw):
    if crop:
      h, w = im.shape[:2]
      if crop > min(h, w):
        raise DataError(f'{what}: center_crop {crop} larger than the image ({h}x{w})')
      top, left = (h - crop) // 2, (w - crop) // 2
      im = im[top : top + crop, left : left + crop]
    if c_src != c_dst:
      im = (
        np.repeat(im, 3, axis=-1)
        if c_dst == 3
        else np.round(im.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))[
          ..., None
        ].astype(np.uint8)
      )
    if im.shape[:2] != (res, res):
      pil = Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im)
      arr = np.asarray(pil.resize((res, res), Image.BICUBIC), np.float32)
      im = arr[..., None] if arr.ndim == 2 else arr
    out[i] = np.clip(im, 0, 255) / 127.5 - 1.0
  return out


def load_images(source: ImageSource, indices, data_cfg) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """Reads, hashes and preprocesses the images at ``indices``: (images, labels, hashes)."""
  raw, labels = source.read(indices)
  return preprocess(raw, data_cfg, what=source.name), labels, image_hashes(raw)


# ----------------------------------------------------------------------------------------------
# Fixed-order, padded, per-process batching.


@dataclasses.dataclass(frozen=True)
class BatchSlot:
  """Positions of one global batch that this process handles.

  Attributes:
    positions: [local_batch] int64 positions into the list being iterated (-1 = padding).
    valid: [local_batch] bool, False for padding rows.
  """

  positions: np.ndarray
  valid: np.ndarray


def batch_slots(
  n: int, batch_size: int, process_index: int = 0, process_count: int = 1
) -> Iterator[BatchSlot]:
  """Fixed-order batches over ``range(n)``, the last padded to ``batch_size``.

  Every global batch has exactly ``batch_size`` rows; process ``p`` of ``P`` gets rows
  ``[p * B/P, (p + 1) * B/P)``, so each position appears in exactly one valid row over all
  processes, and the compiled step sees one shape (no recompilation, nothing dropped).
  """
  if batch_size % process_count:
    raise ValueError(f'batch size {batch_size} not divisible by {process_count} processes')
  local = batch_size // process_count
  for start in range(0, n, batch_size):
    pos = np.arange(start, start + batch_size, dtype=np.int64)
    pos = pos[process_index * local : (process_index + 1) * local]
    valid = pos < n
    yield BatchSlot(np.where(valid, pos, -1), valid)
