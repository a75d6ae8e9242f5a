"""A text-conditioned target audited end to end (``configs/sd.py:runlocal``: a seeded random tiny
Stable Diffusion on Fashion-MNIST captioned by class): every attack including CLiD in one run, the
captions flowing from the data to the restorations, resume, and the refusals."""

import hashlib
import json

import jax
import numpy as np
import pytest
from conftest import load_config

from drc_jax import api
from drc_jax.audit import modes, results, samples, store, validate
from drc_jax.audit import scoring as A
from drc_jax.data import captions
from drc_jax.data import sources as D
from drc_jax.targets.load import load_target

NAMES = ['drc', 'loss', 'secmi', 'pia', 'pian', 'sima', 'rediffuse', 'clid']


@pytest.fixture(scope='module')
def audited(tmp_path_factory):
  w = tmp_path_factory.mktemp('sd_runlocal')
  config = load_config('sd', 'runlocal')
  metrics = modes.run(config, str(w), 'audit')
  return config, w, metrics


def test_every_attack_including_clid_is_scored_held_out(audited):
  config, w, metrics = audited
  assert set(NAMES) <= set(metrics)
  table = store.load_scores(
    w, store.fingerprint_digest(json.loads((w / store.AUDIT_CONFIG).read_text()))
  )
  for name in NAMES:
    v = table[f'score/{name}']
    assert v.shape == (32,) and np.all(np.isfinite(v)), name
    assert np.std(v) > 0, name  # a real score per image, not a constant
  assert table['drc/sim'].shape == (32, config.drc.num_restorations)
  assert (w / 'report.html').exists()
  assert metrics['clid']['nfe_per_image'] == 15  # 3 timesteps x (caption, its 3 thirds, empty)


def test_samples_are_drawn_and_scored_under_the_heldout_nonmembers_captions(audited):
  config, w, _ = audited
  table = store.load_scores(
    w, store.fingerprint_digest(json.loads((w / store.AUDIT_CONFIG).read_text()))
  )
  idx = table['index'][(table['split'] == 0) & results.heldout_rows(config, table)]
  source = D.make_source(config.data)
  expected = samples.sample_prompts(captions.Captions(config)(source, idx), 8)
  assert len(set(expected)) > 1  # class captions of several classes
  digest = hashlib.sha256(json.dumps(expected).encode()).hexdigest()
  ident = json.loads(str(np.load(w / 'samples.npz')['ident']))
  assert ident['prompts_sha256'] == digest
  assert json.loads(str(np.load(w / 'generated.npz')['ident']))['captions_sha256'] == digest


def test_text_sampler_follows_each_prompt_whatever_the_batch():
  target = load_target('random:sd-tiny')
  sample = jax.jit(samples.make_text_sampler(target, (32, 32, 3), steps=3))
  prompts = samples.sample_prompts(['a photo of a bag', 'a photo of a sneaker', ''], 5)
  assert prompts[3:] == ['a photo of a bag', 'a photo of a sneaker']
  ids = np.asarray(target.tokenize(prompts), np.int32)
  one = samples.generate(sample, target.params, 5, seed=0, batch_size=2, inputs=ids)
  other = samples.generate(sample, target.params, 5, seed=0, batch_size=4, inputs=ids)
  np.testing.assert_allclose(one, other, atol=1e-5)
  swapped = samples.generate(sample, target.params, 5, seed=0, batch_size=4, inputs=ids[::-1])
  assert np.abs(swapped[0] - one[0]).max() > 1e-3  # sample 0 under another prompt
  np.testing.assert_allclose(swapped[2], one[2], atol=1e-5)  # the middle prompt is the same


def test_resume_scores_nothing_again(audited, caplog):
  config, w, _ = audited
  before = {p.name: p.stat().st_mtime_ns for p in (w / 'scores').glob('*.npz')}
  modes.run(config, str(w), 'audit')
  after = {p.name: p.stat().st_mtime_ns for p in (w / 'scores').glob('*.npz')}
  assert before == after


def test_captions_reach_the_restorations():
  """The same images under other captions: DRC's restorations (and every attack's scores)
  change, so the caption is what the target is conditioned on."""
  aud = api.Auditor('random:sd-tiny', config=load_config('sd', 'runlocal'), attacks=['drc', 'loss'])
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  a = aud.score(images, captions=['a photo of a bag'] * 4)
  b = aud.score(images, captions=['a photo of a sneaker'] * 4)
  again = aud.score(images, captions=['a photo of a bag'] * 4)
  np.testing.assert_array_equal(a.scores['drc'], again.scores['drc'])
  assert not np.allclose(a.scores['drc'], b.scores['drc'])
  assert not np.allclose(a.scores['loss'], b.scores['loss'])
  with pytest.raises(D.DataError, match='one caption per image'):
    aud.score(images)


def test_side_inputs_hold_each_images_caption():
  config = load_config('sd', 'runlocal')
  scorer = A.make_scorer(config, workdir='')
  source = D.FashionMnistSource('train')
  side, _ = scorer.side_fn(source, np.array([0, 1]))
  target = scorer.target.model
  _, labels = source.read([0, 1])
  want = [f'a photo of a {D.FASHION_MNIST_CLASSES[k].lower()}' for k in labels]
  np.testing.assert_array_equal(side['ids'], target.tokenize(want))
  assert side['clid_ids'].shape == (2, 3, side['ids'].shape[1])


def test_mismatched_conditioning_is_refused(tmp_path):
  config = load_config('sd', 'runlocal')
  config.text.captions = ''
  config.attacks.names = 'drc,loss'
  with pytest.raises(validate.ConfigError, match='is text-conditioned but config.text.captions'):
    A.make_scorer(config, workdir='')
  plain = load_config('fashion_mnist', 'runlocal')
  plain.attacks.names = 'loss,clid'
  with pytest.raises(validate.ConfigError, match="'clid' needs captions"):
    validate.check(plain)


def test_text_target_is_trained_on_its_members_then_audited(tmp_path):
  """``configs/fashion_mnist_text.py:runlocal`` in one ``--mode=all`` run: the text target is
  trained in the workdir on the captioned members, loaded as a Stable Diffusion target and
  audited under each image's caption; a second run trains and scores nothing again."""
  config = load_config('fashion_mnist_text', 'runlocal')
  config.attacks.names = 'drc,loss,clid'
  config.audit.num_samples = 0
  metrics = modes.run(config, str(tmp_path), 'all')
  doc = json.loads((tmp_path / 'model.json').read_text())
  assert doc['vae'] is None and doc['step'] == config.train.steps
  assert doc['trained_on']['num_members'] == config.split.num_members
  for name in ('drc', 'loss', 'clid'):
    assert 0.0 <= metrics[name]['auc'] <= 1.0, name
  assert "under each image's caption" in metrics['drc']['protocol']
  shards = {p.name: p.stat().st_mtime_ns for p in (tmp_path / 'scores').glob('*.npz')}
  unet = (tmp_path / 'unet.safetensors').stat().st_mtime_ns
  modes.run(config, str(tmp_path), 'all')
  assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / 'scores').glob('*.npz')} == shards
  assert (tmp_path / 'unet.safetensors').stat().st_mtime_ns == unet
