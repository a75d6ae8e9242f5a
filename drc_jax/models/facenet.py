"""InceptionResnetV1, the face-recognition network of facenet-pytorch, in Flax NNX.

``InceptionResnetV1(config, rngs).embed(x)`` with x: [B, H, W, 3] float32 NHWC, already
standardised as facenet-pytorch's ``fixed_image_standardization`` does ((pixel - 127.5) / 128),
gives exactly ``facenet_pytorch.InceptionResnetV1(classify=False).eval()(x_nchw)``: the
L2-normalised 512-d embedding. The public weights (VGGFace2 and CASIA-WebFace) share this
architecture; they differ only in the classifier head ``logits``, which the embedding does not use
(``drc_jax.convert.facenet`` drops it).

Modules and attributes carry the PyTorch names (``conv2d_1a.conv``, ``repeat_1.0.branch1.1.bn``,
``last_bn``, ...), so each parameter's dotted name maps to its state-dict key by a fixed rule.
BatchNorm runs in inference mode: its running mean and variance are kept (as batch statistics,
not folded into the convolutions) and used as constants.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from drc_jax.models import preprocess as preprocess_lib

# The input facenet-pytorch expects (its ``fixed_image_standardization``).
PREPROCESS = preprocess_lib.Preprocess(
  size=(160, 160),
  # fixed_image_standardization: (pixel - 127.5) / 128 = ([0, 1] pixel - 0.5) / (128 / 255)
  mean=(0.5, 0.5, 0.5),
  std=(128 / 255,) * 3,
  resize='bilinear',
)

BN_EPS = 1e-3  # facenet-pytorch's BatchNorm eps (the value of the TensorFlow original)
EMBED_DIM = 512


@dataclasses.dataclass(frozen=True)
class FaceNetConfig:
  """InceptionResnetV1 has one architecture (the 512-d facenet-pytorch model): nothing to set."""


def max_pool(x, k: int, s: int):
  """``nn.MaxPool2d(k, stride=s)`` (no padding, floor mode) on [B, H, W, C]."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, k, k, 1), (1, s, s, 1), 'VALID')


class BasicConv2d(nnx.Module):
  """Conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU."""

  def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0, *, rngs: nnx.Rngs):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    self.conv = nnx.Conv(
      cin,
      cout,
      kernel_size=(kh, kw),
      strides=(stride, stride),
      padding=((ph, ph), (pw, pw)),
      use_bias=False,
      rngs=rngs,
    )
    self.bn = nnx.BatchNorm(cout, epsilon=BN_EPS, use_running_average=True, rngs=rngs)

  def __call__(self, x):
    return jax.nn.relu(self.bn(self.conv(x)))


def _seq(*layers) -> nnx.List:
  return nnx.List(list(layers))


def _run(layers, x):
  for layer in layers:
    x = layer(x)
  return x


def _conv1x1(cin: int, cout: int, rngs: nnx.Rngs) -> nnx.Conv:
  return nnx.Conv(cin, cout, kernel_size=(1, 1), padding='VALID', use_bias=True, rngs=rngs)


class Block35(nnx.Module):
  """35x35 Inception-ResNet block (256 channels), residual scaled by ``scale``."""

  def __init__(self, scale: float, rngs: nnx.Rngs):
    self.scale = scale
    self.branch0 = BasicConv2d(256, 32, 1, rngs=rngs)
    self.branch1 = _seq(BasicConv2d(256, 32, 1, rngs=rngs), BasicConv2d(32, 32, 3, 1, 1, rngs=rngs))
    self.branch2 = _seq(
      BasicConv2d(256, 32, 1, rngs=rngs),
      BasicConv2d(32, 32, 3, 1, 1, rngs=rngs),
      BasicConv2d(32, 32, 3, 1, 1, rngs=rngs),
    )
    self.conv2d = _conv1x1(96, 256, rngs)

  def __call__(self, x):
    out = jnp.concatenate([self.branch0(x), _run(self.branch1, x), _run(self.branch2, x)], -1)
    return jax.nn.relu(self.conv2d(out) * self.scale + x)


class Block17(nnx.Module):
  """17x17 Inception-ResNet block (896 channels)."""

  def __init__(self, scale: float, rngs: nnx.Rngs):
    self.scale = scale
    self.branch0 = BasicConv2d(896, 128, 1, rngs=rngs)
    self.branch1 = _seq(
      BasicConv2d(896, 128, 1, rngs=rngs),
      BasicConv2d(128, 128, (1, 7), 1, (0, 3), rngs=rngs),
      BasicConv2d(128, 128, (7, 1), 1, (3, 0), rngs=rngs),
    )
    self.conv2d = _conv1x1(256, 896, rngs)

  def __call__(self, x):
    out = jnp.concatenate([self.branch0(x), _run(self.branch1, x)], -1)
    return jax.nn.relu(self.conv2d(out) * self.scale + x)


class Block8(nnx.Module):
  """8x8 Inception-ResNet block (1792 channels); the last one has no ReLU."""

  def __init__(self, scale: float, rngs: nnx.Rngs, relu: bool = True):
    self.scale = scale
    self.relu = relu
    self.branch0 = BasicConv2d(1792, 192, 1, rngs=rngs)
    self.branch1 = _seq(
      BasicConv2d(1792, 192, 1, rngs=rngs),
      BasicConv2d(192, 192, (1, 3), 1, (0, 1), rngs=rngs),
      BasicConv2d(192, 192, (3, 1), 1, (1, 0), rngs=rngs),
    )
    self.conv2d = _conv1x1(384, 1792, rngs)

  def __call__(self, x):
    out = jnp.concatenate([self.branch0(x), _run(self.branch1, x)], -1)
    out = self.conv2d(out) * self.scale + x
    return jax.nn.relu(out) if self.relu else out


class Mixed6a(nnx.Module):
  """Reduction 35 -> 17: two strided conv branches and a max pool (256 -> 896 channels)."""

  def __init__(self, rngs: nnx.Rngs):
    self.branch0 = BasicConv2d(256, 384, 3, 2, rngs=rngs)
    self.branch1 = _seq(
      BasicConv2d(256, 192, 1, rngs=rngs),
      BasicConv2d(192, 192, 3, 1, 1, rngs=rngs),
      BasicConv2d(192, 256, 3, 2, rngs=rngs),
    )

  def __call__(self, x):
    return jnp.concatenate([self.branch0(x), _run(self.branch1, x), max_pool(x, 3, 2)], -1)


class Mixed7a(nnx.Module):
  """Reduction 17 -> 8: three strided conv branches and a max pool (896 -> 1792 channels)."""

  def __init__(self, rngs: nnx.Rngs):
    self.branch0 = _seq(BasicConv2d(896, 256, 1, rngs=rngs), BasicConv2d(256, 384, 3, 2, rngs=rngs))
    self.branch1 = _seq(BasicConv2d(896, 256, 1, rngs=rngs), BasicConv2d(256, 256, 3, 2, rngs=rngs))
    self.branch2 = _seq(
      BasicConv2d(896, 256, 1, rngs=rngs),
      BasicConv2d(256, 256, 3, 1, 1, rngs=rngs),
      BasicConv2d(256, 256, 3, 2, rngs=rngs),
    )

  def __call__(self, x):
    branches = [_run(self.branch0, x), _run(self.branch1, x), _run(self.branch2, x)]
    return jnp.concatenate([*branches, max_pool(x, 3, 2)], -1)


def _out_side(n: int) -> int:
  """Spatial side after the stem and the two reductions (0 or less: input too small)."""
  conv = lambda n, k, s=1, p=0: (n + 2 * p - k) // s + 1
  n = conv(conv(conv(n, 3, 2), 3), 3, 1, 1)  # conv2d_1a, 2a, 2b
  n = conv(conv(conv(conv(n, 3, 2), 1), 3), 3, 2)  # maxpool_3a, conv2d_3b, 4a, 4b
  return conv(conv(n, 3, 2), 3, 2)  # mixed_6a, mixed_7a


class InceptionResnetV1(nnx.Module):
  """facenet-pytorch's InceptionResnetV1 without the classifier: ``embed(x) -> [B, 512]``."""

  def __init__(self, config: FaceNetConfig, rngs: nnx.Rngs):
    del config  # one architecture
    self.conv2d_1a = BasicConv2d(3, 32, 3, 2, rngs=rngs)
    self.conv2d_2a = BasicConv2d(32, 32, 3, 1, rngs=rngs)
    self.conv2d_2b = BasicConv2d(32, 64, 3, 1, 1, rngs=rngs)
    self.conv2d_3b = BasicConv2d(64, 80, 1, 1, rngs=rngs)
    self.conv2d_4a = BasicConv2d(80, 192, 3, 1, rngs=rngs)
    self.conv2d_4b = BasicConv2d(192, 256, 3, 2, rngs=rngs)
    self.repeat_1 = nnx.List([Block35(0.17, rngs) for _ in range(5)])
    self.mixed_6a = Mixed6a(rngs)
    self.repeat_2 = nnx.List([Block17(0.10, rngs) for _ in range(10)])
    self.mixed_7a = Mixed7a(rngs)
    self.repeat_3 = nnx.List([Block8(0.20, rngs) for _ in range(5)])
    self.block8 = Block8(1.0, rngs, relu=False)
    self.last_linear = nnx.Linear(1792, EMBED_DIM, use_bias=False, rngs=rngs)
    self.last_bn = nnx.BatchNorm(EMBED_DIM, epsilon=BN_EPS, use_running_average=True, rngs=rngs)

  def features(self, x):
    """x [B, H, W, 3] -> last_bn output [B, 512] (before the L2 normalisation)."""
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f'InceptionResnetV1 takes [B, H, W, 3] NHWC images, got {x.shape}')
    if min(_out_side(x.shape[1]), _out_side(x.shape[2])) < 1:
      raise ValueError(f'InceptionResnetV1: input {x.shape[1]}x{x.shape[2]} is too small')
    x = self.conv2d_2b(self.conv2d_2a(self.conv2d_1a(x)))
    x = max_pool(x, 3, 2)  # maxpool_3a
    x = self.conv2d_4b(self.conv2d_4a(self.conv2d_3b(x)))
    x = self.mixed_6a(_run(self.repeat_1, x))
    x = self.mixed_7a(_run(self.repeat_2, x))
    x = self.block8(_run(self.repeat_3, x))
    x = jnp.mean(x, axis=(1, 2))  # avgpool_1a; dropout is the identity in eval mode
    return self.last_bn(self.last_linear(x))

  def embed(self, x):
    """x [B, H, W, 3] standardised -> [B, 512] unit vectors (``F.normalize``, eps 1e-12)."""
    x = self.features(x)
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, 1e-12)
