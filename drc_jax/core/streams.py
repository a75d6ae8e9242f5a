"""Every random stream of drc_jax in one table: the numbers folded into keys, chosen not to collide.

Two levels, each folding into its own parent key:

* Seed streams, folded into ``jax.random.key(config.seed)``: ``TRAIN`` (training noise; step s
  then folds in s), ``SAMPLES`` (the report's target samples), one per attack in ``ATTACKS`` and
  ``GENERATED + ATTACKS[name]`` (that attack's keys for the target's samples)
  (an image's key is ``fold_in(fold_in(key(seed), ATTACKS[name]), dataset index)``, see
  ``drc.image_keys``). The model's initial weights come from ``nnx.Rngs(config.seed)``, not
  from these keys.
* Restoration sub-streams, folded into the key of one DRC restoration
  (``fold_in(image key, k)``, k < K). ``fold_in`` takes a uint32; its top bits name the kind of
  draw and the low ``STEP_BITS`` bits the restorer step, so no two kinds can meet: restorer step i
  draws its noise from ``STEP + i``, RePaint's known-region noise from ``KNOWN + i`` and its
  re-noising (jump) noise from ``JUMP + i``; ``INIT``, ``FIXED_KNOWN`` and ``DEGRADE`` are single
  draws (starting noise, DDIM's one known-region noise, the degradation's mask). A restorer
  takes fewer than ``MAX_STEPS`` steps (``validate.check`` makes sure).

* Host streams, NumPy generators seeded with ``[seed, HOST_*]`` (draws made on the host, never
  part of a score): ``HOST_SUSPECT`` (the drawn suspect set of ``--mode=dataset``),
  ``HOST_SWEEP_HELDOUT`` and ``HOST_SWEEP_CURVE`` (the sweep's subsets). The power curve seeds
  ``[dataset.seed, kind (0 members, 1 non-members), set size]``; training's batch order
  ``[seed, epoch]``.

Changing a number here changes every score drawn from it (keys are part of a score's identity).
"""

from __future__ import annotations

TRAIN = 1
ATTACKS = {
  'drc': 2,
  'loss': 3,
  'secmi': 4,
  'pia': 5,
  'sima': 6,
  'pian': 7,
  'rediffuse': 9,
  'clid': 10,
}
SAMPLES = 8  # the target's own samples in the report (sample i: fold_in(fold_in(key, 8), i))
# The generated-image control: attack ``name`` scores sample i with the key of stream
# GENERATED + ATTACKS[name] and index i (``audit/generated.py``); above every seed stream here.
GENERATED = 1 << 16

HOST_SUSPECT = 2
HOST_SWEEP_HELDOUT = 77
HOST_SWEEP_CURVE = 78

STEP_BITS = 28
MAX_STEPS = 1 << STEP_BITS
STEP = 0 << STEP_BITS  # restorer step i: STEP + i (ancestral / DDIM noise)
KNOWN = 1 << STEP_BITS  # RePaint: known-region noise of step i, KNOWN + i
JUMP = 2 << STEP_BITS  # RePaint: re-noising (jump) noise before down step i, JUMP + i
_SINGLE = 3 << STEP_BITS  # single draws per restoration
INIT = _SINGLE + 0  # the starting noise
FIXED_KNOWN = _SINGLE + 1  # DDIM: the one noise of the known region
DEGRADE = _SINGLE + 2  # the degradation (random masks)


def restoration_streams(num_steps: int) -> dict[str, range]:
  """The sub-stream numbers a restoration of ``num_steps`` steps may use, by kind."""
  if not 0 <= num_steps < MAX_STEPS:
    raise ValueError(f'a restorer takes fewer than {MAX_STEPS} steps, not {num_steps}')
  return {
    'step': range(STEP, STEP + num_steps),
    'known': range(KNOWN, KNOWN + num_steps),
    'jump': range(JUMP, JUMP + num_steps),
    'init': range(INIT, INIT + 1),
    'fixed_known': range(FIXED_KNOWN, FIXED_KNOWN + 1),
    'degrade': range(DEGRADE, DEGRADE + 1),
  }
