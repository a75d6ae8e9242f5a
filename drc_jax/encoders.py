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
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from drc_jax import errors
from drc_jax.models import unet as unet_lib

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


def _config_from_dict(cls: type, d: dict[str, Any], where: str):
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - names)
  if unknown:
    raise EncoderError(f'{where}: unknown config fields {unknown} for {cls.__name__}')
  kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
  try:
    return cls(**kw)
  except (TypeError, ValueError) as e:
    raise EncoderError(f'{where}: invalid {cls.__name__} ({e})') from e


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """What the PyTorch model expects of its input: size, resize filter and normalisation."""

  size: tuple[int, int]
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  resize: str = 'bicubic'


def prepare_fn(pre: Preprocess) -> Callable[[jnp.ndarray], jnp.ndarray]:
  """images in [-1, 1], [B, H, W, C] (C 1 or 3) -> the encoder's input [B, h, w, 3] (pure)."""

  def prepare(images):
    x = (images.astype(jnp.float32) + 1.0) / 2.0
    if x.shape[-1] == 1:
      x = jnp.repeat(x, 3, axis=-1)
    h, w = pre.size
    if x.shape[1:3] != (h, w):
      x = jax.image.resize(x, (x.shape[0], h, w, 3), method=pre.resize, antialias=True)
    mean = jnp.asarray(pre.mean, jnp.float32).reshape(1, 1, 1, 3)
    std = jnp.asarray(pre.std, jnp.float32).reshape(1, 1, 1, 3)
    return (x - mean) / std  # [1, 1, 1, 3]: no implicit rank promotion

  return prepare


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
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top

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


def load_encoder(path) -> Encoder:
  """Loads an encoder directory; every problem is an ``EncoderError`` naming the file or key."""
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top

  path = epath.Path(path)
  meta_path = path / ENCODER_JSON
  if not meta_path.exists():
    raise EncoderError(
      f'{meta_path}: not found (an encoder directory is made by python -m drc_jax.convert '
      f'--format=timm-vit|open-clip|hf-clip|facenet --src=... --out={path})'
    )
  try:
    meta = json.loads(meta_path.read_text())
  except json.JSONDecodeError as e:
    raise EncoderError(f'{meta_path}: invalid JSON ({e})') from e
  for key in ('family', 'config', 'preprocess'):
    if key not in meta:
      raise EncoderError(f'{meta_path}: missing field {key!r}')
  family = meta['family']
  config_cls, _ = _family(family, str(meta_path))
  config = _config_from_dict(config_cls, meta['config'], f'{meta_path} config')
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

