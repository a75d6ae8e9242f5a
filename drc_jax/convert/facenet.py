"""``--format=facenet``: a facenet-pytorch InceptionResnetV1 state dict -> a 'facenet' encoder.

Reads ``.pt``/``.pth`` (``torch.load(weights_only=True)``) or ``.safetensors`` state dicts, such
as the public ``20180402-114759-vggface2.pt`` and ``20180408-102900-casia-webface.pt``. Their
``logits.weight`` / ``logits.bias`` (the identity classifier of the training set: 8631 VGGFace2 or
10575 CASIA classes) are not part of the embedding ``InceptionResnetV1(classify=False)`` computes,
so they are dropped, by name; BatchNorm ``num_batches_tracked`` counters (unused in inference) are
ignored, by name. Every other tensor must be a parameter of the network with the expected shape,
and every parameter must be present: anything else is a ``ConversionError`` naming the keys.

``assemble_torch`` is the strict name-by-rule import shared with the MTCNN weights
(``drc_jax.models.mtcnn``): modules carry the PyTorch names, so a parameter ``a.b.kernel`` comes
from ``a.b.weight`` (conv OIHW -> HWIO, linear [out, in] -> [in, out]), ``scale`` from ``weight``,
``mean`` / ``var`` from ``running_mean`` / ``running_var``, ``bias`` and PReLU ``weight`` as is.
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Any

import jax
import numpy as np
from etils import epath
from safetensors import numpy as st_numpy

from drc_jax.convert.common import (
  ConversionError,
  convert_tensor,
  describe,
  read_checkpoint,
  source_shape,
  state_dict,
)
from drc_jax.models import facenet as facenet_lib
from drc_jax.models import mtcnn as mtcnn_lib
from drc_jax.models import unet as unet_lib
from drc_jax.targets import encoders

FAMILY = 'facenet'
_LEAF_TO_TORCH = {'scale': 'weight', 'mean': 'running_mean', 'var': 'running_var'}


def torch_source(name: str, shape: tuple[int, ...]) -> tuple[str, str]:
  """(state-dict key, layout kind for ``convert_tensor``) of our parameter ``name``."""
  module, leaf = name.rsplit('.', 1)
  if leaf == 'kernel':
    return f'{module}.weight', 'conv' if len(shape) == 4 else 'linear'
  return f'{module}.{_LEAF_TO_TORCH.get(leaf, leaf)}', 'vector'


def assemble_torch(abstract, state: dict[str, np.ndarray], where: str, ignored=()) -> Any:
  """Params shaped like ``abstract`` from a PyTorch state dict, strictly.

  Args:
    abstract: the network's params tree (arrays or ShapeDtypeStructs) giving names and shapes.
    state: {key: numpy array} (``common.state_dict``).
    where: file name for messages.
    ignored: state-dict keys known to be unused (checked present by the caller, not converted).

  Returns:
    A tree like ``abstract`` of float32 numpy arrays.

  Raises:
    ConversionError: missing, unexpected, misshapen, non-float or non-finite tensors, by key.
  """
  expected = unet_lib.flat_param_shapes(abstract)
  sources = {name: torch_source(name, shape) for name, shape in expected.items()}
  wanted = {key for key, _ in sources.values()}
  missing = wanted - set(state)
  unexpected = set(state) - wanted - set(ignored)
  misshapen = [
    f'{key}: checkpoint {tuple(state[key].shape)} vs expected {source_shape(kind, expected[n])}'
    for n, (key, kind) in sources.items()
    if key in state and tuple(state[key].shape) != source_shape(kind, expected[n])
  ]
  problems = []
  if missing:
    problems.append(f'missing keys {describe(missing)}')
  if unexpected:
    problems.append(f'unexpected keys {describe(unexpected)}')
  if misshapen:
    problems.append('shape mismatch ' + '; '.join(sorted(misshapen)[:6]))
  if problems:
    raise ConversionError(f'{where}: ' + '; '.join(problems))
  bad = sorted(k for k in wanted if not np.issubdtype(state[k].dtype, np.floating))
  if bad:
    raise ConversionError(f'{where}: non-float tensors {describe(bad)}')
  bad = sorted(k for k in wanted if not np.all(np.isfinite(state[k])))
  if bad:
    raise ConversionError(f'{where}: non-finite weights (NaN or inf) in {describe(bad)}')
  leaves = [convert_tensor(kind, state[key]) for key, kind in sources.values()]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(abstract), leaves)


def facenet_params(state: dict[str, np.ndarray], where: str) -> Any:
  """InceptionResnetV1 params from a facenet-pytorch state dict (classifier head dropped)."""
  ignored = {k for k in state if k.endswith('.num_batches_tracked')}
  head = {k for k in state if k.startswith('logits.')}
  if head and head != {'logits.weight', 'logits.bias'}:
    raise ConversionError(f'{where}: unexpected classifier keys {describe(head)}')
  if head:
    w, b = state['logits.weight'], state['logits.bias']
    if w.ndim != 2 or w.shape[1] != facenet_lib.EMBED_DIM or b.shape != (w.shape[0],):
      raise ConversionError(
        f'{where}: logits.weight {tuple(w.shape)} / logits.bias {tuple(b.shape)} are not a '
        f'classifier over the {facenet_lib.EMBED_DIM}-d embedding'
      )
  abstract = encoders.abstract_params(FAMILY, facenet_lib.FaceNetConfig())
  return assemble_torch(abstract, state, where, ignored=ignored | head)


def read(src):
  """``(family, config, params, preprocess, source)`` for ``convert.convert_encoder``."""
  where = str(src)
  if not re.search(r'\.(pt|pth|safetensors)$', where.lower()):
    raise ConversionError(
      f'{where}: --format=facenet reads a state-dict file (.pt, .pth or .safetensors)'
    )
  state = state_dict(read_checkpoint(src), where)
  params = facenet_params(state, where)
  return FAMILY, facenet_lib.FaceNetConfig(), params, facenet_lib.PREPROCESS, where


# ----------------------------------------------------------------------------- MTCNN weights


def facenet_pytorch_data_dir() -> epath.Path:
  """``facenet_pytorch/data`` of the installed package, found without importing it (or torch)."""
  spec = importlib.util.find_spec('facenet_pytorch')
  if spec is None or not spec.submodule_search_locations:
    raise ConversionError(
      'the MTCNN weights come from the facenet-pytorch package, which is not installed '
      '(pip install facenet-pytorch==2.6.0 --no-deps), or pass src= a directory holding '
      '{pnet,rnet,onet}.pt or a .safetensors file written by export_mtcnn_safetensors'
    )
  return epath.Path(list(spec.submodule_search_locations)[0]) / 'data'


def _torch_state(src) -> tuple[dict[str, dict[str, np.ndarray]], str]:
  """{net: PyTorch state dict} from a facenet-pytorch data directory or an exported file."""
  path = facenet_pytorch_data_dir() if src is None else epath.Path(src)
  if path.is_dir():
    return {
      n: state_dict(read_checkpoint(path / f'{n}.pt'), str(path / f'{n}.pt'))
      for n in mtcnn_lib.NETS
    }, (os.fspath(path))
  if not path.name.endswith('.safetensors'):
    raise ConversionError(
      f'{path}: MTCNN weights are a directory holding {{pnet,rnet,onet}}.pt or a .safetensors '
      'file written by export_mtcnn_safetensors'
    )
  flat = state_dict(read_checkpoint(path), str(path))
  out = {n: {} for n in mtcnn_lib.NETS}
  for key, value in flat.items():
    net, _, rest = key.partition('.')
    if net not in out or not rest:
      raise ConversionError(f'{path}: unexpected key {key!r} (expected pnet.*, rnet.* or onet.*)')
    out[net][rest] = value
  return out, os.fspath(path)


def mtcnn_params_from_facenet_pytorch(src=None):
  """MTCNN params (``{'pnet': ..., 'rnet': ..., 'onet': ...}``) from facenet-pytorch's weights.

  Args:
    src: None (the installed facenet-pytorch package's ``data`` directory), a directory holding
      ``pnet.pt``, ``rnet.pt`` and ``onet.pt`` (read with ``torch.load(weights_only=True)``), or a
      ``.safetensors`` file written by ``export_mtcnn_safetensors`` (read without torch).

  Returns:
    Nested dict of float32 numpy arrays in the layout of ``build()[1]``.

  Raises:
    ConversionError: a missing file or package, or a missing, unexpected or misshapen tensor.
  """
  state, where = _torch_state(src)
  _, like = mtcnn_lib.abstract()
  return {n: assemble_torch(like[n], state[n], f'{where} ({n})') for n in mtcnn_lib.NETS}


def export_mtcnn_safetensors(out, src=None) -> None:
  """Writes the MTCNN weights of ``src`` (as for ``mtcnn_params_from_facenet_pytorch``) as one
  ``.safetensors`` file in the PyTorch layout, keys prefixed ``pnet.``, ``rnet.``, ``onet.``."""
  mtcnn_params_from_facenet_pytorch(src)  # validates before writing
  state, _ = _torch_state(src)
  flat = {f'{n}.{k}': np.ascontiguousarray(v) for n in mtcnn_lib.NETS for k, v in state[n].items()}
  epath.Path(out).write_bytes(st_numpy.save(flat))
