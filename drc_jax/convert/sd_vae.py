"""Stable Diffusion's VAE: a diffusers ``AutoencoderKL`` folder read into
``drc_jax.models.autoencoder_kl``.

The folder is a pipeline's ``vae/`` (``config.json`` + ``diffusion_pytorch_model.safetensors`` or
``.bin``; sharded checkpoints are not supported), or the pipeline folder holding it. The
architecture and the latent scaling (``scaling_factor``, default 0.18215; ``shift_factor``) come
from ``config.json`` (``AutoencoderKLConfig.from_diffusers_config``: a field or value we do not
compute is refused by name). The state dict maps one key at a time, as the diffusers ``VQModel``
does (``convert/diffusers_ldm.py``): ``encoder.*``, ``quant_conv``, ``post_quant_conv`` and
``decoder.*``, with the attention names of diffusers < 0.14 (``query``/``key``/``value``/
``proj_attn``) read as today's. Every parameter comes from exactly one tensor of the expected
shape and every tensor is used, or ``ConversionError`` names the keys before anything is returned.
"""

from __future__ import annotations

from typing import Any

from etils import epath

from drc_jax.convert import diffusers as diffusers_lib
from drc_jax.convert import diffusers_ldm
from drc_jax.convert.common import ConversionError, assemble_tree, read_checkpoint, state_dict
from drc_jax.core import records
from drc_jax.models import autoencoder_kl as kl_lib

WEIGHT_NAMES = ('diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.bin')


def kl_config(config: dict[str, Any], where: str = 'vae/config.json') -> kl_lib.AutoencoderKLConfig:
  """The AutoencoderKLConfig of a diffusers ``AutoencoderKL`` config.

  Raises:
    ConversionError: naming ``where`` and the field our autoencoder does not compute.
  """
  try:
    return kl_lib.AutoencoderKLConfig.from_diffusers_config(config, where)
  except ValueError as e:
    raise ConversionError(str(e)) from e


def _vae_folder(src: epath.Path) -> epath.Path:
  if not src.is_dir():
    raise ConversionError(f'{src}: not a folder (expected a diffusers AutoencoderKL folder)')
  if not (src / 'config.json').exists() and (src / 'vae' / 'config.json').exists():
    return src / 'vae'  # a pipeline folder (model_index.json, vae/, unet/, ...)
  return src


def _weights(folder: epath.Path) -> epath.Path:
  for name in WEIGHT_NAMES:
    if (folder / name).exists():
      return folder / name
  raise ConversionError(
    f'{folder}: no {" or ".join(WEIGHT_NAMES)} (sharded checkpoints are not supported)'
  )


def convert_autoencoder_kl(folder) -> tuple[kl_lib.AutoencoderKLConfig, Any]:
  """Reads a diffusers ``AutoencoderKL`` folder.

  Args:
    folder: the ``vae/`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors`` or
      ``.bin``), or a pipeline folder with a ``vae/`` in it.

  Returns:
    (config, params): params is the nested dict of float32 numpy arrays in the layout of
    ``AutoencoderKL.create(config)[1]``.

  Raises:
    ConversionError: naming the folder, file, config field or state-dict keys refused.
  """
  folder = _vae_folder(epath.Path(folder))
  config_path = folder / 'config.json'
  cfg = kl_config(records.read_json(config_path, ConversionError), str(config_path))
  path = _weights(folder)
  where = str(path)
  state = diffusers_lib.rename_deprecated_attention(state_dict(read_checkpoint(path), where))
  _, abstract = kl_lib.abstract_autoencoder_kl(cfg)
  params = assemble_tree(
    abstract, diffusers_ldm.vq_sources(abstract), state, where, f'KL autoencoder {cfg}'
  )
  return cfg, params
