"""The audit's text: the verdict (a plain-language summary, most important first), the terminal
metrics table grouped by access, and the number formats the report shares with them."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from drc_jax.audit import combiners


def tpr_columns(metrics: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str]]:
  """(metric key, label) of every TPR@FPR in ``metrics``: tpr_at_0p1pct_fpr -> 'TPR@0.1%FPR';
  the largest FPR first, whatever the order of the keys (metrics computed or read back)."""
  columns = {}
  for per_attack in metrics.values():
    for key in per_attack:
      match = re.fullmatch(r'tpr_at_(.+)pct_fpr', key)
      if match:
        columns[key] = match.group(1).replace('p', '.')
  order = sorted(columns, key=lambda k: -float(columns[k]))
  return [(key, f'TPR@{columns[key]}%FPR') for key in order]


def fmt(value: Any, spec: str, missing: str = '-') -> str:
  return missing if value is None else format(float(value), spec)


def fmt_percent(value: Any, missing: str = '-') -> str:
  return missing if value is None else f'{100 * float(value):.2f}%'


def fmt_interval(interval: Sequence[float] | None, percent: bool) -> str:
  if interval is None:
    return ''
  lo, hi = interval
  return f' [{fmt_percent(lo)}, {fmt_percent(hi)}]' if percent else f' [{lo:.3f}, {hi:.3f}]'


def fmt_nfe(value: Any) -> str:
  return '-' if value is None else f'{float(value):g}'


# The order attacks are listed in: by what they need of the target, the least first.
ACCESS_ORDER = ('none', 'black-box', 'gray-box', 'white-box')


def by_access(metrics: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, Mapping[str, Any]]]:
  """(attack, metrics) grouped by access class (``ACCESS_ORDER``), the table's order."""
  rank = {a: i for i, a in enumerate(ACCESS_ORDER)}
  return sorted(metrics.items(), key=lambda kv: rank.get(kv[1].get('access'), len(rank)))


def scope_line(metrics: Mapping[str, Mapping[str, Any]]) -> str:
  """Which images the figures are on: the held-out part and its counts ('' for metrics that
  say no scope: every image given)."""
  m = next(iter(metrics.values()), {})
  if m.get('scope') != 'heldout':
    return ''
  return (
    f'held-out images: {m["n_members"]} members, {m["n_nonmembers"]} non-members (the '
    'calibration part, which fits thresholds and chose the protocol, is left out)'
  )


def format_metrics_table(metrics: Mapping[str, Mapping[str, Any]]) -> str:
  """A plain-text table for the terminal: which images it is on, then attack, AUC, ASR, TPR@FPR
  columns (each with its 95% interval when known), NFE; then each warning once, with the attacks
  it concerns."""
  columns = tpr_columns(metrics)
  header = ['attack', 'AUC [95% CI]', 'ASR [95% CI]'] + [
    label.replace('FPR', '') + ' [95% CI]' for _, label in columns
  ]
  header.append('NFE')
  with_access = any(m.get('access') for m in metrics.values())
  if with_access:
    header.append('access')
  rows = [header]
  for attack, m in by_access(metrics):
    ci = m.get('ci95', {})
    rows.append(
      [
        attack,
        fmt(m.get('auc'), '.4f') + fmt_interval(ci.get('auc'), False),
        fmt(m.get('asr'), '.4f') + fmt_interval(ci.get('asr'), False),
      ]
      + [fmt_percent(m.get(key)) + fmt_interval(ci.get(key), True) for key, _ in columns]
      + [fmt_nfe(m.get('nfe_per_image'))]
      + ([m.get('access') or ''] if with_access else [])
    )
  widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
  lines = [
    '  '.join(
      cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))
    ).rstrip()
    for row in rows
  ]
  lines.insert(1, '  '.join('-' * w for w in widths))
  if scope_line(metrics):
    lines.insert(0, scope_line(metrics))
  protocol = (metrics.get('drc') or {}).get('protocol')
  if protocol:
    lines.append(f'drc = {protocol}')
  for warning, who in warnings_once(metrics):  # the same warning for every attack: printed once
    lines.append(f'note ({who}): {warning}')
  lines += format_generated_lines(metrics)
  return '\n'.join(lines)


def generated_rows(metrics: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
  """[attack, FPR on generated [CI], FPR on real held-out non-members [CI], n] per attack with a
  generated-image control (``audit/generated.py``), grouped by access."""
  rows = []
  for attack, m in by_access(metrics):
    g = m.get('generated')
    if g:
      rows.append(
        [
          attack,
          fmt_percent(g['fpr']) + fmt_interval(g['ci95'], True),
          fmt_percent(g['real_nonmember_fpr']) + fmt_interval(g['real_nonmember_ci95'], True),
          str(g['n']),
        ]
      )
  return rows


def format_generated_lines(metrics: Mapping[str, Mapping[str, Any]]) -> list[str]:
  """The terminal lines of the generated-image control ([] without it)."""
  rows = generated_rows(metrics)
  if not rows:
    return []
  cells = ', '.join(f'{a} {gen} (real {real})' for a, gen, real, _ in rows)
  return [
    f"generated-image control: false-positive rate on the target's {rows[0][3]} own samples "
    f'at each calibrated threshold (held-out real non-members in brackets): {cells}'
  ]


def warnings_once(metrics: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str]]:
  """(warning, the attacks it concerns) for each distinct warning, once."""
  notes: dict[str, list[str]] = {}
  for attack, m in metrics.items():
    for warning in m.get('warnings', ()):
      notes.setdefault(warning, []).append(attack)
  return [
    (w, 'all attacks' if len(a) == len(metrics) > 1 else ', '.join(a)) for w, a in notes.items()
  ]


def p_text(p: float) -> str:
  return f'{p:.3g}'


ACCESS_WORDS = {
  'black-box': "black-box access (the model's outputs only)",
  'gray-box': "gray-box access (the model's noise predictions)",
  'white-box': 'white-box access (weights and gradients)',
}
SMOKE_TEXT = (
  'Smoke run: a tiny target trained for seconds on a few images (a runlocal configuration); its '
  'figures test the machinery and say nothing about membership.'
)


def _detects(m: Mapping[str, Any]) -> bool:
  """An attack detects membership when its held-out AUC's 95% interval lies above 0.5."""
  lo = (m.get('ci95') or {}).get('auc', [m.get('auc', 0.5)] * 2)[0]
  return lo is not None and lo > 0.5


def _strength(name: str, m: Mapping[str, Any]) -> str:
  """'drc: AUC 0.886 [0.859, 0.912]; at its calibrated threshold it flags 85% of held-out
  members and 12% of held-out non-members (180 model calls per image)'."""
  text = f'{name}: AUC {m["auc"]:.3f}' + fmt_interval((m.get('ci95') or {}).get('auc'), False)
  cal = m.get('calibrated')
  if cal:
    text += (
      f'; at its calibrated threshold it flags {fmt_pct0(cal["tpr"])} of held-out members and '
      f'{fmt_pct0(cal["fpr"])} of held-out non-members'
    )
  if m.get('model_calls') is not None:
    calls = m['model_calls']
    text += f' ({fmt_nfe(calls)} model call{"" if calls == 1 else "s"} per image)'
  return text


def fmt_pct0(value: float) -> str:
  return f'{100 * float(value):.0f}%'


def verdict(
  metrics: Mapping[str, Mapping[str, Any]],
  datasets: Sequence[Mapping[str, Any]] = (),
  smoke: bool = False,
) -> list[str]:
  """The audit's plain-language summary, most important first: a smoke run, a failed control,
  which attacks detect membership and how strongly (the best for each access), the blind and
  generated-image controls, and each suspect set's verdict."""
  out = [SMOKE_TEXT] if smoke else []
  blind = metrics.get('blind')
  shift = [w for w in (blind or {}).get('warnings', ()) if 'blind baseline' in w]
  if shift:
    out.append(f'The evaluation is not valid as it stands: {shift[0]}.')
  attacks = {n: m for n, m in metrics.items() if n != 'blind'}
  if attacks:
    found = sorted((n for n, m in attacks.items() if _detects(m)), key=lambda n: -attacks[n]['auc'])
    if found:
      out.append(
        f'Membership is detected by {len(found)} of {len(attacks)} attacks (held-out AUC, '
        f'95% interval above 0.5): {", ".join(found)}.'
      )
    else:
      out.append(
        f'No attack detects membership: the held-out AUC interval of each of the '
        f'{len(attacks)} attacks includes 0.5.'
      )
    groups: dict[str, list[str]] = {}
    for name, m in attacks.items():
      groups.setdefault(m.get('access') or 'unknown', []).append(name)
    for access in ('black-box', 'gray-box', 'white-box', 'unknown'):
      names = groups.get(access)
      if names:
        best = max(names, key=lambda n: attacks[n]['auc'])
        words = ACCESS_WORDS.get(access, 'unknown access')
        out.append(f'Best with {words}: {_strength(best, attacks[best])}.')
  if blind and not shift:
    out.append(
      f'Control: the blind baseline (image statistics only, no query to the model) reaches AUC '
      f'{blind["auc"]:.3f}' + fmt_interval((blind.get('ci95') or {}).get('auc'), False) + ', so '
      'members and non-members do not differ detectably without the model.'
    )
  gen = {n: m['generated'] for n, m in attacks.items() if m.get('generated')}
  if gen:
    worst = max(gen, key=lambda n: gen[n]['fpr'] - gen[n]['real_nonmember_fpr'])
    g = gen[worst]
    out.append(
      f'Generated images: at their calibrated thresholds the attacks call '
      f'{fmt_pct0(min(v["fpr"] for v in gen.values()))}-'
      f"{fmt_pct0(max(v['fpr'] for v in gen.values()))} of the target's own "
      f"{g['n']} samples members; the largest excess over real non-members is {worst}'s "
      f'({fmt_pct0(g["fpr"])} against {fmt_pct0(g["real_nonmember_fpr"])}).'
    )
  for d in datasets:
    primary = d['tests'][d.get('primary', 'combined')]
    name = d.get('name') or d['suspect']['source']
    uses_labels = combiners.uses_member_labels(d.get('combiner') or {})
    out.append(
      f'Suspect set {name} ({d["suspect"]["n"]} images): '
      f'{"detected" if primary["reject"] else "no evidence of membership"} '
      f'(p = {p_text(primary["p_value"])}, alpha {d["alpha"]:g}; combiner '
      f'{"fitted on labelled members" if uses_labels else "using no member labels"}).'
    )
  return out
