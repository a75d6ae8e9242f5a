"""Random tiny Stable Diffusion targets for smoke runs, built in memory (no download): SD 1.x's
layout shrunk (``random_parts``), reachable as ``drc_jax.load_target('random:sd-tiny')`` and
``'random:sd-tiny-inpaint'`` (``targets/load.py``); and the randomly initialised CLIP text tower
sized to a tokenizer that they and a text-conditioned target trained here
(``targets/train_text.py``) use.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from drc_jax.models import autoencoder_kl as kl_lib
from drc_jax.models import clip_text, clip_tokenizer, unet_cond
from drc_jax.targets import checkpoints, sd

# Random tiny targets for smoke runs: 'random:<name>' in place of a path (``targets/load.py``).
RANDOM_TARGETS = ('sd-tiny', 'sd-tiny-inpaint')
# SD 1.x's noise schedule (scheduler_config.json of the SD 1.x repositories)
SD_DIFFUSION = {
  'num_timesteps': 1000,
  'beta_schedule': 'scaled_linear',
  'beta_start': 0.00085,
  'beta_end': 0.012,
}
RANDOM_CORPUS = (
  'a photo of a t-shirt/top, a photo of a trouser, a photo of a pullover, a photo of a dress, '
  'a photo of a coat, a photo of a sandal, a photo of a shirt, a photo of a sneaker, a photo of '
  'a bag, a photo of an ankle boot, a painting of a cat, a picture of a dog'
)


def text_tower(
  tokenizer_files: dict[str, bytes], width: int, layers: int, heads: int, mlp: int, seed: int
) -> tuple[clip_text.CLIPTextConfig, Any]:
  """A randomly initialised CLIP text tower sized to a tokenizer's vocabulary: (config, params).

  ``max_position_embeddings`` is the tokenizer's ``max_length``; bos, eos and pad are its ids.
  """
  tokenizer = clip_tokenizer.from_files(tokenizer_files, _max_length(tokenizer_files))
  cfg = clip_text.CLIPTextConfig(
    vocab_size=len(tokenizer.vocab),
    hidden_size=width,
    intermediate_size=mlp,
    num_hidden_layers=layers,
    num_attention_heads=heads,
    max_position_embeddings=tokenizer.max_length,
    pad_token_id=tokenizer.pad_id,
    bos_token_id=tokenizer.bos_id,
    eos_token_id=tokenizer.eos_id,
  )
  return cfg, clip_text.CLIPTextEncoder.create(cfg, seed=seed)[1]


def _max_length(tokenizer_files: dict[str, bytes]) -> int:
  doc = json.loads(tokenizer_files.get('tokenizer_config.json', b'{}'))
  return int(doc.get('model_max_length', clip_tokenizer.CONTEXT_LENGTH))


def random_parts(name: str, seed: int = 0) -> sd.SDParts:
  """The parts of a random tiny target (``RANDOM_TARGETS``): SD 1.x's layout shrunk, on 32x32x3
  images. An ``AutoencoderKL`` of three levels (factor 4: 8x8x4 latents, scaling 0.18215), a
  UNet of two levels (32 and 64 channels, cross-attention at the first, as SD's
  ``CrossAttnDownBlock2D``... ``DownBlock2D``), a 2-layer CLIP text tower of width 32, a
  tokenizer learned from ``RANDOM_CORPUS``, SD 1.x's scaled-linear schedule of 1000 steps,
  epsilon prediction. 'sd-tiny-inpaint' has a 9-channel inpainting UNet. Seeded; its scores mean
  nothing: it runs every Stable Diffusion code path in seconds.
  """
  if name not in RANDOM_TARGETS:
    raise checkpoints.CheckpointError(
      f'random:{name}: unknown random target (one of {", ".join(RANDOM_TARGETS)})'
    )
  tokenizer_files = clip_tokenizer.vocabulary_files(RANDOM_CORPUS, 100)
  text_cfg, text_params = text_tower(tokenizer_files, 32, 2, 2, 64, seed + 2)
  vae_cfg = kl_lib.AutoencoderKLConfig(
    block_out_channels=(16, 32, 32),
    down_block_types=('DownEncoderBlock2D',) * 3,
    up_block_types=('UpDecoderBlock2D',) * 3,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
  )
  unet_cfg = unet_cond.UNetCondConfig(
    sample_size=8,
    in_channels=9 if name.endswith('-inpaint') else 4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
    up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'),
    cross_attention_dim=text_cfg.hidden_size,
    num_heads=2,
    norm_num_groups=8,
  )
  return sd.SDParts(
    unet=(unet_cfg, unet_cond.CondUNet.create(unet_cfg, seed=seed)[1]),
    vae=(vae_cfg, kl_lib.AutoencoderKL.create(vae_cfg, seed=seed + 1)[1]),
    text_encoder=(text_cfg, text_params),
    tokenizer_files=tokenizer_files,
    diffusion=dict(SD_DIFFUSION),
    prediction_type='epsilon',
    source=f'random:{name}',
    pipeline='StableDiffusionInpaintPipeline' if name.endswith('-inpaint') else sd.PIPELINE,
  )


def random_target(name: str, seed: int = 0, compile_fn: Callable = sd.no_compile) -> sd.SDTarget:
  """A random tiny target (``random_parts``) as a loaded one."""
  return sd.from_parts(random_parts(name, seed), compile_fn, path=f'random:{name}')
