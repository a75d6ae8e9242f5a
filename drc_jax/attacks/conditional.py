"""Membership attacks on a text-conditioned target (Stable Diffusion, ``targets/sd.py``): DRC,
ReDiffuse, Loss, SecMI, PIA, PIAN and SimA under the image's own caption, and CLiD. Pure
functions; the audit runs them through ``make_text_attacks`` and ``make_text_batch_scorer``.

Every attack has the registry's interface, ``scores(params, key_data [B, 2] uint32, images [B, H,
W, C], aux, side) -> [B]`` (higher = member), over the target's params dict
(``{'unet', 'vae', 'text_encoder'}``): ``aux = {'null_context': [1, L, D]}`` is the empty
prompt's context computed once (``drc/conditional.empty_context``), ``side['context']`` [B, L, D]
each image's caption context (``target.encode_text(target.tokenize(captions))``). The attacks
run on the latents z0 = scaling_factor * encode(x) (the VAE posterior mean) with the guided
epsilon of ``drc/conditional.Denoiser`` (v converted to epsilon; guidance scale s, 1 = the
conditional prediction alone). Hyper-parameters are the unconditional attacks' (``config.attacks``:
``loss_t``, ``secmi_t``/``secmi_k``, ``pia_t``/``pia_p``, ``sima_t``; ``attacks/registry.py``
says what each computes), and so are the keys: image b's noise comes from
``wrap_key_data(key_data[b])`` (CLiD's draw i from ``fold_in`` of it with i), so a score never
depends on the batch. ``nfe`` counts UNet calls per image (twice as many with guidance).

CLiD (Zhai et al., "Membership inference on text-to-image diffusion models via conditional
likelihood discrepancy", NeurIPS 2024, arXiv 2405.14800). What was read: the authors' public code,
github.com/zhaisf/CLiD, ``mia_CLiD_impt.py`` (the attack), ``mia_CLiD_clip.py`` (a variant),
``cal_clid_th.py`` (CLiD_th) and ``cal_clid_xgb.py`` (CLiD_vec); of the paper only the abstract
(arxiv.org/html/2405.14800). What the code computes, per image:

* timesteps: ``construct_t_array(Tmid=450, even_num=10, max_n_samples=3)`` = (440, 450, 460);
  one Gaussian noise per timestep, the SAME noise for the caption and for every degraded caption;
* L(x, c) = mean over those timesteps and latent elements of (eps_theta(x_t, t, c) - eps)^2
  (``F.mse_loss(reduction='mean')``), the UNet called directly (no guidance);
* for each degraded caption c_j: D_j = L(x, c_j) - L(x, c). ``mia_CLiD_impt.py`` uses four: the
  caption with its top 30%, 50% and 70% most important words (per-word importances read from
  ``data/impt_metadata/*.jsonl``, not in the repository; how they were computed is not said
  there) replaced by ``<|endoftext|>``, and the empty caption; ``mia_CLiD_clip.py`` uses the
  caption's three character thirds and the empty caption instead. ``degraded_captions`` makes
  both kinds on the host;
* CLiD_vec (``cal_clid_xgb.py``): the vector [L, D_1, ..., D_M] fed to an XGBoost classifier
  trained on a shadow model's members and non-members (``clid_features`` gives the vector);
* CLiD_th (``cal_clid_th.py``): features [L, -mean_j D_j], each robust-scaled (sklearn
  ``RobustScaler``: median and IQR, fitted on the shadow model's scores), combined as
  (1 - alpha) L' + alpha (-mean D)' with alpha chosen on the shadow model from {0, 0.1, ..., 1};
  member when it is at most a threshold. ``clid_th`` gives its negation (higher = member).

Not confirmed (the paper's text was not read): whether the paper's defaults equal the code's
(t = 440/450/460, 3 draws, cut rates 0.3/0.5/0.7); the importance measure behind the clipping.
Deviations: the latents are the posterior mean (the authors' code samples the posterior); the
score here defaults to alpha = 1 with no scaling (``clid_alpha``, ``clid_center``,
``clid_scale``), i.e. mean_j D_j, the conditional likelihood discrepancy itself: the robust
scaling and alpha are fitted on a shadow model, which a per-image function can only take as given.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from drc_jax.attacks import registry
from drc_jax.drc import conditional as cond_lib

# CLiD's defaults as ``mia_CLiD_impt.py`` sets them (see the module docstring).
CLID_T_MID, CLID_INTERVAL, CLID_N = 450, 10, 3
CLID_CUT_RATES = (0.3, 0.5, 0.7)
CLID_MASK_TOKEN = '<|endoftext|>'


def _t(b, t):
  return jnp.full((b,), t, jnp.int32)


def _sum_hw(v):
  return jnp.sum(v, axis=(1, 2, 3))


def _keys_of(key_data):
  return jax.vmap(jax.random.wrap_key_data)(key_data)


def _get(section, name, default):
  return section.get(name, default) if hasattr(section, 'get') else getattr(section, name, default)


def _context(side) -> jnp.ndarray:
  if not side or 'context' not in side:
    raise ValueError(
      "side['context']: a text-conditioned attack needs each image's caption context"
    )
  return side['context']


def _null(aux):
  return (aux or {}).get('null_context')


def _attack(name, nfe, target, latent_scores, null_context) -> registry.Attack:
  """An ``Attack`` over images from ``latent_scores(params, key_data, z0, context, null)``."""

  def scores(params, key_data, images, aux=None, side=None):
    z0 = cond_lib.latents(target, params, images)
    return latent_scores(params, key_data, z0, _context(side), _null(aux))

  aux = None if null_context is None else {'null_context': null_context}
  return registry.Attack(name, nfe, scores, aux)


# ----------------------------------------------------------------------------- the baselines


def loss_scores(den: cond_lib.Denoiser, t_loss: int) -> Callable:
  """-||eps - eps(sqrt(abar_t) z0 + sqrt(1 - abar_t) eps, t, c)||^2 on latents: ``(params,
  key_data, z0 [B, h, w, c], context, null) -> [B]``."""

  def scores(params, key_data, z0, context, null=None):
    eps = jax.vmap(lambda k: jax.random.normal(k, z0.shape[1:]))(_keys_of(key_data))
    t = _t(z0.shape[0], t_loss)
    pred = den.eps(params, den.schedule.q_sample(z0, t, eps), t, context, null)
    return -_sum_hw(jnp.square(eps - pred))

  return scores


def secmi_scores(den: cond_lib.Denoiser, t_sec: int, k: int) -> Callable:
  """SecMI-stat on latents: DDIM inversion 0 -> t_sec - k (steps of k), one step to t_sec and back;
  -||z_{t_sec-k} - reconstruction||^2. Deterministic (the keys are not used)."""

  def scores(params, key_data, z0, context, null=None):
    del key_data
    b = z0.shape[0]

    def ddim(x, t_from, t_to):
      return den.schedule.ddim_step(
        x, t_from, t_to, den.eps(params, x, _t(b, t_from), context, null)
      )

    x = z0
    for t_from in range(0, t_sec - k, k):
      x = ddim(x, t_from, t_from + k)
    recon = ddim(ddim(x, t_sec - k, t_sec), t_sec, t_sec - k)
    return -_sum_hw(jnp.square(x - recon))

  return scores


def pia_scores(den: cond_lib.Denoiser, t_pia: int, p: float, normalize: bool) -> Callable:
  """PIA (PIAN with ``normalize``) on latents: eps0 = eps(z0, 0, c), z_t = q(z0, t; eps0),
  -sum |eps0 - eps(z_t, t, c)|^p."""

  def scores(params, key_data, z0, context, null=None):
    del key_data
    b = z0.shape[0]
    eps0 = den.eps(params, z0, _t(b, 0), context, null)
    if normalize:
      scale = jnp.mean(jnp.abs(eps0), axis=(1, 2, 3), keepdims=True)
      eps0 = eps0 / scale * math.sqrt(2 / math.pi)
    t = _t(b, t_pia)
    diff = eps0 - den.eps(params, den.schedule.q_sample(z0, t, eps0), t, context, null)
    return -_sum_hw(jnp.abs(diff) ** p)

  return scores


def sima_scores(den: cond_lib.Denoiser, t_sima: int) -> Callable:
  """SimA on latents: -sum |eps(z0, t, c)|^4."""

  def scores(params, key_data, z0, context, null=None):
    del key_data
    return -_sum_hw(jnp.abs(den.eps(params, z0, _t(z0.shape[0], t_sima), context, null)) ** 4)

  return scores


def loss(config, target, null_context=None, guidance_scale=1.0) -> registry.Attack:
  den = cond_lib.make_denoiser(target, guidance_scale)
  fn = loss_scores(den, int(config.attacks.loss_t))
  return _attack('loss', den.calls, target, fn, null_context)


def secmi(config, target, null_context=None, guidance_scale=1.0) -> registry.Attack:
  den = cond_lib.make_denoiser(target, guidance_scale)
  t_sec, k = int(config.attacks.secmi_t), int(config.attacks.secmi_k)
  nfe = ((t_sec // k - 1) + 2) * den.calls
  return _attack('secmi', nfe, target, secmi_scores(den, t_sec, k), null_context)


def _pia(name, normalize):
  def factory(config, target, null_context=None, guidance_scale=1.0) -> registry.Attack:
    den = cond_lib.make_denoiser(target, guidance_scale)
    a = config.attacks
    fn = pia_scores(den, int(a.pia_t), a.pia_p, normalize)
    return _attack(name, 2 * den.calls, target, fn, null_context)

  return factory


pia = _pia('pia', normalize=False)
pian = _pia('pian', normalize=True)


def sima(config, target, null_context=None, guidance_scale=1.0) -> registry.Attack:
  den = cond_lib.make_denoiser(target, guidance_scale)
  fn = sima_scores(den, int(config.attacks.sima_t))
  return _attack('sima', den.calls, target, fn, null_context)


def rediffuse_scores(den: cond_lib.Denoiser, t_re: int, k: int, n: int) -> Callable:
  """ReDiffuse on latents under the caption: n times, z0 noised to t with fresh noise (draw i from
  ``fold_in(key, i)``) and brought back to 0 by deterministic DDIM steps of k;
  -||z0 - mean of the n reconstructions||^2 (``attacks/registry.py``'s ``rediffuse``)."""
  steps = jnp.arange(t_re, 0, -k, dtype=jnp.int32)

  def scores(params, key_data, z0, context, null=None):
    b = z0.shape[0]
    keys = _keys_of(key_data)

    def ddim(z, t):
      eps = den.eps(params, z, _t(b, t), context, null)
      return den.schedule.ddim_step(z, t, t - k, eps), None

    def variation(total, i):
      eps = jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, i), z0.shape[1:]))(keys)
      recon, _ = jax.lax.scan(ddim, den.schedule.q_sample(z0, _t(b, t_re), eps), steps)
      return total + recon, None

    total, _ = jax.lax.scan(variation, jnp.zeros_like(z0), jnp.arange(n, dtype=jnp.uint32))
    return -_sum_hw(jnp.square(z0 - total / n))

  return scores


def rediffuse(config, target, null_context=None, guidance_scale=1.0) -> registry.Attack:
  den = cond_lib.make_denoiser(target, guidance_scale)
  a = config.attacks
  t_re, k, n = int(a.rediffuse_t), int(a.rediffuse_k), int(a.rediffuse_n)
  nfe = n * len(range(t_re, 0, -k)) * den.calls
  att = _attack('rediffuse', nfe, target, rediffuse_scores(den, t_re, k, n), null_context)
  return dataclasses.replace(att, access='black-box')


def drc(config, target, null_context=None, guidance_scale=1.0) -> registry.Attack:
  """DRC under the caption (``drc/conditional.make_conditional_drc``): similarities [B, K]."""
  c = cond_lib.make_conditional_drc(config.drc, target, null_context, guidance_scale)
  return registry.Attack('drc', c.nfe, c.similarities, c.aux, {}, c.evidence, access='black-box')


# ----------------------------------------------------------------------------- CLiD


def clid_timesteps(t_mid: int = CLID_T_MID, interval: int = CLID_INTERVAL, n: int = CLID_N):
  """The authors' ``construct_t_array``: n timesteps around t_mid, ``interval`` apart, sorted
  (450, 10, 3 -> [440, 450, 460]; an even n has one more below t_mid than above)."""
  if n < 1 or interval < 1:
    raise ValueError(f'config.attacks.clid_n {n} and clid_interval {interval} must be >= 1')
  below = [t_mid - (i + 1) * interval for i in range(n // 2)]
  above = [t_mid + i * interval for i in range((n + 1) // 2)]
  return sorted(below + above)


def config_clid_timesteps(config) -> list[int]:
  """CLiD's timesteps under ``config.attacks`` (``clid_t_mid``, ``clid_interval``, ``clid_n``)."""
  a = config.attacks
  return clid_timesteps(
    int(_get(a, 'clid_t_mid', CLID_T_MID)),
    int(_get(a, 'clid_interval', CLID_INTERVAL)),
    int(_get(a, 'clid_n', CLID_N)),
  )


def clid_weakens_captions(config) -> bool:
  """Whether CLiD scores each caption's three character thirds (``config.text.clid_captions``
  'thirds', the default) besides the empty caption (the audit then sends their ids)."""
  text = config.get('text')
  return text is not None and text.get('clid_captions', 'thirds') == 'thirds'


def degraded_captions(
  caption: str,
  importance: Sequence[float] | None = None,
  cut_rates: Sequence[float] = CLID_CUT_RATES,
) -> list[str]:
  """CLiD's degraded captions of one caption, on the host (the empty caption is the null context,
  not among them).

  With per-word ``importance`` (one weight per whitespace-separated word): for each cut rate r, the
  words whose weight reaches the ``int(r n - 0.01)``-th largest (0-based) are replaced by
  ``<|endoftext|>`` (``mia_CLiD_impt.py``'s ``replace_words_topRate``). Without: the caption's
  three character thirds (``mia_CLiD_clip.py``).
  """
  if importance is None:
    n = len(caption)
    return [caption[: int(n / 3)], caption[int(n / 3) : int(2 * n / 3)], caption[int(2 * n / 3) :]]
  words, weights = caption.split(), [float(w) for w in importance]
  if len(words) != len(weights):
    raise ValueError(f'importance: {len(weights)} weights for {len(words)} words of {caption!r}')
  out = []
  for rate in cut_rates:
    th = sorted(weights, reverse=True)[int(rate * len(weights) - 0.01)] if words else 0.0
    out.append(' '.join(CLID_MASK_TOKEN if w >= th else word for word, w in zip(words, weights)))
  return out


def clid_features(den: cond_lib.Denoiser, timesteps: Sequence[int]) -> Callable:
  """CLiD's per-image vector [L, D_1, ..., D_M, D_null] on latents (the CLiD_vec features).

  Returns ``features(params, key_data, z0 [B, h, w, c], context [B, L, D], degraded [B, M, L, D]
  or None, null [1, L, D]) -> [B, 2 + M]``: L the caption's mean squared error over the timesteps
  and latent elements, D_j = L(c_j) - L the degraded captions' and the empty caption's (last)
  discrepancies, every condition at the same noises (draw i from ``fold_in(key, i)``). The UNet is
  called directly (no guidance), ``len(timesteps)`` (M + 2) calls per image.
  """
  ts = [int(t) for t in timesteps]

  def features(params, key_data, z0, context, degraded, null):
    if null is None:
      raise ValueError("aux['null_context']: CLiD needs the empty prompt's context")
    b = z0.shape[0]
    keys = _keys_of(key_data)
    conds = [] if degraded is None else [degraded[:, j] for j in range(degraded.shape[1])]
    conds.append(jnp.broadcast_to(null, (b,) + null.shape[1:]))
    losses = jnp.zeros((1 + len(conds), b))
    for i, t in enumerate(ts):
      eps = jax.vmap(lambda k, i=i: jax.random.normal(jax.random.fold_in(k, i), z0.shape[1:]))(keys)
      z_t = den.schedule.q_sample(z0, _t(b, t), eps)
      per = [
        jnp.mean(jnp.square(den.eps(params, z_t, _t(b, t), c) - eps), axis=(1, 2, 3))
        for c in [context, *conds]
      ]
      losses = losses + jnp.stack(per) / len(ts)
    return jnp.concatenate([losses[:1], losses[1:] - losses[:1]], axis=0).T

  return features


def clid_th(features, alpha: float = 1.0, center=(0.0, 0.0), scale=(1.0, 1.0)) -> jnp.ndarray:
  """CLiD_th, higher = member: -[(1 - alpha) (L - c0) / s0 + alpha (-mean_j D_j - c1) / s1] of
  ``features`` [B, 2 + M] (``clid_features``); ``center``/``scale`` the robust scaler's medians and
  IQRs of (L, -mean D) fitted on a shadow model (none: 0 and 1)."""
  f = jnp.asarray(features)
  a = jnp.stack([f[:, 0], -jnp.mean(f[:, 1:], axis=1)], axis=1)
  a = (a - jnp.asarray(center, f.dtype)[None]) / jnp.asarray(scale, f.dtype)[None]
  return -((1.0 - alpha) * a[:, 0] + alpha * a[:, 1])


def clid(config, target, null_context=None, guidance_scale=1.0) -> registry.Attack:
  """CLiD_th as an ``Attack``. ``side['clid_contexts']`` [B, M, L, D] holds each image's degraded
  captions' contexts (absent: the empty caption alone); ``config.attacks`` may set ``clid_t_mid``,
  ``clid_interval``, ``clid_n``, ``clid_alpha``, ``clid_center``, ``clid_scale``. CLiD always uses
  the plain conditional prediction (``guidance_scale`` is ignored, as in the authors' code).
  ``nfe`` counts the calls the audit makes: the caption, the empty caption and, with
  ``config.text.clid_captions='thirds'``, the three degraded captions, at each timestep."""
  del guidance_scale
  a = config.attacks
  den = cond_lib.make_denoiser(target, 1.0)
  ts = config_clid_timesteps(config)
  if min(ts) < 0 or max(ts) >= den.schedule.num_timesteps:
    raise ValueError(f'config.attacks.clid_t_mid: timesteps {ts} outside [0, T)')
  feats = clid_features(den, ts)
  alpha = float(_get(a, 'clid_alpha', 1.0))
  center = tuple(_get(a, 'clid_center', (0.0, 0.0)))
  scale = tuple(_get(a, 'clid_scale', (1.0, 1.0)))

  def scores(params, key_data, images, aux=None, side=None):
    z0 = cond_lib.latents(target, params, images)
    f = feats(params, key_data, z0, _context(side), side.get('clid_contexts'), _null(aux))
    return clid_th(f, alpha, center, scale)

  aux = None if null_context is None else {'null_context': null_context}
  m = 3 if clid_weakens_captions(config) else 0
  return registry.Attack('clid', (2 + m) * len(ts), scores, aux)


CONDITIONAL_ATTACKS: dict[str, Callable[..., registry.Attack]] = {
  'drc': drc,
  'rediffuse': rediffuse,
  'loss': loss,
  'secmi': secmi,
  'pia': pia,
  'pian': pian,
  'sima': sima,
  'clid': clid,
}


def make_conditional_attacks(
  config, target, names: Sequence[str], null_context, guidance_scale: float = 1.0
) -> dict[str, registry.Attack]:
  """The named attacks (of ``CONDITIONAL_ATTACKS``) on a text-conditioned target, as pure
  functions; ``null_context`` is ``drc/conditional.empty_context(target)``, computed once."""
  _check_names(names)
  return {n: CONDITIONAL_ATTACKS[n](config, target, null_context, guidance_scale) for n in names}


def _check_names(names: Sequence[str]) -> None:
  unknown = [n for n in names if n not in CONDITIONAL_ATTACKS]
  if unknown:
    raise ValueError(f'config.attacks.names: {unknown} have no text-conditional version')


# ----------------------------------------------------------------------------- the audit's use


def make_text_attacks(config, target, names: Sequence[str]) -> dict[str, registry.Attack]:
  """The audit's attacks on a text-conditioned target: DRC restores under
  ``config.text.guidance_scale``, the other attacks predict under
  ``config.text.attack_guidance_scale``, CLiD unguided; the empty prompt's context is computed
  here, once, and travels as each attack's ``aux``."""
  null = jnp.asarray(cond_lib.empty_context(target))
  text = config.text
  _check_names(names)
  return {
    n: CONDITIONAL_ATTACKS[n](
      config,
      target,
      null,
      float(text.guidance_scale if n == 'drc' else text.attack_guidance_scale),
    )
    for n in names
  }


def with_contexts(target, params, side) -> dict:
  """``side`` with the token ids the host made turned into contexts by the target's text tower:
  ``'ids'`` [B, L] -> ``'context'`` [B, L, D]; ``'clid_ids'`` [B, M, L] -> ``'clid_contexts'``
  [B, M, L, D]."""
  side = dict(side or {})
  if 'ids' in side:
    side['context'] = target.encode_text_fn(params, side.pop('ids'))
  if 'clid_ids' in side:
    ids = side.pop('clid_ids')
    b, m, length = ids.shape
    ctx = target.encode_text_fn(params, ids.reshape(b * m, length))
    side['clid_contexts'] = ctx.reshape((b, m) + ctx.shape[1:])
  return side


def make_text_batch_scorer(attacks: dict[str, registry.Attack], target) -> Callable:
  """``registry.make_batch_scorer`` for a text-conditioned target: each batch's captions are
  encoded once (``with_contexts``) and shared by every attack."""
  base = registry.make_batch_scorer(attacks)

  def score(params, aux, key_data, images, side=None):
    return base(params, aux, key_data, images, with_contexts(target, params, side))

  return score


def text_evidence(attack: registry.Attack, target) -> Callable:
  """DRC's evidence program on a text-conditioned target, the captions encoded first."""

  def evidence(params, key_data, images, aux=None, side=None):
    return attack.evidence(params, key_data, images, aux, with_contexts(target, params, side))

  return evidence


def text_inputs(target, captions: Sequence[str], clid: bool) -> dict:
  """The host side of a batch: ``'ids'`` int32 [B, L] of the captions and, for CLiD
  (``clid``), ``'clid_ids'`` [B, 3, L] of each caption's degraded captions (its character
  thirds, ``degraded_captions``)."""
  out = {'ids': np.asarray(target.tokenize(list(captions)), np.int32)}
  if clid:
    thirds = [degraded_captions(c) for c in captions]
    flat = np.asarray(target.tokenize([t for three in thirds for t in three]), np.int32)
    out['clid_ids'] = flat.reshape(len(captions), 3, -1)
  return out
