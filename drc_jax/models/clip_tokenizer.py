"""CLIP's byte-level BPE tokenizer in pure Python: the ids transformers' ``CLIPTokenizer`` gives.

Reads a Stable Diffusion pipeline's ``tokenizer/`` folder (``vocab.json``, ``merges.txt`` and,
when present, ``tokenizer_config.json`` / ``special_tokens_map.json`` for the special tokens and
the padding) and computes what transformers 5.x's ``CLIPTokenizer`` (the ``tokenizers``-backed
one, formerly ``CLIPTokenizerFast``) computes for
``tok(texts, padding='max_length', max_length=77, truncation=True).input_ids``:

1. Special tokens: the occurrences of each added token's text (bos ``<|startoftext|>``, eos
   ``<|endoftext|>``, unk, pad, the folder's other added tokens) are split out, leftmost and
   longest first, and become their ids: tokens the folder marks ``normalized`` in the normalised
   text, the others (a token given as a plain string) in the raw text, as ``tokenizers`` does.
   Which is which follows transformers 5.x's reading of the folder (``_added_tokens``).
2. Normalisation, as the backend's normaliser: NFC, every run of Unicode whitespace (the
   ``White_Space`` property, what Oniguruma's ``\\s`` matches) replaced by one space, then each
   character lowercased on its own (Rust's ``char::to_lowercase``: no final-sigma rule). ftfy's
   text repair is not applied (the fast tokenizer does not apply it either).
3. Pre-tokenisation by CLIP's pattern ``<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|
   'll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`` (matches kept, the rest dropped): letter runs,
   single digits, runs of other non-space characters; letters and numbers by Unicode general
   category (L*, N*) as Python's ``unicodedata`` knows them. ByteLevel's GPT-2 pattern then
   splits only the special-token matches (``<|``, ``endoftext``, ``|>``), the others are whole.
4. Each piece's UTF-8 bytes mapped to GPT-2's printable byte alphabet (``bytes_to_unicode``), the
   last symbol given the end-of-word suffix ``</w>``, then BPE: the adjacent pair of lowest merge
   rank (``merges.txt`` order, ``#version`` lines skipped) merged first, the leftmost on ties,
   until no pair has a rank; symbols missing from the vocabulary become the unk token.
5. ``[bos] + ids[:max_length - 2] + [eos]``, padded on the right to ``max_length`` with the pad
   token: ``<|endoftext|>`` in SD 1.x's folders (OpenAI CLIP), ``!`` (id 0) in SD 2.x's (OpenCLIP).
   A pad token that is an ordinary vocabulary entry (``!``) is still a special token: a ``!`` in
   the text is split out as id 0, as transformers does.

Unicode tables are Python's (``unicodedata``); the Rust ones of ``tokenizers`` may be of another
Unicode version, which can only matter for characters assigned in between. Not read:
``tokenizer.json`` (a folder holding only it, as transformers 5.x's ``save_pretrained`` writes, is
refused for want of vocab.json), added tokens with ``lstrip``/``rstrip``/``single_word`` (refused
by name), and non-special added tokens whose text is not in vocab.json (refused).
"""

from __future__ import annotations

import collections
import functools
import json
import os
import tempfile
import typing
import unicodedata
from collections.abc import Sequence

import numpy as np
from etils import epath

from drc_jax.core import errors

BOS = '<|startoftext|>'
EOS = '<|endoftext|>'
END_OF_WORD = '</w>'
CONTEXT_LENGTH = 77  # Stable Diffusion's and CLIP's text length (with bos and eos)
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")  # the pattern's order
# Unicode's White_Space property (Oniguruma's \s on UTF-8 text)
_WHITESPACE = frozenset(
  '\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000'
  + ''.join(chr(c) for c in range(0x2000, 0x200B))
)
# transformers' special-token attributes in the order they are added to the backend
_NAMED = (
  'bos_token',
  'eos_token',
  'unk_token',
  'sep_token',
  'pad_token',
  'cls_token',
  'mask_token',
)
_DEFAULTS = {'bos_token': BOS, 'eos_token': EOS, 'unk_token': EOS, 'pad_token': EOS}


class TokenizerError(errors.UserError, ValueError):
  """A tokenizer folder that cannot be read; the message names the file or field."""


class AddedToken(typing.NamedTuple):
  """A token split out of the text before BPE (the special tokens)."""

  text: str
  normalized: bool  # matched in the normalised text (else in the raw text)


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's map of the 256 byte values to printable characters (CLIP's base alphabet), in the
  order of CLIP's vocabulary (the printable bytes first, then the others shifted to 256+)."""
  keep = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1)]
  keep += range(ord('®'), ord('ÿ') + 1)
  out = {b: chr(b) for b in keep}
  for b in range(256):
    if b not in out:
      out[b] = chr(256 + len(out) - len(keep))
  return out


def normalize(text: str) -> str:
  """NFC, whitespace runs to one space, lowercase character by character (the backend's)."""
  text = unicodedata.normalize('NFC', text)
  out, in_space = [], False
  for c in text:
    if c in _WHITESPACE:
      if not in_space:
        out.append(' ')
      in_space = True
    else:
      out.append(c.lower())
      in_space = False
  return ''.join(out)


def _is_letter(c: str) -> bool:
  return unicodedata.category(c)[0] == 'L'


def _is_number(c: str) -> bool:
  return unicodedata.category(c)[0] == 'N'


def pre_tokenize(text: str) -> list[str]:
  """CLIP's pattern on normalised text: the pieces BPE sees, in order."""
  pieces, i, n = [], 0, len(text)
  while i < n:
    c = text[i]
    special = next((s for s in (BOS, EOS) if text.startswith(s, i)), None)
    contraction = next((s for s in _CONTRACTIONS if text.startswith(s, i)), None)
    if special:  # one match of the pattern, which ByteLevel's GPT-2 pattern splits in three
      pieces += ['<|', special[2:-2], '|>']
      i += len(special)
      continue
    if contraction:
      j = i + len(contraction)
    elif _is_letter(c):
      j = i + 1
      while j < n and _is_letter(text[j]):
        j += 1
    elif _is_number(c):
      j = i + 1
    elif c in _WHITESPACE:
      i += 1
      continue
    else:
      j = i + 1
      while j < n and not (text[j] in _WHITESPACE or _is_letter(text[j]) or _is_number(text[j])):
        j += 1
    pieces.append(text[i:j])
    i = j
  return pieces


def _split(text: str, tokens: Sequence[tuple[str, str]]) -> list[tuple[str, str | None]]:
  """(segment, None) and (match, token) in order: the leftmost-longest matches of the tokens'
  texts (``tokens``: (text as matched, token), longest first) split out of ``text``."""
  out, start, i = [], 0, 0
  while i < len(text) and tokens:
    hit = next(((m, t) for m, t in tokens if text.startswith(m, i)), None)
    if hit is None:
      i += 1
      continue
    if i > start:
      out.append((text[start:i], None))
    out.append(hit)
    i = start = i + len(hit[0])
  if start < len(text):
    out.append((text[start:], None))
  return out


def _read_vocab(path: epath.Path) -> dict[str, int]:
  if not path.exists():
    raise TokenizerError(f'{path}: not found (a CLIP tokenizer folder needs vocab.json)')
  try:
    vocab = json.loads(path.read_text(encoding='utf-8'))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise TokenizerError(f'{path}: not a readable JSON vocabulary ({e})') from e
  if not isinstance(vocab, dict) or not vocab:
    raise TokenizerError(f'{path}: expected a non-empty JSON object of token -> id')
  bad = [k for k, v in vocab.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0]
  if bad:
    raise TokenizerError(f'{path}: token {bad[0]!r} has id {vocab[bad[0]]!r}, not an integer >= 0')
  return vocab


def _read_merges(path: epath.Path, vocab: dict[str, int]) -> dict[tuple[str, str], int]:
  """Pair -> rank, as ``tokenizers`` reads merges.txt (a later duplicate pair wins)."""
  if not path.exists():
    raise TokenizerError(f'{path}: not found (a CLIP tokenizer folder needs merges.txt)')
  try:
    lines = path.read_text(encoding='utf-8').splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise TokenizerError(f'{path}: unreadable ({e})') from e
  ranks, rank = {}, 0
  for number, line in enumerate(lines, 1):
    if line.startswith('#version'):
      continue
    parts = line.split(' ')
    if len(parts) != 2 or not all(parts):
      raise TokenizerError(f'{path}: line {number} {line!r} is not a merge "a b"')
    missing = [t for t in (*parts, parts[0] + parts[1]) if t not in vocab]
    if missing:
      raise TokenizerError(
        f'{path}: line {number} merges {line!r} but {missing[0]!r} is not in vocab.json'
      )
    ranks[(parts[0], parts[1])] = rank
    rank += 1
  return ranks


def _read_doc(path: epath.Path) -> dict | None:
  if not path.exists():
    return None
  try:
    doc = json.loads(path.read_text(encoding='utf-8'))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise TokenizerError(f'{path}: not valid JSON ({e})') from e
  if not isinstance(doc, dict):
    raise TokenizerError(f'{path}: expected a JSON object, found {type(doc).__name__}')
  return doc


def _added(value, default_normalized: bool, where: str) -> AddedToken | None:
  """A token as the config files write it: a string (special, not normalized) or an object."""
  if value is None:
    return None
  if isinstance(value, str) and value:
    return AddedToken(value, False)
  if not isinstance(value, dict) or not isinstance(value.get('content'), str):
    raise TokenizerError(f'{where} is not a token string or AddedToken object ({value!r})')
  stripping = [k for k in ('lstrip', 'rstrip', 'single_word') if value.get(k)]
  if stripping:
    raise TokenizerError(f'{where}: {stripping[0]}=true is not supported ({value["content"]!r})')
  return AddedToken(value['content'], bool(value.get('normalized', default_normalized)))


def _extras(doc: dict, where) -> list:
  extras = doc.get('extra_special_tokens') or doc.get('additional_special_tokens') or []
  if not isinstance(extras, list):
    raise TokenizerError(f'{where}: extra_special_tokens is not a list (not supported)')
  return extras


def _added_tokens(folder: epath.Path) -> tuple[dict[str, AddedToken], list[AddedToken], dict]:
  """(bos/eos/unk/pad, every token split out of the text, tokenizer_config.json's document).

  As transformers 5.x's ``from_pretrained`` reads them: with ``added_tokens_decoder`` in
  tokenizer_config.json, a named token takes that entry's flags; without it (SD's folders),
  special_tokens_map.json's entries replace tokenizer_config.json's. A string is a special token
  matched in the raw text (not normalized); an object says ``normalized``. The named tokens are
  then added in transformers' order (bos, eos, unk, sep, pad, cls, mask, extras), a later one
  setting the flag of an equal text (SD 1.x's string pad ``<|endoftext|>`` makes eos raw).
  """
  config_path, map_path = folder / 'tokenizer_config.json', folder / 'special_tokens_map.json'
  config = _read_doc(config_path) or {}
  where = str(config_path)
  decoder = config.get('added_tokens_decoder')
  if decoder is not None and not isinstance(decoder, dict):
    raise TokenizerError(f'{where}: added_tokens_decoder is not an object')
  listed = {}  # added_tokens_decoder: text -> token
  for key, tok in (decoder or {}).items():
    t = _added(tok, not (isinstance(tok, dict) and tok.get('special')), f'{where}: {key}')
    listed[t.text] = t
  values = {k: (config[k], f'{where}: {k}', True) for k in _NAMED if k in config}
  extras = [(v, f'{where}: extra_special_tokens', True) for v in _extras(config, where)]
  if decoder is None and (doc := _read_doc(map_path)) is not None:
    values |= {k: (doc[k], f'{map_path}: {k}', False) for k in _NAMED if k in doc}
    extras += [(v, f'{map_path}: extra_special_tokens', False) for v in _extras(doc, map_path)]
  for key, text in _DEFAULTS.items():  # CLIPTokenizer's defaults
    values.setdefault(key, (text, f'{where}: {key}', True))
  named: dict[str, AddedToken] = {}
  order = [(k, *values[k]) for k in _NAMED if k in values]
  order += [(f'extra_special_tokens[{i}]', *e) for i, e in enumerate(extras)]
  flags = {t.text: t for t in listed.values()}
  for key, value, where_key, default in order:
    token = _added(value, default, where_key)
    if token is None:
      continue
    token = listed.get(token.text, token)
    named[key] = token
    flags[token.text] = token
  missing = [k for k in _DEFAULTS if k not in named]
  if missing:
    raise TokenizerError(f'{where}: {missing[0]} is null (CLIP needs bos, eos, unk and pad)')
  return named, list(flags.values()), config


class CLIPTokenizer:
  """CLIP's BPE tokenizer; ``tokenize(texts) -> int32 [B, max_length]`` (see the module doc)."""

  def __init__(
    self,
    vocab: dict[str, int],
    ranks: dict[tuple[str, str], int],
    named: dict[str, AddedToken],
    added: Sequence[AddedToken] = (),
    max_length: int = CONTEXT_LENGTH,
    padding_side: str = 'right',
    where: str = 'CLIP tokenizer',
  ):
    """A tokenizer from its vocabulary, merge ranks and special tokens.

    Args:
      vocab: token -> id (byte-level symbols, their ``</w>`` variants, merges, special tokens).
      ranks: merge pair -> rank (lower merges first).
      named: bos_token, eos_token, unk_token and pad_token (others ignored); each in ``vocab``.
      added: every token split out of the text (the named ones included), each in ``vocab``.
      max_length: the padded length (77), bos and eos included.
      padding_side: 'right' (CLIP's) or 'left'.
      where: the folder, for messages.
    """
    for token in (*(named[k] for k in _DEFAULTS), *added):
      if token.text not in vocab:
        raise TokenizerError(f'{where}: special token {token.text!r} is not in vocab.json')
    if max_length < 2:
      raise TokenizerError(f'{where}: max_length {max_length} leaves no room for bos and eos')
    if padding_side not in ('right', 'left'):
      raise TokenizerError(f"{where}: padding_side {padding_side!r} is not 'right' or 'left'")
    self.vocab, self.ranks = vocab, ranks
    self.max_length, self.padding_side = max_length, padding_side
    self.bos_id, self.eos_id = vocab[named['bos_token'].text], vocab[named['eos_token'].text]
    self.unk_id, self.pad_id = vocab[named['unk_token'].text], vocab[named['pad_token'].text]
    longest_first = sorted(added, key=lambda t: (-len(t.text), t.text))
    self.raw_special = [t.text for t in longest_first if not t.normalized]
    self.normalized_special = sorted(
      {normalize(t.text): t.text for t in longest_first if t.normalized}.items(),
      key=lambda kv: (-len(kv[0]), kv[0]),
    )  # [(text as matched, token)]
    self._byte = bytes_to_unicode()
    self._cache: dict[str, list[int]] = {}

  @classmethod
  def from_folder(cls, folder, max_length: int = CONTEXT_LENGTH) -> CLIPTokenizer:
    """Reads ``folder/vocab.json``, ``merges.txt`` and the special tokens and padding side of
    ``tokenizer_config.json`` / ``special_tokens_map.json`` (CLIP's defaults when absent)."""
    folder = epath.Path(folder)
    if not folder.is_dir():
      raise TokenizerError(f'{folder}: not a tokenizer folder (vocab.json + merges.txt)')
    vocab = _read_vocab(folder / 'vocab.json')
    ranks = _read_merges(folder / 'merges.txt', vocab)
    named, added, config = _added_tokens(folder)
    side = config.get('padding_side', 'right')
    return cls(vocab, ranks, named, added, max_length, side, str(folder))

  def bpe(self, piece: str) -> list[int]:
    """The ids of one pre-tokenized piece (byte-level symbols, ``</w>`` on the last, merged)."""
    if piece in self._cache:
      return self._cache[piece]
    symbols = [self._byte[b] for b in piece.encode('utf-8')]
    symbols[-1] += END_OF_WORD
    while len(symbols) > 1:
      pairs = [self.ranks.get(p) for p in zip(symbols[:-1], symbols[1:])]
      ranked = [(r, i) for i, r in enumerate(pairs) if r is not None]
      if not ranked:
        break
      _, i = min(ranked)
      symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    ids = [self.vocab.get(s, self.unk_id) for s in symbols]
    self._cache[piece] = ids
    return ids

  def encode(self, text: str) -> list[int]:
    """The ids of ``text`` without bos, eos, truncation or padding."""
    ids = []
    for segment, raw in _split(text, [(t, t) for t in self.raw_special]):
      if raw is not None:
        ids.append(self.vocab[raw])
        continue
      for part, token in _split(normalize(segment), self.normalized_special):
        if token is not None:
          ids.append(self.vocab[token])
          continue
        for piece in pre_tokenize(part):
          ids += self.bpe(piece)
    return ids

  def tokenize(self, texts: Sequence[str]) -> np.ndarray:
    """``texts`` -> int32 [B, max_length]: bos, the first max_length - 2 ids, eos, padding."""
    if isinstance(texts, str):
      raise TypeError('tokenize takes a list of strings, not one string')
    out = np.full((len(texts), self.max_length), self.pad_id, np.int32)  # [B, L]
    for row, text in enumerate(texts):
      ids = [self.bos_id, *self.encode(text)[: self.max_length - 2], self.eos_id]
      if self.padding_side == 'right':
        out[row, : len(ids)] = ids
      else:
        out[row, self.max_length - len(ids) :] = ids
    return out


def load(folder, max_length: int = CONTEXT_LENGTH) -> CLIPTokenizer:
  """The CLIP tokenizer of an SD pipeline's ``tokenizer/`` folder (``from_folder``)."""
  return CLIPTokenizer.from_folder(folder, max_length)


def from_files(files: dict[str, bytes], max_length: int = CONTEXT_LENGTH) -> CLIPTokenizer:
  """The tokenizer of a folder's files held in memory ({file name: bytes}, e.g.
  ``vocabulary_files``'), read as ``load`` reads the folder."""
  with tempfile.TemporaryDirectory() as tmp:
    for name, data in files.items():
      if os.path.basename(name) != name:
        raise TokenizerError(f'tokenizer file name {name!r} is not a plain file name')
      with open(os.path.join(tmp, name), 'wb') as f:
        f.write(data)
    return load(tmp, max_length)


def _token_entry(text: str, normalized: bool) -> dict:
  """An AddedToken object as the SD repositories' config files write it."""
  return {
    '__type': 'AddedToken',
    'content': text,
    'lstrip': False,
    'normalized': normalized,
    'rstrip': False,
    'single_word': False,
  }


def learn_merges(corpus: str, n_merges: int) -> list[tuple[str, str]]:
  """Up to ``n_merges`` BPE merges learned from ``corpus`` (pre-tokenized as ``tokenize``
  does): the most frequent adjacent pair first (ties: the greatest pair), fewer when the corpus
  runs out of pairs."""
  byte = bytes_to_unicode()
  words: collections.Counter = collections.Counter()
  for piece in pre_tokenize(normalize(corpus)):
    symbols = [byte[b] for b in piece.encode('utf-8')]
    symbols[-1] += END_OF_WORD
    words[tuple(symbols)] += 1
  merges = []
  for _ in range(n_merges):
    pairs: collections.Counter = collections.Counter()
    for word, count in words.items():
      for pair in zip(word[:-1], word[1:]):
        pairs[pair] += count
    if not pairs:
      break
    best = max(pairs, key=lambda p: (pairs[p], p))
    merges.append(best)
    merged: collections.Counter = collections.Counter()
    for word, count in words.items():
      out, i = [], 0
      while i < len(word):
        if word[i : i + 2] == best:
          out.append(best[0] + best[1])
          i += 2
        else:
          out.append(word[i])
          i += 1
      merged[tuple(out)] += count
    words = merged
  return merges


def vocabulary_files(
  corpus: str,
  n_merges: int,
  max_length: int = CONTEXT_LENGTH,
  *,
  pad: str = EOS,
  style: str = 'legacy',
) -> dict[str, bytes]:
  """The files of a CLIP-layout tokenizer folder with merges learned from ``corpus``: a tokenizer
  for a target trained or built here (offline, no download).

  The vocabulary is CLIP's layout: the 256 byte symbols, their ``</w>`` variants, one token per
  merge (``learn_merges``), then bos and eos. Any text tokenizes (every byte is a symbol); the
  corpus decides which words are single tokens.

  Args:
    corpus: the text the merges are learned from (e.g. the training captions).
    n_merges: the most merges learned.
    max_length: the padded length (``model_max_length``), bos and eos included.
    pad: the pad token: ``EOS`` (SD 1.x, OpenAI CLIP) or ``'!'`` (SD 2.x, OpenCLIP).
    style: 'legacy' (as the SD 1.x / 2.x repositories ship them: ``tokenizer_config.json`` and
      ``special_tokens_map.json`` with AddedToken objects) or 'decoder' (as transformers 4.3x
      saves them: ``added_tokens_decoder`` with explicit flags, no ``special_tokens_map.json``).

  Returns:
    {file name: bytes}: ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` and, in the
    legacy style, ``special_tokens_map.json``.
  """
  if style not in ('legacy', 'decoder'):
    raise ValueError(f"style {style!r} is not 'legacy' or 'decoder'")
  base = list(bytes_to_unicode().values())
  merges = learn_merges(corpus, n_merges)
  vocab = base + [c + END_OF_WORD for c in base] + [a + b for a, b in merges] + [BOS, EOS]
  ids = {t: i for i, t in enumerate(vocab)}
  files = {
    'vocab.json': json.dumps(ids).encode(),
    'merges.txt': ('#version: 0.2\n' + ''.join(f'{a} {b}\n' for a, b in merges)).encode(),
  }
  common = {
    'model_max_length': int(max_length),
    'tokenizer_class': 'CLIPTokenizer',
    'do_lower_case': True,
  }
  if style == 'legacy':
    special = {
      'bos_token': _token_entry(BOS, True),
      'eos_token': _token_entry(EOS, True),
      'unk_token': _token_entry(EOS, True),
      'pad_token': pad,
    }
    files['tokenizer_config.json'] = json.dumps(dict(common, **special)).encode()
    files['special_tokens_map.json'] = json.dumps(special).encode()
  else:

    def entry(text, normalized):
      return dict(_token_entry(text, normalized), special=True)

    decoder = {str(ids[BOS]): entry(BOS, False), str(ids[EOS]): entry(EOS, True)}
    if pad in ids and pad not in (BOS, EOS):
      decoder[str(ids[pad])] = entry(pad, False)
    names = {'bos_token': BOS, 'eos_token': EOS, 'unk_token': EOS, 'pad_token': pad}
    files['tokenizer_config.json'] = json.dumps(
      dict(common, added_tokens_decoder=decoder, **names)
    ).encode()
  return files
