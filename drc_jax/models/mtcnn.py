"""MTCNN's three face-detection networks (PNet, RNet, ONet) in Flax NNX, and their weights.

The networks are facenet-pytorch's (``facenet_pytorch.models.mtcnn``), NHWC instead of NCHW, with
the same module names, so each parameter maps to its state-dict key by rule
(``drc_jax.convert.facenet.torch_source``). ``drc_jax.drc.faces`` runs them in the detection
pipeline.

* ``PNet`` (fully convolutional, any size >= 12): [B, H, W, 3] -> (box regression [B, h, w, 4],
  face probability [B, h, w, 2]) on a grid of stride 2 and cell 12.
* ``RNet``: [B, 24, 24, 3] -> (regression [B, 4], probability [B, 2]).
* ``ONet``: [B, 48, 48, 3] -> (regression [B, 4], landmarks [B, 10], probability [B, 2]).

Inputs are pixels standardised as ``(pixel - 127.5) * 0.0078125``.

The pretrained weights ship inside the facenet-pytorch package; ``drc_jax.convert.facenet``
reads them (``mtcnn_params_from_facenet_pytorch``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

NETS = ('pnet', 'rnet', 'onet')


class PReLU(nnx.Module):
  """``nn.PReLU(c)``: x if x >= 0 else weight[c] * x, one slope per channel (last axis)."""

  def __init__(self, c: int):
    self.weight = nnx.Param(jnp.full((c,), 0.25, jnp.float32))

  def __call__(self, x):
    slope = self.weight[...].reshape((1,) * (x.ndim - 1) + (-1,))
    return jnp.where(x >= 0, x, slope * x)


def max_pool_ceil(x, k: int, s: int):
  """``nn.MaxPool2d(k, s, ceil_mode=True)`` on [B, H, W, C]: a last, partial window is kept."""

  def pad(n):
    out = -(-(n - k) // s) + 1
    if (out - 1) * s >= n:  # PyTorch drops a last window that would start outside the input
      out -= 1
    return (0, max(0, (out - 1) * s + k - n))

  padding = ((0, 0), pad(x.shape[1]), pad(x.shape[2]), (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, k, k, 1), (1, s, s, 1), padding)


def _conv(cin, cout, k, rngs):
  return nnx.Conv(cin, cout, kernel_size=(k, k), padding='VALID', rngs=rngs)


def _flatten_whc(x):
  """PyTorch's ``x.permute(0, 3, 2, 1).reshape(B, -1)`` of NCHW, from NHWC: (W, H, C) order."""
  return jnp.transpose(x, (0, 2, 1, 3)).reshape(x.shape[0], -1)


class PNet(nnx.Module):
  """Proposal network (fully convolutional, 12x12 receptive field, stride 2)."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1, self.prelu1 = _conv(3, 10, 3, rngs), PReLU(10)
    self.conv2, self.prelu2 = _conv(10, 16, 3, rngs), PReLU(16)
    self.conv3, self.prelu3 = _conv(16, 32, 3, rngs), PReLU(32)
    self.conv4_1 = _conv(32, 2, 1, rngs)
    self.conv4_2 = _conv(32, 4, 1, rngs)

  def __call__(self, x):
    x = max_pool_ceil(self.prelu1(self.conv1(x)), 2, 2)
    x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
    return self.conv4_2(x), jax.nn.softmax(self.conv4_1(x), axis=-1)


class RNet(nnx.Module):
  """Refinement network on 24x24 crops."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1, self.prelu1 = _conv(3, 28, 3, rngs), PReLU(28)
    self.conv2, self.prelu2 = _conv(28, 48, 3, rngs), PReLU(48)
    self.conv3, self.prelu3 = _conv(48, 64, 2, rngs), PReLU(64)
    self.dense4, self.prelu4 = nnx.Linear(576, 128, rngs=rngs), PReLU(128)
    self.dense5_1 = nnx.Linear(128, 2, rngs=rngs)
    self.dense5_2 = nnx.Linear(128, 4, rngs=rngs)

  def __call__(self, x):
    x = max_pool_ceil(self.prelu1(self.conv1(x)), 3, 2)
    x = max_pool_ceil(self.prelu2(self.conv2(x)), 3, 2)
    x = self.prelu4(self.dense4(_flatten_whc(self.prelu3(self.conv3(x)))))
    return self.dense5_2(x), jax.nn.softmax(self.dense5_1(x), axis=-1)


class ONet(nnx.Module):
  """Output network on 48x48 crops (boxes, five landmarks, probabilities)."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1, self.prelu1 = _conv(3, 32, 3, rngs), PReLU(32)
    self.conv2, self.prelu2 = _conv(32, 64, 3, rngs), PReLU(64)
    self.conv3, self.prelu3 = _conv(64, 64, 3, rngs), PReLU(64)
    self.conv4, self.prelu4 = _conv(64, 128, 2, rngs), PReLU(128)
    self.dense5, self.prelu5 = nnx.Linear(1152, 256, rngs=rngs), PReLU(256)
    self.dense6_1 = nnx.Linear(256, 2, rngs=rngs)
    self.dense6_2 = nnx.Linear(256, 4, rngs=rngs)
    self.dense6_3 = nnx.Linear(256, 10, rngs=rngs)

  def __call__(self, x):
    x = max_pool_ceil(self.prelu1(self.conv1(x)), 3, 2)
    x = max_pool_ceil(self.prelu2(self.conv2(x)), 3, 2)
    x = max_pool_ceil(self.prelu3(self.conv3(x)), 2, 2)
    x = self.prelu5(self.dense5(_flatten_whc(self.prelu4(self.conv4(x)))))
    return self.dense6_2(x), self.dense6_3(x), jax.nn.softmax(self.dense6_1(x), axis=-1)


class MTCNN(nnx.Module):
  """The three networks, so that one (graphdef, params) pair carries them all."""

  def __init__(self, rngs: nnx.Rngs):
    self.pnet = PNet(rngs)
    self.rnet = RNet(rngs)
    self.onet = ONet(rngs)


def build(seed: int = 0):
  """(graphdef, params) of randomly initialised networks (tests)."""
  graphdef, state = nnx.split(MTCNN(nnx.Rngs(seed)))
  return graphdef, nnx.to_pure_dict(state)


def abstract():
  """(graphdef, params as ShapeDtypeStructs)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: MTCNN(nnx.Rngs(0))))
  return graphdef, nnx.to_pure_dict(state)
