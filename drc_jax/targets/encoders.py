"""Image encoders behind one interface: ``load_encoder(DIR)`` gives ``embed`` and, for ViTs,
``cls_attention``, as the PyTorch original computes them.

An encoder directory (written by ``python -m drc_jax.convert --format=... --out=DIR``) holds:

* ``encoder.json``: ``family`` (a key of ``FAMILIES``), ``config`` (the family's config dataclass
  as a dict), ``preprocess`` (``size`` [H, W] the network takes, per-channel ``mean`` and ``std``
  applied to [0, 1] pixels, ``resize`` 'bicubic' or 'bilinear'), ``source`` (where the weights came
  from), ``format`` (the convert format) and ``sha256`` of the weights file;
* ``weights.safetensors``: one float32 tensor per dotted parameter name of the Flax module.

``Encoder.embed(x)`` takes x: [B, H, W, 3] float32, already resized and normalised as the PyTorch
model expects (NHWC), and returns the PyTorch model's output. ``Encoder.prepare(images)`` does that
resizing and normalisation for drc_jax images ([-1, 1], any size; gray repeated to RGB) inside
jitted code, so DRC runs an encoder within its one program. ``embed_fn`` / ``prepare_fn`` /
``cls_attention_fn`` are the pure functions of (params, x) that jitted programs call.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from safetensors import numpy as st_numpy

from drc_jax.core import errors, records
from drc_jax.models import unet as unet_lib
from drc_jax.models.preprocess import Preprocess, prepare_fn

ENCODER_JSON = 'encoder.json'
WEIGHTS = 'weights.safetensors'


class EncoderError(errors.UserError, ValueError):
  """An encoder directory that cannot be loaded; the message names the file, key or field."""


@dataclasses.dataclass(frozen=True)
class Family:
  """How to build one family of encoders.

  Attributes:
    module: the module defining it (imported on first use).
    config: name of its config dataclass in ``module`` (fields: JSON-able values; tuples as lists).
    network: name of its ``nnx.Module`` in ``module``: ``__init__(config, rngs)``, a method
      ``embed(x)`` and, for ViTs, ``cls_attention(x)`` -> [B, heads, N patches].
  """

  module: str
  config: str
  network: str


# One registry that the converter, the loader and config validation read.
FAMILIES: dict[str, Family] = {}


def register(name: str, family: Family) -> None:
  FAMILIES[name] = family


register('vit', Family('drc_jax.models.vit', 'ViTConfig', 'ViT'))  # timm / DINO ViTs
register('clip', Family('drc_jax.models.clip', 'CLIPConfig', 'CLIPVision'))  # CLIP image towers
register('facenet', Family('drc_jax.models.facenet', 'FaceNetConfig', 'InceptionResnetV1'))


def _family(name: str, where: str) -> tuple[type, type]:
  if name not in FAMILIES:
    raise EncoderError(f'{where}: unknown encoder family {name!r} (known: {sorted(FAMILIES)})')
  f = FAMILIES[name]
  module = importlib.import_module(f.module)
  return getattr(module, f.config), getattr(module, f.network)


@dataclasses.dataclass
class Encoder:
  """A loaded encoder: pure functions over ``params`` and jitted conveniences."""

  family: str
  config: Any
  preprocess: Preprocess
  graphdef: Any
  params: Any
  source: str = ''

  def _merge(self, params):
    return nnx.merge(self.graphdef, params)

  def embed_fn(self, params, x):
    return self._merge(params).embed(x)

  def cls_attention_fn(self, params, x):
    net = self._merge(params)
    if not hasattr(net, 'cls_attention'):
      raise EncoderError(f'a {self.family} encoder has no CLS attention (a ViT encoder does)')
    return net.cls_attention(x)

  @property
  def has_cls_attention(self) -> bool:
    return hasattr(_family(self.family, self.family)[1], 'cls_attention')

  def prepare(self, images):
    return prepare_fn(self.preprocess)(images)

  # One jitted function per Encoder (a fresh jax.jit per call would compile on every call).
  @functools.cached_property
  def _embed_jit(self):
    return jax.jit(self.embed_fn)

  @functools.cached_property
  def _cls_attention_jit(self):
    return jax.jit(self.cls_attention_fn)

  def embed(self, x):
    return self._embed_jit(self.params, jnp.asarray(x, jnp.float32))

  def cls_attention(self, x):
    return self._cls_attention_jit(self.params, jnp.asarray(x, jnp.float32))


def build(family: str, config, seed: int = 0) -> tuple[Any, Any]:
  """(graphdef, params) of a randomly initialised encoder (tests and ``:runlocal``)."""
  _, network = _family(family, family)
  graphdef, state = nnx.split(network(config, nnx.Rngs(seed)))
  return graphdef, nnx.to_pure_dict(state)


@functools.lru_cache(maxsize=8)
def _abstract(family: str, config) -> tuple[Any, Any]:
  """(graphdef, params as ShapeDtypeStructs), cached per (family, config): tracing a network's
  init takes seconds, and converting then loading an encoder needs it three times. Shared: do not
  mutate the returned tree."""
  _, network = _family(family, family)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: network(config, nnx.Rngs(0))))
  return graphdef, nnx.to_pure_dict(state)


def abstract_params(family: str, config) -> Any:
  """The params tree of ``family`` at ``config`` as ShapeDtypeStructs (converters fill it)."""
  return _abstract(family, config)[1]


def save_encoder(
  out,
  family: str,
  config,
  params,
  preprocess: Preprocess,
  *,
  source: str = '',
  fmt: str = '',
) -> None:
  """Writes an encoder directory (refusing one that already holds an encoder)."""
  out = epath.Path(out)
  if (out / ENCODER_JSON).exists():
    raise EncoderError(f'{out / ENCODER_JSON} exists: convert into a fresh directory')
  _, abstract = _abstract(family, config)
  expected = unet_lib.flat_param_shapes(abstract)
  flat = {
    k: np.ascontiguousarray(np.asarray(v, np.float32))
    for k, v in unet_lib.flat_params(params).items()
  }
  got = {k: tuple(v.shape) for k, v in flat.items()}
  if got != expected:
    diff = sorted(set(got.items()) ^ set(expected.items()))[:6]
    raise EncoderError(f'{out}: params do not match the {family} architecture: {diff}')
  out.mkdir(parents=True, exist_ok=True)
  data = st_numpy.save(flat)
  (out / WEIGHTS).write_bytes(data)
  doc = {
    'family': family,
    'config': dataclasses.asdict(config),
    'preprocess': dataclasses.asdict(preprocess),
    'source': source,
    'format': fmt,
    'sha256': {WEIGHTS: hashlib.sha256(data).hexdigest()},
  }
  (out / ENCODER_JSON).write_text(json.dumps(doc, indent=1) + '\n')


def write_random_encoder(
  out, family: str, config, seed: int = 0, preprocess: Preprocess | None = None
) -> Encoder:
  """Writes a randomly initialised encoder directory (tests and ``:runlocal``) and loads it.

  Args:
    out: a fresh directory.
    family: a key of ``FAMILIES``.
    config: its config dataclass (e.g. ``drc_jax.models.vit.CONFIGS['tiny']``).
    seed: initialisation seed.
    preprocess: the input it expects; default: the family module's ``default_preprocess(config)``.
  """
  _family(family, 'write_random_encoder')  # an unknown family is an error naming the known ones
  if preprocess is None:
    module = importlib.import_module(FAMILIES[family].module)
    if not hasattr(module, 'default_preprocess'):
      raise EncoderError(f'encoder family {family!r}: give a Preprocess (no default_preprocess)')
    preprocess = module.default_preprocess(config)
  _, params = build(family, config, seed)
  save_encoder(out, family, config, params, preprocess, source=f'random (seed {seed})', fmt='')
  return load_encoder(out)


# Randomly initialised encoders for smoke runs (``:runlocal``): 'random:<name>' in place of a
# directory. Their embeddings mean nothing; they exercise the whole pipeline without weights.
RANDOM_PREFIX = 'random:'
RANDOM = {
  'vit-tiny': ('vit', 'tiny'),
  'clip-tiny': ('clip', 'tiny'),
  'facenet': ('facenet', None),
  # paper sizes, for cost benchmarks (drc_jax.analysis.bench)
  'vit-s16': ('vit', 'vit_s16'),
  'clip-b32': ('clip', 'vit_b32'),
}


def random_encoder(name: str, seed: int = 0) -> Encoder:
  """The random encoder ``RANDOM[name]`` (seeded), built in memory."""
  if name not in RANDOM:
    raise EncoderError(f'{RANDOM_PREFIX}{name}: unknown random encoder (known: {sorted(RANDOM)})')
  family, size = RANDOM[name]
  module = importlib.import_module(FAMILIES[family].module)
  if family == 'facenet':
    config, preprocess = module.FaceNetConfig(), module.PREPROCESS
  else:
    config = module.CONFIGS[size]
    preprocess = module.default_preprocess(config)
  graphdef, params = build(family, config, seed)
  return Encoder(family, config, preprocess, graphdef, params, f'{RANDOM_PREFIX}{name}')


def load_encoder(path) -> Encoder:
  """Loads an encoder directory (or a ``random:<name>`` smoke-run encoder); every problem is an
  ``EncoderError`` naming the file or key."""
  if str(path).startswith(RANDOM_PREFIX):
    return random_encoder(str(path)[len(RANDOM_PREFIX) :])

  path = epath.Path(path)
  meta_path = path / ENCODER_JSON
  if not meta_path.exists():
    raise EncoderError(
      f'{meta_path}: not found (an encoder directory is made by python -m drc_jax.convert '
      f'--format=timm-vit|open-clip|hf-clip|facenet --src=... --out={path})'
    )
  meta = records.read_json(meta_path, EncoderError)
  for key in ('family', 'config', 'preprocess'):
    if key not in meta:
      raise EncoderError(f'{meta_path}: missing field {key!r}')
  family = meta['family']
  config_cls, _ = _family(family, str(meta_path))
  config = records.dataclass_from_dict(
    config_cls, meta['config'], f'{meta_path} config', EncoderError
  )
  try:
    p = meta['preprocess']
    pre = Preprocess(
      tuple(p['size']), tuple(p['mean']), tuple(p['std']), p.get('resize', 'bicubic')
    )
  except (KeyError, TypeError) as e:
    raise EncoderError(f'{meta_path}: invalid preprocess ({e!r})') from e
  weights = path / WEIGHTS
  if not weights.exists():
    raise EncoderError(f'{weights}: not found')
  data = weights.read_bytes()
  want = meta.get('sha256', {}).get(WEIGHTS)
  if want and hashlib.sha256(data).hexdigest() != want:
    raise EncoderError(f'{weights}: SHA-256 differs from the one in {ENCODER_JSON} (corrupt copy?)')
  try:
    flat = st_numpy.load(data)
  except Exception as e:  # safetensors raises its own error types for a corrupt header
    raise EncoderError(f'{weights}: unreadable safetensors file ({e})') from e
  graphdef, abstract = _abstract(family, config)
  expected = unet_lib.flat_param_shapes(abstract)
  missing = sorted(set(expected) - set(flat))
  unexpected = sorted(set(flat) - set(expected))
  bad = sorted(k for k in expected if k in flat and tuple(flat[k].shape) != expected[k])
  if missing or unexpected or bad:
    raise EncoderError(
      f'{weights}: does not match the {family} config in {ENCODER_JSON}: missing {missing[:5]}, '
      f'unexpected {unexpected[:5]}, misshapen {bad[:5]}'
    )
  params = unet_lib.unflatten_params(abstract, {k: jnp.asarray(v) for k, v in flat.items()})
  return Encoder(family, config, pre, graphdef, params, meta.get('source', ''))
