"""UNet shapes, parameter counts and layout options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drc_jax.models import unet as M


def test_paper_unet_has_35_7m_parameters():
  _, params = M.DiffusionModel.abstract(M.UNetConfig())  # shapes only, no allocation
  assert abs(M.count_params(params) / 1e6 - 35.7) <= 0.1
  names = M.flat_param_shapes(params)
  # pytorch-ddpm layout: 2 blocks x 4 levels + 3 downsamples (11);
  # 3 blocks x 4 levels + 3 upsamples (15).
  assert names['head.kernel'] == (3, 3, 3, 128)
  assert 'downblocks.10.conv2.kernel' in names and 'downblocks.11.conv1.kernel' not in names
  assert 'upblocks.14.conv1.kernel' in names and 'upblocks.15.conv1.kernel' not in names
  assert 'downblocks.2.main.kernel' in names  # first DownSample
  assert 'downblocks.3.attn.proj_q.kernel' in names  # 16x16 level has attention
  assert 'downblocks.0.attn.proj_q.kernel' not in names
  assert 'middleblocks.0.attn.proj.kernel' in names and 'tail_conv.kernel' in names


@pytest.mark.parametrize('channels', [1, 3])
def test_small_unet_output_shape_and_dtype(channels):
  cfg = M.UNetConfig(
    resolution=16,
    in_channels=channels,
    out_channels=channels,
    ch=16,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_res=(8,),
    norm_groups=8,
  )
  model, params = M.DiffusionModel.create(cfg)
  x = jnp.ones((3, 16, 16, channels))
  y = jax.jit(model.apply)(params, x, jnp.array([0, 10, 999]))
  assert y.shape == x.shape and y.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(y)))


def test_time_embedding_layouts():
  t = jnp.array([0, 5])
  inter = M.timestep_embedding(t, 8, 'interleaved', 0)
  sc = M.timestep_embedding(t, 8, 'sin_cos', 0)
  np.testing.assert_allclose(inter[:, 0::2], sc[:, :4], rtol=1e-6)
  np.testing.assert_allclose(inter[:, 1::2], sc[:, 4:], rtol=1e-6)
  # freq shift 1: frequencies exp(-log(1e4) i / (half - 1)), last one exactly 1e-4.
  e = M.timestep_embedding(jnp.array([1]), 8, 'sin_cos', 1)
  assert float(e[0, 3]) == pytest.approx(np.sin(1e-4), rel=1e-4)
  assert float(M.timestep_embedding(jnp.array([1]), 8, 'cos_sin', 1)[0, 0]) == pytest.approx(
    np.cos(1.0), rel=1e-6
  )


def test_bad_model_configs_are_named():
  with pytest.raises(ValueError, match='norm_groups'):
    M.UNetConfig(ch=24, norm_groups=32)
  with pytest.raises(ValueError, match='resolution'):
    M.UNetConfig(resolution=30)
  with pytest.raises(ValueError, match=r"model config: unknown UNetConfig keys \['chh'\]"):
    M.UNetConfig.from_dict({'chh': 3})


def test_multihead_attention_matches_a_per_head_softmax():
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(2, 5, 6)).astype(np.float32) for _ in range(3))
  got = np.asarray(M.multihead_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), 3))
  want = np.zeros_like(q)
  for h in range(3):  # head h owns channels 2h, 2h + 1
    s = slice(2 * h, 2 * h + 2)
    logits = np.einsum('bqc,bkc->bqk', q[..., s], k[..., s]) / np.sqrt(2)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    want[..., s] = np.einsum('bqk,bkc->bqc', w / w.sum(-1, keepdims=True), v[..., s])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_attn_head_dim_must_divide_the_attention_widths():
  base = dict(resolution=16, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_res=(8,), norm_groups=8)
  with pytest.raises(ValueError, match='attn_head_dim 12 does not divide the attention widths'):
    M.UNetConfig(**base, attn_head_dim=12)
  cfg = M.UNetConfig(**base, attn_head_dim=8)  # 32 channels at 8x8 and the middle: 4 heads
  assert cfg.to_dict()['attn_head_dim'] == 8 and 'attn_head_dim' not in M.UNetConfig().to_dict()
  model, params = M.DiffusionModel.create(cfg)
  y = jax.jit(model.apply)(params, jnp.ones((1, 16, 16, 3)), jnp.array([5]))
  assert y.shape == (1, 16, 16, 3)
