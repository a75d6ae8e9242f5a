"""CLIP's tokenizer and text tower compute what transformers computes (Stable Diffusion's context).

Tokenizer: a tiny byte-level BPE vocabulary (CLIP's layout: the 256 byte symbols, their ``</w>``
variants, merges learned from a small corpus, the two special tokens) is written as an SD
``tokenizer/`` folder in each padding convention (SD 1.x pads with ``<|endoftext|>``, SD 2.x with
``!``), and our ids must equal ``transformers.CLIPTokenizer(...).input_ids`` exactly.

Text tower: random ``CLIPTextModel``s (quick_gelu and gelu; LayerNorms and biases moved off their
init) are saved with ``save_pretrained``, converted with ``sd_text.convert_text_encoder``, and
``last_hidden_state``, diffusers' ``clip_skip`` context, every hidden state and ``pooler_output``
must match within 1e-4 of max(1, max |value|).
"""

import json
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='the text-tower exactness tests need the torch extra')
transformers = pytest.importorskip('transformers')

from sd_fixtures import write_tokenizer as _write_tokenizer  # noqa: E402  (tests/models/)

from drc_jax.convert import sd_text  # noqa: E402
from drc_jax.convert.common import ConversionError  # noqa: E402
from drc_jax.models import clip_text  # noqa: E402
from drc_jax.models import clip_tokenizer as ct  # noqa: E402

TOL = 1e-4
TEXTS = [
  'a photo of an astronaut riding a horse on the moon',
  'The CAT sat!! on the mat.',
  "it's don't they're we've I'm you'll he'd 'S 'T '...'s a''b",
  'café naïve Résumé CAFÉ e\u0301 Å\u0301 ΣΑΣ İstanbul straße ǅ ﬁ K\u212a',
  '2024 hello   world\t\nnew  3.14159 1,000 ½ ١٢٣',
  '',
  '   ',
  'emoji 🙂 中文\u3000全角 \u00a0nbsp\u2003em\x1cfs\x85nel',
  'hello! wow!!! World?! !!!!!!',
  'a<|endoftext|>b <|startoftext|>!x <|ENDOFTEXT|> y <|STARTOFTEXT|> <|endoftext|>! <|endoftext|',
  ' '.join(['a painting of a cat'] * 30),  # > 77 tokens: truncated, eos kept at 76
]


# --------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize(
  'pad,style',
  [('<|endoftext|>', 'legacy'), ('!', 'legacy'), ('<|endoftext|>', 'decoder'), ('!', 'decoder')],
)
def test_tokenizer_matches_transformers(tmp_path, pad, style):
  folder = _write_tokenizer(tmp_path / 'tokenizer', pad, style)
  theirs = transformers.CLIPTokenizer.from_pretrained(str(folder))
  want = np.array(
    theirs(TEXTS, padding='max_length', max_length=77, truncation=True).input_ids, np.int32
  )
  ours = ct.load(folder)
  got = ours.tokenize(TEXTS)
  assert got.dtype == np.int32 and got.shape == (len(TEXTS), 77)
  for text, w, g in zip(TEXTS, want, got):
    assert np.array_equal(w, g), (text, theirs.convert_ids_to_tokens(w), g.tolist())
  assert ours.pad_id == theirs.pad_token_id == (0 if pad == '!' else ours.eos_id)
  assert got[-1, 76] == ours.eos_id  # truncated: eos kept last
  assert got[5, :2].tolist() == [ours.bos_id, ours.eos_id]  # the empty string
  assert (got[5, 2:] == ours.pad_id).all()


def test_tokenizer_files_refused_by_name(tmp_path):
  folder = _write_tokenizer(tmp_path / 'tok', '!')
  merges = (folder / 'merges.txt').read_text()
  (folder / 'merges.txt').write_text(merges + 'just-one-part\n')
  with pytest.raises(ct.TokenizerError, match=r'merges\.txt: line \d+'):
    ct.load(folder)
  (folder / 'merges.txt').write_text(merges + 'q zz\n')
  with pytest.raises(ct.TokenizerError, match=r"merges\.txt: line \d+ .*'zz' is not in vocab"):
    ct.load(folder)
  (folder / 'merges.txt').unlink()
  with pytest.raises(ct.TokenizerError, match=r'merges\.txt: not found'):
    ct.load(folder)
  (folder / 'vocab.json').write_text('{"a": ')
  with pytest.raises(ct.TokenizerError, match=r'vocab\.json: not a readable JSON'):
    ct.load(folder)
  (folder / 'vocab.json').unlink()
  with pytest.raises(ct.TokenizerError, match=r'vocab\.json: not found'):
    ct.load(folder)


# --------------------------------------------------------------------------- text tower


def _hf_model(act, seed, **kw):
  torch.manual_seed(seed)
  cfg = transformers.CLIPTextConfig(
    vocab_size=580,  # the test vocabulary's 574 tokens fit
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act=act,
    **kw,
  )
  model = transformers.CLIPTextModel(cfg)
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 or 'embedding' in name:  # LayerNorms and biases off their 1/0 init
        p.add_(0.2 * torch.randn(p.shape, generator=gen))
  return model.eval()


def _rel_err(ours, theirs):
  theirs = theirs.detach().numpy()
  return float(np.max(np.abs(np.asarray(ours) - theirs)) / max(1.0, np.max(np.abs(theirs))))


@pytest.mark.parametrize(
  'act,pad,eos', [('quick_gelu', '<|endoftext|>', 2), ('gelu', '!', None)]
)  # fmt: skip
def test_text_tower_matches_transformers(tmp_path, act, pad, eos):
  tok_folder = _write_tokenizer(tmp_path / 'tokenizer', pad)
  tok = ct.load(tok_folder)
  ids = tok.tokenize(TEXTS)  # [B, 77]
  # eos 2: the legacy configs of SD's text encoders (pooled at argmax(ids)); else the real eos
  kw = {'eos_token_id': eos or tok.eos_id, 'bos_token_id': tok.bos_id}
  model = _hf_model(act, seed=3 if act == 'gelu' else 7, **kw)
  model.save_pretrained(str(tmp_path / 'text_encoder'))
  cfg, params = sd_text.convert_text_encoder(tmp_path)  # the pipeline folder
  assert cfg.hidden_act == act and cfg.num_hidden_layers == 3

  with torch.no_grad():
    out = model(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
    skip1 = model.final_layer_norm(out.hidden_states[-2])  # encode_prompt, clip_skip=1
  encoder, _ = clip_text.abstract_text_encoder(cfg)
  last = jax.jit(encoder.encode_text)(params, ids)
  assert last.shape == (len(TEXTS), 77, 32)
  assert _rel_err(last, out.last_hidden_state) < TOL
  assert _rel_err(clip_text.encode_text(cfg, params, ids, clip_skip=1), skip1) < TOL
  ours_hidden = encoder.hidden_states(params, ids)
  assert len(ours_hidden) == len(out.hidden_states) == 4
  for a, b in zip(ours_hidden, out.hidden_states):
    assert _rel_err(a, b) < TOL
  assert _rel_err(encoder.pooled(params, ids), out.pooler_output) < TOL
  with pytest.raises(ValueError, match='clip_skip=3'):
    encoder.encode_text(params, ids, clip_skip=3)


SD1_CONFIG = {  # runwayml/stable-diffusion-v1-5 text_encoder/config.json
  '_name_or_path': 'openai/clip-vit-large-patch14',
  'architectures': ['CLIPTextModel'],
  'attention_dropout': 0.0,
  'bos_token_id': 0,
  'dropout': 0.0,
  'eos_token_id': 2,
  'hidden_act': 'quick_gelu',
  'hidden_size': 768,
  'initializer_factor': 1.0,
  'initializer_range': 0.02,
  'intermediate_size': 3072,
  'layer_norm_eps': 1e-05,
  'max_position_embeddings': 77,
  'model_type': 'clip_text_model',
  'num_attention_heads': 12,
  'num_hidden_layers': 12,
  'pad_token_id': 1,
  'projection_dim': 768,
  'torch_dtype': 'float32',
  'transformers_version': '4.22.0.dev0',
  'vocab_size': 49408,
}
SD2_CHANGES = {  # stabilityai/stable-diffusion-2-1 text_encoder/config.json differs in these
  'hidden_act': 'gelu',
  'hidden_size': 1024,
  'intermediate_size': 4096,
  'num_attention_heads': 16,
  'num_hidden_layers': 23,
  'projection_dim': 512,
}


def test_sd_configs():
  assert sd_text.text_config(SD1_CONFIG) == clip_text.CONFIGS['sd1']
  assert sd_text.text_config(dict(SD1_CONFIG, **SD2_CHANGES)) == clip_text.CONFIGS['sd2']


def test_conversion_is_strict(tmp_path):
  model = _hf_model('quick_gelu', seed=0)
  model.save_pretrained(str(tmp_path))
  doc = json.loads((tmp_path / 'config.json').read_text())
  cfg = sd_text.text_config(doc)
  # transformers 4.x's layout (SD's files): text_model. prefix, the position_ids buffer (dropped)
  state = {f'text_model.{k}': v.numpy() for k, v in model.state_dict().items()}
  state['text_model.embeddings.position_ids'] = np.arange(77)[None]
  ref = sd_text.convert_state(cfg, state, 'model.safetensors')
  key = 'text_model.encoder.layers.1.self_attn.k_proj.weight'
  np.testing.assert_array_equal(ref['layers'][1]['self_attn']['k_proj']['kernel'], state[key].T)

  def refused(change, match):
    bad = dict(state)
    change(bad)
    with pytest.raises(ConversionError, match=match):
      sd_text.convert_state(cfg, bad, 'model.safetensors')

  refused(lambda s: s.pop(key), f'missing keys {key}')
  refused(lambda s: s.update({'text_model.extra.weight': np.ones(3, np.float32)}), 'extra.weight')
  refused(lambda s: s.update({key: np.ones((32, 31), np.float32)}), f'{key}: checkpoint')
  refused(lambda s: s.update({'text_projection.weight': np.ones((8, 32))}), 'WithProjection')

  for field, value, match in [
    ('hidden_act', 'relu', 'hidden_act'),
    ('use_flash', True, 'use_flash'),
    ('model_type', 'bert', 'model_type'),
    ('num_attention_heads', 5, 'not divisible'),
    ('layer_norm_eps', 'x', 'layer_norm_eps'),
  ]:
    with pytest.raises(ConversionError, match=f'cfg.json.*{match}'):
      sd_text.text_config(dict(doc, **{field: value}), 'cfg.json')


def test_sharded_checkpoint(tmp_path):
  model = _hf_model('gelu', seed=1)
  model.save_pretrained(str(tmp_path / 'one'))
  model.save_pretrained(str(tmp_path / 'sharded'), max_shard_size='20KB')
  assert (tmp_path / 'sharded' / sd_text.INDEX_NAME).exists()
  cfg, params = sd_text.convert_text_encoder(tmp_path / 'sharded')
  _, ref = sd_text.convert_text_encoder(tmp_path / 'one')
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, ref)
  shard = sorted((tmp_path / 'sharded').glob('model-*.safetensors'))[-1]
  shutil.move(shard, tmp_path / 'gone.safetensors')
  with pytest.raises(ConversionError, match=shard.name):
    sd_text.convert_text_encoder(tmp_path / 'sharded')
