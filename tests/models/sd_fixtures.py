"""Shared fixtures of the Stable Diffusion tests: a CLIP tokenizer folder written by hand.

``write_tokenizer`` writes a tiny byte-level BPE vocabulary in CLIP's layout (the 256 byte symbols,
their ``</w>`` variants, merges learned from ``CORPUS``, the two special tokens) as an SD
``tokenizer/`` folder (``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` and, in the legacy
style, ``special_tokens_map.json``), as the SD 1.x / 2.x repositories ship it: transformers 5.x's
``save_pretrained`` writes only ``tokenizer.json``, which ``models/clip_tokenizer.py`` does not
read.
Imported by ``tests/models/test_clip_text.py`` and ``tests/convert/test_sd.py``.
"""

import collections
import json

from drc_jax.models import clip_tokenizer as ct

CORPUS = (
  'a photo of an astronaut riding a horse on the moon. the cat sat on the mat; it is the best!! '
  "don't they're we've i'm you'll he'd café naïve résumé 2024 hello world, a painting of a cat"
)


def _added(text, normalized):
  return {
    '__type': 'AddedToken',
    'content': text,
    'lstrip': False,
    'normalized': normalized,
    'rstrip': False,
    'single_word': False,
  }


def write_tokenizer(folder, pad, style='legacy', n_merges=60):
  """An SD-style tokenizer folder: CLIP's vocabulary layout, merges learned from CORPUS."""
  folder.mkdir(parents=True, exist_ok=True)
  base = list(ct.bytes_to_unicode().values())
  vocab = base + [c + ct.END_OF_WORD for c in base]
  words = collections.Counter()
  for piece in ct.pre_tokenize(ct.normalize(CORPUS)):
    symbols = [ct.bytes_to_unicode()[b] for b in piece.encode()]
    symbols[-1] += ct.END_OF_WORD
    words[tuple(symbols)] += 1
  merges = []
  for _ in range(n_merges):
    pairs = collections.Counter()
    for word, count in words.items():
      for pair in zip(word[:-1], word[1:]):
        pairs[pair] += count
    best = max(pairs, key=lambda p: (pairs[p], p))
    merges.append(best)
    vocab.append(best[0] + best[1])
    merged = collections.Counter()
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
  vocab += [ct.BOS, ct.EOS]
  ids = {t: i for i, t in enumerate(vocab)}
  (folder / 'vocab.json').write_text(json.dumps(ids))
  (folder / 'merges.txt').write_text('#version: 0.2\n' + ''.join(f'{a} {b}\n' for a, b in merges))
  common = {'model_max_length': 77, 'tokenizer_class': 'CLIPTokenizer', 'do_lower_case': True}
  if style == 'legacy':  # as the SD 1.x / 2.x repositories ship them
    special = {
      'bos_token': _added(ct.BOS, True),
      'eos_token': _added(ct.EOS, True),
      'unk_token': _added(ct.EOS, True),
      'pad_token': pad,
    }
    (folder / 'tokenizer_config.json').write_text(json.dumps(dict(common, **special)))
    (folder / 'special_tokens_map.json').write_text(json.dumps(special))
  else:  # saved by transformers 4.3x: added_tokens_decoder with explicit flags
    entry = lambda t, n: dict(_added(t, n), special=True)
    decoder = {str(ids[ct.BOS]): entry(ct.BOS, False), str(ids[ct.EOS]): entry(ct.EOS, True)}
    if pad == '!':
      decoder['0'] = entry('!', False)
    names = {'bos_token': ct.BOS, 'eos_token': ct.EOS, 'unk_token': ct.EOS, 'pad_token': pad}
    doc = dict(common, added_tokens_decoder=decoder, **names)
    (folder / 'tokenizer_config.json').write_text(json.dumps(doc))
  return folder
