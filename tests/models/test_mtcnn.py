"""MTCNN face detection (drc_jax.drc.faces, drc_jax.models.mtcnn) against facenet-pytorch's.

The real pretrained MTCNN weights ship inside facenet-pytorch; the photographs ship inside
scikit-image. Boxes must agree within a pixel and probabilities within 1e-4; the networks within
1e-4 on random input; NMS and the area resampling exactly.
"""

import time

import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='PyTorch import needs the torch extra')
fp_mtcnn = pytest.importorskip('facenet_pytorch.models.mtcnn', reason='needs facenet-pytorch')
skdata = pytest.importorskip('skimage.data', reason='needs scikit-image (reference extra)')
torchvision = pytest.importorskip('torchvision')

from PIL import Image
from safetensors import numpy as st_numpy

from drc_jax.convert import ConversionError
from drc_jax.convert import facenet as convert_facenet
from drc_jax.drc import faces
from drc_jax.models.unet import flat_params

ATOL = 1e-4


def _resized(img, h, w):
  return np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))


def _four_faces():
  """Four astronauts of different sizes (one mirrored) on a grey canvas."""
  a = skdata.astronaut()
  canvas = np.full((360, 480, 3), 90, np.uint8)
  canvas[0:256, 0:256] = _resized(a, 256, 256)
  canvas[200:360, 300:460] = _resized(a, 160, 160)[:, ::-1]
  canvas[10:130, 330:450] = _resized(a, 120, 120)
  canvas[260:356, 20:116] = _resized(a, 96, 96)
  return canvas


IMAGES = {
  'astronaut': lambda: skdata.astronaut(),
  'astronaut_200': lambda: _resized(skdata.astronaut(), 200, 200),
  'four_faces': _four_faces,
  'chelsea': lambda: skdata.chelsea(),  # a cat: no face
  'face_64': lambda: _resized(skdata.astronaut()[30:210, 140:310], 64, 64),  # CelebA-like crop
}


@pytest.fixture(scope='module')
def reference():
  return fp_mtcnn.MTCNN(keep_all=True, device='cpu')


@pytest.fixture(scope='module')
def detector():
  return faces.default_detector()


def _sorted(boxes, probs):
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  order = np.lexsort(boxes.T[::-1])
  return boxes[order], np.asarray(probs, np.float64).reshape(-1)[order]


def _facenet_detect(reference, img):
  boxes, probs = reference.detect(Image.fromarray(img))
  if boxes is None:
    return np.zeros((0, 4)), np.zeros((0,))
  return _sorted(boxes, probs)


@pytest.mark.parametrize('name', list(IMAGES))
def test_detect_faces_matches_facenet_pytorch(reference, detector, name):
  img = IMAGES[name]()
  want_boxes, want_probs = _facenet_detect(reference, img)
  start = time.perf_counter()
  ((boxes, probs),) = faces.detect_faces(img[None], detector)
  seconds = time.perf_counter() - start
  assert boxes.dtype == probs.dtype == np.float32
  assert np.all(np.diff(probs) <= 0), 'most probable face first'
  got_boxes, got_probs = _sorted(boxes, probs)
  assert len(got_boxes) == len(want_boxes), (got_boxes, want_boxes)
  box_diff = float(np.abs(got_boxes - want_boxes).max(initial=0.0))
  prob_diff = float(np.abs(got_probs - want_probs).max(initial=0.0))
  print(
    f'{name}: {len(boxes)} faces, box |diff| {box_diff:.2e} px, prob {prob_diff:.2e}, '
    f'{seconds:.2f} s'
  )
  assert box_diff <= 1.0
  assert prob_diff <= ATOL
  if name in ('astronaut', 'astronaut_200', 'face_64'):
    assert len(boxes) == 1
  if name == 'four_faces':
    assert len(boxes) == 4
  if name == 'chelsea':
    assert len(boxes) == 0


def test_batch_matches_single_images(detector):
  a = skdata.astronaut()
  imgs = np.stack([a, np.ascontiguousarray(a[:, ::-1]), skdata.immunohistochemistry()])
  batch = faces.detect_faces(imgs, detector)
  assert [len(b) for b, _ in batch] == [1, 1, 0]
  for img, (boxes, probs) in zip(imgs, batch):
    ((one_boxes, one_probs),) = faces.detect_faces(img[None], detector)
    np.testing.assert_allclose(boxes, one_boxes, atol=1e-3)
    np.testing.assert_allclose(probs, one_probs, atol=ATOL)
  # Below the smallest pyramid level (short side < 12 * 20 / 12): no face (facenet-pytorch fails).
  tiny = _resized(skdata.astronaut(), 16, 16)[None]
  assert [len(b) for b, _ in faces.detect_faces(tiny, detector)] == [0]
  # The mirrored face is the mirror of the face (pixel coordinates: x -> 512 - x).
  np.testing.assert_allclose(batch[1][0][0, [0, 2]], 512 - batch[0][0][0, [2, 0]], atol=3.0)


def test_networks_match_facenet_pytorch(detector):
  rng = np.random.default_rng(0)
  cases = [
    ('pnet', fp_mtcnn.PNet(), (2, 37, 53, 3), detector.pnet),  # odd sides: ceil-mode pooling
    ('rnet', fp_mtcnn.RNet(), (5, 24, 24, 3), detector.rnet),
    ('onet', fp_mtcnn.ONet(), (5, 48, 48, 3), detector.onet),
  ]
  for name, net, shape, ours in cases:
    x = rng.normal(size=shape).astype(np.float32)
    with torch.no_grad():
      want = [t.numpy() for t in net.eval()(torch.as_tensor(x).permute(0, 3, 1, 2))]
    got = ours(x)
    if name == 'pnet':  # NCHW maps -> NHWC
      want = [w.transpose(0, 2, 3, 1) for w in want]
    for w, g in zip(want, got):
      assert w.shape == g.shape, name
      diff = float(np.abs(w - g).max())
      print(f'{name}: max |diff| {diff:.2e}')
      assert diff <= ATOL, name


def test_nms_and_resampling_are_exact():
  rng = np.random.default_rng(1)
  xy = rng.uniform(0, 100, (300, 2)).astype(np.float32)
  boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (300, 2)).astype(np.float32)], axis=1)
  scores = rng.uniform(size=300).astype(np.float32)
  for thr in (0.3, 0.5, 0.7):
    want = torchvision.ops.nms(torch.as_tensor(boxes), torch.as_tensor(scores), thr).numpy()
    np.testing.assert_array_equal(faces.nms(boxes, scores, thr), want)
  from facenet_pytorch.models.utils import detect_face as fp_detect  # pylint: disable=g-import-not-at-top

  np.testing.assert_array_equal(
    faces.nms_min(boxes, scores, 0.7), fp_detect.nms_numpy(boxes, scores, 0.7, 'Min')
  )
  img = rng.integers(0, 256, (2, 53, 71, 3), dtype=np.uint8)
  t = torch.as_tensor(img).permute(0, 3, 1, 2).float()
  for size in [(30, 41), (24, 24), (48, 48), (90, 100)]:
    want = fp_detect.imresample(t, size).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(faces.resize_area(faces._integral(img), size), want)


def _expected_mask(box, scale, out_hw, margin):
  x1, y1, x2, y2 = (float(v) * scale for v in box)
  m = np.ones(out_hw, np.float32)
  for i in range(out_hw[0]):
    for j in range(out_hw[1]):
      if x1 - margin <= j + 0.5 <= x2 + margin and y1 - margin <= i + 0.5 <= y2 + margin:
        m[i, j] = 0.0
  return m


def test_face_keep_masks(detector):
  a = skdata.astronaut()
  cat = _resized(skdata.chelsea(), 512, 512)
  imgs = np.stack([a, cat])
  (box, _), _ = faces.detect_faces(imgs, detector)
  for margin in (0, 2):
    masks, found = faces.face_keep_masks(imgs, (64, 64), margin, detector=detector)
    assert masks.shape == (2, 64, 64, 1) and masks.dtype == np.float32
    np.testing.assert_array_equal(found, [True, False])
    want = _expected_mask(box[0], 64 / 512, (64, 64), margin)
    np.testing.assert_array_equal(masks[0, ..., 0], want)
    # The cat gets the centre box of the face's area fraction.
    side = int(round(np.sqrt((want == 0).mean()) * 64))
    top = (64 - side) // 2
    np.testing.assert_array_equal(np.nonzero(masks[1, :, 32, 0] == 0)[0], top + np.arange(side))
    assert (masks[1] == 0).sum() == side * side
  # [-1, 1] floats give the same masks as the uint8 pixels they came from.
  again, _ = faces.face_keep_masks(imgs / 127.5 - 1.0, (64, 64), detector=detector)
  np.testing.assert_array_equal(again, faces.face_keep_masks(imgs, (64, 64), detector=detector)[0])
  masks, found = faces.face_keep_masks(cat[None], (10, 20), fallback_ratio=0.36, detector=detector)
  assert not found[0]
  np.testing.assert_array_equal(np.nonzero(masks[0, :, 10, 0] == 0)[0], [2, 3, 4, 5, 6, 7])
  np.testing.assert_array_equal(np.nonzero(masks[0, 5, :, 0] == 0)[0], np.arange(4, 16))


def test_weights_from_exported_safetensors(tmp_path, detector):
  path = tmp_path / 'mtcnn.safetensors'
  convert_facenet.export_mtcnn_safetensors(path)
  params = convert_facenet.mtcnn_params_from_facenet_pytorch(path)
  want = flat_params(detector.params)
  got = flat_params(params)
  assert sorted(got) == sorted(want) and len(got) == 50
  for k, v in got.items():
    np.testing.assert_array_equal(v, np.asarray(want[k]), err_msg=k)
  flat = st_numpy.load(path.read_bytes())
  bad = {k: v for k, v in flat.items() if k != 'onet.dense6_3.bias'}
  (tmp_path / 'missing.safetensors').write_bytes(st_numpy.save(bad))
  with pytest.raises(ConversionError, match=r'\(onet\): missing keys dense6_3\.bias'):
    convert_facenet.mtcnn_params_from_facenet_pytorch(tmp_path / 'missing.safetensors')
  bad = dict(flat, **{'pnet.conv1.weight': np.zeros((10, 3, 5, 5), np.float32)})
  (tmp_path / 'shape.safetensors').write_bytes(st_numpy.save(bad))
  with pytest.raises(ConversionError, match=r'conv1\.weight: checkpoint \(10, 3, 5, 5\)'):
    convert_facenet.mtcnn_params_from_facenet_pytorch(tmp_path / 'shape.safetensors')
  with pytest.raises(ConversionError, match='not found'):
    convert_facenet.mtcnn_params_from_facenet_pytorch(tmp_path)
