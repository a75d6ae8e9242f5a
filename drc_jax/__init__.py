"""drc_jax: Degrade, Restore, Compare membership audits of diffusion models in JAX.

The public API (everything else is internal and may change between releases):

  auditor = drc_jax.Auditor('shipped:fashion_mnist')   # a target: path, workdir or shipped name
  result = auditor.score(images)                        # per-attack scores, decisions, evidence

  drc_jax.load_target(path)     # a target model as a jitted epsilon predictor
  drc_jax.load_encoder(path)    # an image encoder (ViT / DINO, CLIP, face-ID)
  drc_jax.ATTACKS               # the attack registry: name -> factory
  drc_jax.UserError             # the base of every error in what a user gives

Importing drc_jax is cheap and changes nothing global: the names above load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = '0.2.0'

# name -> (module, attribute): imported on first access (module __getattr__, PEP 562).
_API = {
  'Auditor': ('drc_jax.api', 'Auditor'),
  'AuditResult': ('drc_jax.api', 'AuditResult'),
  'load_target': ('drc_jax.targets.load', 'load_target'),
  'load_encoder': ('drc_jax.targets.encoders', 'load_encoder'),
  'ATTACKS': ('drc_jax.attacks.registry', 'ATTACKS'),
  'UserError': ('drc_jax.core.errors', 'UserError'),
}

__all__ = ['__version__', *_API]

if TYPE_CHECKING:
  from drc_jax.api import Auditor as Auditor
  from drc_jax.api import AuditResult as AuditResult
  from drc_jax.attacks.registry import ATTACKS as ATTACKS
  from drc_jax.core.errors import UserError as UserError
  from drc_jax.targets.encoders import load_encoder as load_encoder
  from drc_jax.targets.load import load_target as load_target


def __getattr__(name: str) -> Any:
  if name not in _API:
    raise AttributeError(f'module drc_jax has no attribute {name!r}')
  module, attr = _API[name]
  value = getattr(importlib.import_module(module), attr)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(__all__)
