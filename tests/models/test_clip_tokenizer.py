"""``clip_tokenizer.vocabulary_files``: a tokenizer folder learned from a corpus, offline."""

import json

import numpy as np
import pytest

from drc_jax.models import clip_tokenizer as ct

CORPUS = 'a photo of a sneaker, a photo of an ankle boot, a photo of a bag'


def test_vocabulary_files_make_a_tokenizer_of_the_corpus(tmp_path):
  files = ct.vocabulary_files(CORPUS, 1000, max_length=8)
  assert set(files) == {
    'vocab.json',
    'merges.txt',
    'tokenizer_config.json',
    'special_tokens_map.json',
  }
  vocab = json.loads(files['vocab.json'])
  merges = files['merges.txt'].decode().splitlines()[1:]
  assert len(merges) < 1000  # the corpus ran out of pairs: every word is one token
  assert len(vocab) == 512 + len(merges) + 2 and vocab[ct.EOS] == len(vocab) - 1
  assert json.loads(files['tokenizer_config.json'])['model_max_length'] == 8
  tok = ct.from_files(files, 8)
  ids = tok.tokenize(['a photo of a sneaker', 'an ankle boot!', ''])
  assert ids.shape == (3, 8) and ids.dtype == np.int32
  assert ids[0].tolist() == [
    tok.bos_id,
    *(vocab[w + ct.END_OF_WORD] for w in ('a', 'photo', 'of', 'a', 'sneaker')),
    tok.eos_id,
    tok.pad_id,
  ]
  assert ids[2, :3].tolist() == [tok.bos_id, tok.eos_id, tok.eos_id]  # pad: eos (SD 1.x)
  assert ct.vocabulary_files(CORPUS, 1000, max_length=8) == files  # deterministic
  for name, data in files.items():
    (tmp_path / name).write_bytes(data)
  transformers = pytest.importorskip('transformers')
  theirs = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
  texts = ['a photo of a sneaker', 'An ANKLE boot!!', 'a cat', '']
  want = theirs(texts, padding='max_length', max_length=8, truncation=True).input_ids
  np.testing.assert_array_equal(tok.tokenize(texts), np.array(want, np.int32))
