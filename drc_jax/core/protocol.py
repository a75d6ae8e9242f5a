"""The published DRC protocol, defined once, with where each piece comes from.

"The paper's protocol" in drc_jax always means ``PAPER`` below: the ``:paper`` config variants
apply it (``config_base.set_paper_drc`` and ``set_paper_semantic_drc``), and the sweep and the cost
frontier label a row "the paper" only when it runs ``PAPER``'s restorer. Each field's source is
in ``SOURCES``. Fu et al. ("Model Will Tell", ECCV 2024, arXiv 2403.08487) publish the method and
its results but not their code, so two pieces (the restorer's schedule and K) come from elsewhere,
and ``SOURCES`` says so.

RePaint's own published schedule (Lugmayr et al., "RePaint", CVPR 2022: 250 respaced steps,
jump length 10, 10 resamples) is a different thing: the costliest restorer setting the frontier
measures, named ``REPAINT_PUBLISHED``, never "the paper" of DRC.
"""

from __future__ import annotations

from typing import Any

# DRC as published. 'important_region': the region removed is the image's important region (a
# DINO ViT's self-attention on natural images; the face area on face datasets).
PAPER: dict[str, Any] = {
  'important_region': {'natural': 'dino', 'faces': 'face'},
  'mask_ratio': 0.5,
  'restorer': 'ddim',
  't_start': 1000,
  'steps': 200,
  'eta': 0.0,
  'comparator': 'cosine',
  'aggregation': 'agree',
  'num_restorations': 4,
}

SOURCES: dict[str, str] = {
  'important_region': 'Fu et al. 2024, the method: degrade by removing the important region '
  '(DINO self-attention; the face area on faces), as third-party descriptions of the paper give it',
  'mask_ratio': 'Fu et al. 2024: rho = 0.5 on CIFAR (the paper sweeps about 0.1 to 0.5)',
  'restorer': 'third-party reports: deterministic DDIM inpainting with step interval 5 (200 of '
  'T = 1,000 steps); the paper does not publish its restorer code',
  'comparator': 'Fu et al. 2024: semantic embeddings (CLIP image features on natural images, a '
  'face-recognition encoder on faces)',
  'aggregation': 'Fu et al. 2024: restorations vote, and the paper reports precision and recall '
  'against the agree number',
  'num_restorations': "not published: K = 4 is drc_jax's choice",
}

# RePaint's published schedule (Lugmayr et al., CVPR 2022): respaced steps, jump length, resamples.
REPAINT_PUBLISHED: dict[str, Any] = {
  'restorer': 'repaint',
  'steps': 250,
  'jump_length': 10,
  'jump_n_sample': 10,
}


def paper_restorer() -> dict[str, Any]:
  """The ``config.drc`` fields of the paper's restorer (DDIM, interval 5, deterministic)."""
  return {k: PAPER[k] for k in ('restorer', 't_start', 'steps', 'eta')}


def paper_pixel(drc) -> None:
  """The paper's restorer, ratio and K with the encoder-free pixel steps: the centre box removed
  (the important region of centred images) and masked MSE, mean of K. Sets ``drc`` in place."""
  drc.update(paper_restorer())
  drc.mask = 'center_box'
  drc.mask_ratio = PAPER['mask_ratio']
  drc.num_restorations = PAPER['num_restorations']


def paper_semantic(drc, important_region: str) -> None:
  """On top of ``paper_pixel``: the important region removed (``important_region`` 'dino': the
  top-rho 4x4 patches of a DINO ViT's CLS attention; 'face': the detected face box), compared by
  the cosine of an encoder's embeddings and decided by the agree number. Sets ``drc`` in place."""
  if important_region == 'dino':
    drc.mask = 'saliency_patches'
    drc.saliency = 'dino'
    drc.patch_size = 4
  elif important_region == 'face':
    drc.mask = 'face'
  else:
    raise ValueError(f"config argument mask={important_region!r}: expected 'dino' or 'face'")
  drc.comparator = PAPER['comparator']
  drc.aggregation = PAPER['aggregation']
