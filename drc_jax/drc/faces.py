"""Face detection (MTCNN, as facenet-pytorch runs it) and face-box keep masks for face datasets.

``detect_faces(images)`` reproduces ``facenet_pytorch.models.utils.detect_face.detect_face``: an
image pyramid (minimum face 20 px, factor 0.709) resampled with ``interpolate(mode='area')``;
PNet proposals above 0.6, NMS at IoU 0.5 per scale and 0.7 per image, box regression, squaring
(``rerec``) and clipping (``pad``); RNet on 24x24 crops above 0.7, NMS 0.7, regression, squaring;
ONet on 48x48 crops above 0.7, regression and a last NMS at 0.7 over the smaller box ("Min").
The networks run in JAX (``drc_jax.models.mtcnn``; jitted per input shape, crop batches padded
to powers of two); the glue runs on the host in NumPy, in float32 with the operations in
PyTorch's order, so boxes agree with facenet-pytorch to float rounding. Face detection runs once
per image before an audit, outside the restoration program.

Where this differs from facenet-pytorch, on purpose: NMS breaks ties between equal scores by index
(a stable sort; PyTorch's CPU sort leaves the order of ties unspecified); NMS runs per image
rather than on boxes shifted apart per image (the same result, without the float rounding of the
shift); a candidate whose clipped crop is empty is dropped (facenet-pytorch would fail).

``face_keep_masks(images, out_hw)`` turns the most probable face of each image into a keep mask
(0 inside the face box) for inpainting; an image with no face gets a centre box instead.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from drc_jax.convert import facenet as facenet_convert
from drc_jax.models import mtcnn as mtcnn_lib

MIN_FACE_SIZE = 20
THRESHOLDS = (0.6, 0.7, 0.7)
FACTOR = 0.709
# Area fraction of the fallback centre box when no image of a call has a face.
DEFAULT_FACE_FRACTION = 0.25
_F = np.float32


@dataclasses.dataclass
class Detector:
  """The MTCNN networks as (graphdef, params) and their jitted forward functions."""

  graphdef: Any
  params: Any

  def __post_init__(self):
    self.params = jax.tree_util.tree_map(jnp.asarray, self.params)
    g = self.graphdef
    self._pnet = jax.jit(lambda p, x: nnx.merge(g, p).pnet(x))
    self._rnet = jax.jit(lambda p, x: nnx.merge(g, p).rnet(x))
    self._onet = jax.jit(lambda p, x: nnx.merge(g, p).onet(x))

  @classmethod
  def load(cls, src=None) -> Detector:
    """Detector with the pretrained weights of facenet-pytorch (or ``src``)."""
    graphdef, _ = mtcnn_lib.abstract()
    return cls(graphdef, facenet_convert.mtcnn_params_from_facenet_pytorch(src))

  def pnet(self, x: np.ndarray):
    reg, prob = self._pnet(self.params, x)
    return np.asarray(reg), np.asarray(prob)

  def _batched(self, fn, x: np.ndarray):
    """fn on x [K, s, s, 3], padded to a power-of-two batch (few shapes, few compilations)."""
    k = x.shape[0]
    size = max(16, 1 << (k - 1).bit_length())
    x = np.concatenate([x, np.zeros((size - k, *x.shape[1:]), x.dtype)])
    return [np.asarray(o)[:k] for o in fn(self.params, x)]

  def rnet(self, x: np.ndarray):
    return self._batched(self._rnet, x)

  def onet(self, x: np.ndarray):
    return self._batched(self._onet, x)


@functools.cache
def default_detector() -> Detector:
  """The detector with facenet-pytorch's weights, read from the installed package once."""
  return Detector.load()


# ----------------------------------------------------------------------------- host glue


def _windows(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
  """Adaptive-pooling windows [start, end) of each output index (PyTorch's integer formula)."""
  i = np.arange(n_out, dtype=np.int64)
  return (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)


def _integral(images: np.ndarray) -> np.ndarray:
  """[N, H+1, W+1, C] exact integer prefix sums of uint8 images [N, H, W, C]."""
  c = np.zeros((images.shape[0], images.shape[1] + 1, images.shape[2] + 1, images.shape[3]))
  c = c.astype(np.int64)
  c[:, 1:, 1:] = images.astype(np.int64).cumsum(1).cumsum(2)
  return c


def _area_sums(integral, n, r0, r1, c0, c1):
  """Window sums from prefix sums; index arrays broadcast to the output shape."""
  return integral[n, r1, c1] - integral[n, r0, c1] - integral[n, r1, c0] + integral[n, r0, c0]


def _standardise(x: np.ndarray) -> np.ndarray:
  return (x - _F(127.5)) * _F(0.0078125)


def resize_area(integral: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
  """``interpolate(img, size, mode='area')`` of whole images, bit-exact for integer pixels."""
  n, h, w = integral.shape[0], integral.shape[1] - 1, integral.shape[2] - 1
  rs, re = _windows(h, out_hw[0])
  cs, ce = _windows(w, out_hw[1])
  idx = np.arange(n)[:, None, None]
  s = _area_sums(
    integral, idx, rs[None, :, None], re[None, :, None], cs[None, None], ce[None, None]
  )
  kh = (re - rs).astype(_F)[None, :, None, None]
  kw = (ce - cs).astype(_F)[None, None, :, None]
  return s.astype(_F) / kh / kw  # PyTorch divides the float sum by kh, then by kw


def crops_area(integral, image_inds, y0, y1, x0, x1, size: int) -> np.ndarray:
  """[K, size, size, C]: crop k (rows y0:y1, cols x0:x1 of image image_inds[k]) area-resized."""
  h, w = (y1 - y0)[:, None], (x1 - x0)[:, None]
  i = np.arange(size, dtype=np.int64)[None, :]
  rs, re = y0[:, None] + (i * h) // size, y0[:, None] + -((-(i + 1) * h) // size)
  cs, ce = x0[:, None] + (i * w) // size, x0[:, None] + -((-(i + 1) * w) // size)
  n = image_inds[:, None, None]
  s = _area_sums(integral, n, rs[:, :, None], re[:, :, None], cs[:, None], ce[:, None])
  kh = (re - rs).astype(_F)[:, :, None, None]
  kw = (ce - cs).astype(_F)[:, None, :, None]
  return s.astype(_F) / kh / kw


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
  """``torchvision.ops.nms``: indices kept, by decreasing score; IoU > threshold suppresses.

  Boxes [K, 4] (x1, y1, x2, y2) float32, areas without +1, arithmetic in float32 as the C++
  kernel does it, the comparison in double (its threshold is a double).
  """
  x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
  areas = (x2 - x1) * (y2 - y1)
  order = np.argsort(-scores, kind='stable')
  suppressed = np.zeros(len(scores), bool)
  keep = []
  for pos, i in enumerate(order):
    if suppressed[i]:
      continue
    keep.append(i)
    rest = order[pos + 1 :]
    rest = rest[~suppressed[rest]]
    w = np.maximum(_F(0), np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
    h = np.maximum(_F(0), np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
    inter = w * h
    ovr = inter / (areas[i] + areas[rest] - inter)
    suppressed[rest[ovr.astype(np.float64) > threshold]] = True
  return np.asarray(keep, np.int64)


def nms_min(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
  """facenet-pytorch's ``nms_numpy(..., 'Min')``: overlap = intersection / smaller area, areas
  and widths with +1, boxes with overlap > threshold suppressed; kept indices, best first."""
  if boxes.size == 0:
    return np.zeros((0,), np.int64)
  x1, y1, x2, y2 = (boxes[:, i].copy() for i in range(4))
  area = (x2 - x1 + 1) * (y2 - y1 + 1)
  order = np.argsort(scores)  # as facenet-pytorch (the last is the best)
  pick = []
  while order.size > 0:
    i = order[-1]
    pick.append(i)
    idx = order[0:-1]
    w = np.maximum(0.0, np.minimum(x2[i], x2[idx]) - np.maximum(x1[i], x1[idx]) + 1)
    h = np.maximum(0.0, np.minimum(y2[i], y2[idx]) - np.maximum(y1[i], y1[idx]) + 1)
    inter = w * h
    o = inter / np.minimum(area[i], area[idx])
    order = order[np.where(o <= threshold)]
  return np.asarray(pick, np.int64)


def _per_image(fn, boxes, image_inds, n_images, *args):
  """Indices kept by ``fn(boxes, scores, *args)`` run on each image's boxes separately."""
  keep = [np.nonzero(image_inds == b)[0] for b in range(n_images)]
  keep = [k[fn(boxes[k, :4], boxes[k, 4], *args)] for k in keep if k.size]
  if not keep:
    return np.zeros((0,), np.int64)
  keep = np.concatenate(keep)
  return keep[np.argsort(-boxes[keep, 4], kind='stable')]  # best first, as batched_nms returns


def generate_boxes(reg, prob, scale: float, threshold: float):
  """PNet grid cells with face probability >= threshold -> ([K, 9] boxes, [K] image index).

  Rows: x1, y1, x2, y2 (in the original image), score, four regression offsets.
  """
  n, yy, xx = np.nonzero(prob >= _F(threshold))
  bb = np.stack([xx, yy], axis=1).astype(_F)
  s = _F(scale)
  q1 = np.floor((_F(2) * bb + _F(1)) / s)
  q2 = np.floor((_F(2) * bb + _F(12)) / s)
  score = prob[n, yy, xx][:, None]
  return np.concatenate([q1, q2, score, reg[n, yy, xx]], axis=1).astype(_F), n


def bbreg(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
  """Box regression: offsets scaled by width and height counted with +1."""
  out = boxes.copy()
  w = boxes[:, 2] - boxes[:, 0] + _F(1)
  h = boxes[:, 3] - boxes[:, 1] + _F(1)
  out[:, 0] = boxes[:, 0] + reg[:, 0] * w
  out[:, 1] = boxes[:, 1] + reg[:, 1] * h
  out[:, 2] = boxes[:, 2] + reg[:, 2] * w
  out[:, 3] = boxes[:, 3] + reg[:, 3] * h
  return out


def rerec(boxes: np.ndarray) -> np.ndarray:
  """Squares each box around its centre (side: the longer of width and height)."""
  out = boxes.copy()
  h = boxes[:, 3] - boxes[:, 1]
  w = boxes[:, 2] - boxes[:, 0]
  side = np.maximum(w, h)
  out[:, 0] = boxes[:, 0] + w * _F(0.5) - side * _F(0.5)
  out[:, 1] = boxes[:, 1] + h * _F(0.5) - side * _F(0.5)
  out[:, 2] = out[:, 0] + side
  out[:, 3] = out[:, 1] + side
  return out


def pad(boxes: np.ndarray, w: int, h: int):
  """Integer crop bounds (1-based starts y, x; exclusive ends ey, ex) clipped to the image."""
  b = np.trunc(boxes[:, :4]).astype(np.int32)
  x, y = np.maximum(b[:, 0], 1), np.maximum(b[:, 1], 1)
  ex, ey = np.minimum(b[:, 2], w), np.minimum(b[:, 3], h)
  return y, ey, x, ex


def _crops(integral, boxes, image_inds, w, h, size):
  """Standardised crops of the (clipped) boxes; boxes with an empty crop are dropped."""
  y, ey, x, ex = pad(boxes, w, h)
  ok = (ey > y - 1) & (ex > x - 1)
  crops = crops_area(integral, image_inds[ok], y[ok] - 1, ey[ok], x[ok] - 1, ex[ok], size)
  return _standardise(crops), ok


def _as_uint8(images) -> np.ndarray:
  """[N, H, W, 3] uint8 from uint8 images or floats in [-1, 1] (gray repeated to RGB)."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'face detection takes images [N, H, W, 1 or 3], got shape {images.shape}')
  if images.dtype != np.uint8:
    if not np.issubdtype(images.dtype, np.floating):
      raise ValueError(f'face detection takes uint8 or [-1, 1] float images, got {images.dtype}')
    images = np.clip(np.round((images.astype(np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  return images


def pyramid_scales(h: int, w: int, min_face_size: int = MIN_FACE_SIZE, factor: float = FACTOR):
  """The image pyramid's scales: 12 / min_face_size, times factor, while the short side >= 12."""
  m = 12.0 / min_face_size
  minl = min(h, w) * m
  scales, scale = [], m
  while minl >= 12:
    scales.append(scale)
    scale *= factor
    minl *= factor
  return scales


def detect_faces(
  images,
  detector: Detector | None = None,
  *,
  min_face_size: int = MIN_FACE_SIZE,
  thresholds: tuple[float, float, float] = THRESHOLDS,
  factor: float = FACTOR,
) -> list[tuple[np.ndarray, np.ndarray]]:
  """MTCNN face detection as facenet-pytorch's ``MTCNN(...).detect`` computes it.

  Args:
    images: [N, H, W, 3] uint8 (or [N, H, W, 1|3] floats in [-1, 1], rounded to uint8).
    detector: the networks; default: facenet-pytorch's pretrained weights (``default_detector``).
    min_face_size, thresholds, factor: facenet-pytorch's ``MTCNN`` arguments of the same names.

  Returns:
    Per image, (boxes [n, 4] float32 x1, y1, x2, y2 in pixels, probs [n] float32), most probable
    face first (facenet-pytorch's ``detect`` orders by box area instead); n may be 0.
  """
  imgs = _as_uint8(images)
  det = detector or default_detector()
  n_img, h, w, _ = imgs.shape
  integral = _integral(imgs)
  empty = [(np.zeros((0, 4), _F), np.zeros((0,), _F)) for _ in range(n_img)]

  # Stage 1: PNet over the pyramid; NMS 0.5 within each scale and image, then 0.7 per image.
  boxes, inds = [np.zeros((0, 9), _F)], [np.zeros((0,), np.int64)]
  for scale in pyramid_scales(h, w, min_face_size, factor):
    data = _standardise(resize_area(integral, (int(h * scale + 1), int(w * scale + 1))))
    reg, prob = det.pnet(data)
    b, i = generate_boxes(reg, prob[..., 1], scale, thresholds[0])
    keep = _per_image(nms, b, i, n_img, 0.5)
    boxes.append(b[keep])
    inds.append(i[keep])
  boxes, inds = np.concatenate(boxes), np.concatenate(inds)
  keep = _per_image(nms, boxes, inds, n_img, 0.7)
  boxes, inds = boxes[keep], inds[keep]
  if not len(boxes):
    return empty
  regw = boxes[:, 2] - boxes[:, 0]
  regh = boxes[:, 3] - boxes[:, 1]
  q = [boxes[:, j] + boxes[:, 5 + j] * (regw if j % 2 == 0 else regh) for j in range(4)]
  boxes = rerec(np.stack([*q, boxes[:, 4]], axis=1))

  # Stage 2: RNet on 24x24 crops; keep > 0.7, NMS 0.7, regression, squaring.
  crops, ok = _crops(integral, boxes, inds, w, h, 24)
  boxes, inds = boxes[ok], inds[ok]
  if not len(boxes):
    return empty
  reg, prob = det.rnet(crops)
  ipass = prob[:, 1] > _F(thresholds[1])
  boxes = np.concatenate([boxes[ipass, :4], prob[ipass, 1:2]], axis=1)
  inds, reg = inds[ipass], reg[ipass]
  keep = _per_image(nms, boxes, inds, n_img, 0.7)
  boxes = rerec(bbreg(boxes[keep], reg[keep]))
  inds = inds[keep]
  if not len(boxes):
    return empty

  # Stage 3: ONet on 48x48 crops; keep > 0.7, regression, NMS 0.7 over the smaller box.
  crops, ok = _crops(integral, boxes, inds, w, h, 48)
  boxes, inds = boxes[ok], inds[ok]
  if not len(boxes):
    return empty
  reg, _, prob = det.onet(crops)
  ipass = prob[:, 1] > _F(thresholds[2])
  boxes = np.concatenate([boxes[ipass, :4], prob[ipass, 1:2]], axis=1)
  boxes, inds = bbreg(boxes, reg[ipass]), inds[ipass]
  out = []
  for b in range(n_img):
    mine = boxes[inds == b]
    mine = mine[nms_min(mine[:, :4], mine[:, 4], 0.7)]
    out.append((mine[:, :4].copy(), mine[:, 4].copy()))
  return out


def _box_side(h: int, w: int, ratio: float) -> tuple[int, int]:
  """Sides of the centre box of area fraction ``ratio`` (as ``degrade``'s 'center_box')."""
  side_h = max(1, min(h, int(round(math.sqrt(ratio) * h))))
  side_w = max(1, min(w, int(round(math.sqrt(ratio) * w))))
  return side_h, side_w


def face_keep_masks(
  images,
  out_hw: tuple[int, int],
  margin: float = 0,
  *,
  fallback_ratio: float | None = None,
  detector: Detector | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Keep masks that remove each image's most probable face.

  Args:
    images: [N, H, W, 3] uint8, or [N, H, W, 1|3] floats in [-1, 1].
    out_hw: (height, width) of the masks; boxes are scaled from the images' size to it.
    margin: pixels (of the mask grid) added to every side of the face box.
    fallback_ratio: area fraction of the centre box given to an image without a face; None: the
      mean area fraction of the face boxes found in this call (``DEFAULT_FACE_FRACTION`` if none).
    detector: as for ``detect_faces``.

  Returns:
    (masks [N, out_h, out_w, 1] float32: 0 on the pixels whose centre lies in the box, 1 elsewhere;
    found [N] bool: False where the centre box stands in, which the caller should warn about).
  """
  imgs = _as_uint8(images)
  oh, ow = out_hw
  sy, sx = oh / imgs.shape[1], ow / imgs.shape[2]
  rows = np.arange(oh)[:, None] + 0.5
  cols = np.arange(ow)[None, :] + 0.5
  masks = np.ones((len(imgs), oh, ow, 1), np.float32)
  found = np.zeros((len(imgs),), bool)
  fractions = []
  for k, (boxes, _) in enumerate(detect_faces(imgs, detector)):
    if not len(boxes):
      continue
    x1, y1, x2, y2 = (float(v) for v in boxes[0])
    inside = (
      (cols >= x1 * sx - margin)
      & (cols <= x2 * sx + margin)
      & (rows >= y1 * sy - margin)
      & (rows <= y2 * sy + margin)
    )
    masks[k, inside] = 0.0
    found[k] = True
    fractions.append(float(inside.mean()))
  ratio = fallback_ratio
  if ratio is None:
    ratio = float(np.mean(fractions)) if fractions else DEFAULT_FACE_FRACTION
  if not 0 < ratio <= 1:
    raise ValueError(f'face_keep_masks: fallback area fraction {ratio} is not in (0, 1]')
  side_h, side_w = _box_side(oh, ow, ratio)
  top, left = (oh - side_h) // 2, (ow - side_w) // 2
  for k in np.nonzero(~found)[0]:
    masks[k, top : top + side_h, left : left + side_w] = 0.0
  return masks, found


def drc_keep_masks(
  raw: np.ndarray, data_cfg, ratio: float, detector: Detector | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """DRC's face masks for raw dataset images: detection on the region the target sees.

  The raw uint8 images [N, H, W, C] are centre-cropped as ``data.preprocess`` crops them
  (``data_cfg.center_crop``), gray is repeated to RGB, faces are detected at that resolution and
  each image's most probable face box is scaled to the target's ``data_cfg.resolution``. An
  image without a face gets the centre box removing ``ratio`` of it (``found`` False): a fixed
  fraction, so an image's mask never depends on the batch it lands in.

  Returns:
    (keep masks [N, R, R, 1] float32, found [N] bool).
  """
  crop, res = int(data_cfg.center_crop), int(data_cfg.resolution)
  if crop:
    h, w = raw.shape[1:3]
    top, left = (h - crop) // 2, (w - crop) // 2
    raw = raw[:, top : top + crop, left : left + crop]
  if raw.shape[-1] == 1:
    raw = np.repeat(raw, 3, axis=-1)
  return face_keep_masks(raw, (res, res), fallback_ratio=ratio, detector=detector)
