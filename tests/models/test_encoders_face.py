"""The 'facenet' encoder computes what facenet-pytorch's InceptionResnetV1(classify=False) computes.

Random weights (seeded), with BatchNorm running statistics and affine parameters randomised so a
swapped mean/variance or a wrong epsilon shows; saved as the public files are (a state dict with
the ``logits`` classifier of VGGFace2's 8631 or CASIA-WebFace's 10575 identities, and BatchNorm
``num_batches_tracked`` counters), converted with ``drc_jax.convert``, loaded with
``drc_jax.load_encoder``.
"""

import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='PyTorch import needs the torch extra')
irv1 = pytest.importorskip(
  'facenet_pytorch.models.inception_resnet_v1', reason='needs facenet-pytorch (reference extra)'
)

from drc_jax import convert, load_encoder
from drc_jax.convert import facenet as convert_facenet
from drc_jax.models import facenet as facenet_lib
from drc_jax.targets import encoders

ATOL = 1e-4
VGGFACE2_CLASSES = 8631
CASIA_CLASSES = 10575


def _torch_model(seed: int):
  torch.manual_seed(seed)
  model = irv1.InceptionResnetV1(classify=False).eval()
  with torch.no_grad():
    for mod in model.modules():
      if isinstance(mod, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
        mod.running_mean.normal_(0.0, 0.3)
        mod.running_var.uniform_(0.3, 3.0)
        mod.weight.uniform_(0.5, 1.5)
        mod.bias.normal_(0.0, 0.3)
        mod.num_batches_tracked.fill_(1234)
  return model


def _state(model, classes: int):
  state = dict(model.state_dict())
  g = torch.Generator().manual_seed(classes)
  state['logits.weight'] = torch.randn(classes, 512, generator=g)
  state['logits.bias'] = torch.randn(classes, generator=g)
  return state


def _reference(model, x_nhwc):
  with torch.no_grad():
    return model(torch.as_tensor(x_nhwc).permute(0, 3, 1, 2)).numpy()


@pytest.fixture(scope='module')
def vggface2_like():
  model = _torch_model(0)
  return model, _state(model, VGGFACE2_CLASSES)


@pytest.mark.parametrize(
  'seed,classes,suffix,shape',
  [
    (0, VGGFACE2_CLASSES, '.pt', (2, 160, 160, 3)),  # the paper's input, VGGFace2-like file
    (1, CASIA_CLASSES, '.safetensors', (3, 128, 112, 3)),  # CASIA-like, smaller non-square input
  ],
)
def test_embed_matches_facenet_pytorch(tmp_path, seed, classes, suffix, shape):
  model = _torch_model(seed)
  state = _state(model, classes)
  src = tmp_path / f'facenet{suffix}'
  if suffix == '.pt':
    torch.save(state, src)
  else:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, src)
  enc = convert.convert_encoder('facenet', src, tmp_path / 'enc')
  again = load_encoder(tmp_path / 'enc')
  assert enc.family == again.family == 'facenet'
  assert again.preprocess == facenet_lib.PREPROCESS
  x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
  want = _reference(model, x)
  got = np.asarray(again.embed(x))
  diff = float(np.abs(got - want).max())
  print(f'facenet {shape} {suffix}: max |diff| {diff:.2e}')
  assert got.shape == (shape[0], 512)
  assert diff <= ATOL
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
  # The test can fail: without the running statistics the output is far from the reference.
  for mod in model.modules():
    if isinstance(mod, torch.nn.BatchNorm2d):
      mod.reset_running_stats()
  assert np.abs(_reference(model, x) - want).max() > 100 * ATOL


def test_prepare_is_fixed_image_standardization(tmp_path, vggface2_like):
  _, state = vggface2_like
  src = tmp_path / 'w.pt'
  torch.save(state, src)
  enc = convert.convert_encoder('facenet', src, tmp_path / 'enc')
  pixels = np.random.default_rng(0).integers(0, 256, (2, 160, 160, 3)).astype(np.float32)
  got = np.asarray(enc.prepare(pixels / 127.5 - 1.0))
  np.testing.assert_allclose(got, (pixels - 127.5) / 128.0, atol=1e-5)


def _read_error(tmp_path, state, match):
  src = tmp_path / 'bad.pt'
  torch.save(state, src)
  with pytest.raises(convert.ConversionError, match=match):
    convert_facenet.read(src)


def test_missing_key_is_named(tmp_path, vggface2_like):
  _, state = vggface2_like
  state = dict(state)
  del state['repeat_2.3.branch1.1.bn.running_var']
  _read_error(tmp_path, state, r'missing keys repeat_2\.3\.branch1\.1\.bn\.running_var')


def test_misshapen_key_is_named(tmp_path, vggface2_like):
  _, state = vggface2_like
  state = dict(state, **{'last_linear.weight': state['last_linear.weight'].T.contiguous()})
  _read_error(tmp_path, state, r'last_linear\.weight: checkpoint \(1792, 512\) vs expected')


def test_unexpected_and_classifier_keys(tmp_path, vggface2_like):
  _, state = vggface2_like
  _read_error(tmp_path, dict(state, extra=torch.zeros(3)), r'unexpected keys extra')
  bad_head = dict(state, **{'logits.weight': torch.zeros(10, 256)})
  _read_error(tmp_path, bad_head, r'logits\.weight \(10, 256\)')


def test_bad_source_and_directory(tmp_path, vggface2_like):
  with pytest.raises(convert.ConversionError, match='state-dict file'):
    convert_facenet.read(tmp_path / 'weights.bin')
  _, state = vggface2_like
  src = tmp_path / 'w.pt'
  torch.save(state, src)
  (tmp_path / 'enc').mkdir()
  (tmp_path / 'enc' / encoders.ENCODER_JSON).write_text('{}')
  with pytest.raises(encoders.EncoderError, match='fresh directory'):
    convert.convert_encoder('facenet', src, tmp_path / 'enc')
