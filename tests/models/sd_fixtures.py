"""Shared fixtures of the Stable Diffusion tests: a CLIP tokenizer folder written by hand.

``write_tokenizer`` writes a tiny byte-level BPE vocabulary in CLIP's layout (the 256 byte symbols,
their ``</w>`` variants, merges learned from ``CORPUS``, the two special tokens) as an SD
``tokenizer/`` folder (``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` and, in the legacy
style, ``special_tokens_map.json``), as the SD 1.x / 2.x repositories ship it: transformers 5.x's
``save_pretrained`` writes only ``tokenizer.json``, which ``models/clip_tokenizer.py`` does not
read. The files are ``clip_tokenizer.vocabulary_files``'.
Imported by ``tests/models/test_clip_text.py`` and ``tests/convert/test_sd.py``.
"""

from drc_jax.models import clip_tokenizer as ct

CORPUS = (
  'a photo of an astronaut riding a horse on the moon. the cat sat on the mat; it is the best!! '
  "don't they're we've i'm you'll he'd café naïve résumé 2024 hello world, a painting of a cat"
)


def write_tokenizer(folder, pad, style='legacy', n_merges=60):
  """An SD-style tokenizer folder: CLIP's vocabulary layout, merges learned from CORPUS; ``style``
  'legacy' (SD repositories) or any other (transformers 4.3x's ``added_tokens_decoder``)."""
  folder.mkdir(parents=True, exist_ok=True)
  style = 'legacy' if style == 'legacy' else 'decoder'
  for name, data in ct.vocabulary_files(CORPUS, n_merges, pad=pad, style=style).items():
    (folder / name).write_bytes(data)
  return folder
