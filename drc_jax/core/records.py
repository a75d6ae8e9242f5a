"""Strict reading of the small documents drc_jax keeps: a JSON object from a file, and a config
dataclass from a dict. Each names the file or field it refuses, with the caller's error class."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from etils import epath


def read_json(path, error: type[Exception], hint: str = '') -> dict[str, Any]:
  """The JSON object in ``path``.

  Args:
    path: the file (local or epath).
    error: the exception raised, with a message naming ``path``.
    hint: appended to the message of a damaged file (what to do about it), e.g. '; restore it'.

  Raises:
    error: ``path`` is missing, unreadable, not valid JSON or not a JSON object.
  """
  path = epath.Path(path)
  if not path.exists():
    raise error(f'{path}: not found')
  try:
    doc = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise error(f'{path}: not valid JSON ({e}){hint}') from e
  if not isinstance(doc, dict):
    raise error(f'{path}: expected a JSON object, found {type(doc).__name__}{hint}')
  return doc


def dataclass_from_dict(cls: type, d: dict[str, Any], where: str, error: type[Exception]):
  """``cls(**d)`` with JSON lists as tuples; unknown keys and invalid values raise ``error``
  naming ``where``, the keys and the class."""
  if not isinstance(d, dict):
    raise error(f'{where}: expected an object for {cls.__name__}, found {type(d).__name__}')
  unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
  if unknown:
    raise error(f'{where}: unknown {cls.__name__} keys {unknown}')
  kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
  try:
    return cls(**kw)
  except (TypeError, ValueError) as e:
    raise error(f'{where}: invalid {cls.__name__} ({e})') from e


def diffusers_config(
  config: dict[str, Any],
  class_name: str,
  defaults: dict[str, Any],
  where: str,
  error: type[Exception],
) -> dict[str, Any]:
  """A diffusers ``config.json`` dict completed with ``defaults`` (the class's ``__init__``
  defaults), after checking that its ``_class_name`` (when present) is ``class_name`` and that
  every field is one ``defaults`` knows (``_``-prefixed bookkeeping fields aside).

  Raises:
    error: naming ``where`` and the class or the unknown fields.
  """
  name = config.get('_class_name', class_name)
  if name != class_name:
    raise error(f'{where}: _class_name {name!r} is not {class_name}')
  unknown = sorted(k for k in config if not k.startswith('_') and k not in defaults)
  if unknown:
    raise error(f'{where}: unsupported {class_name} fields {unknown}')
  return dict(defaults, **{k: v for k, v in config.items() if not k.startswith('_')})
