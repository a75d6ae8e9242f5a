"""Screenshots a report in a real browser (headless Chromium) at desktop and phone widths, and
checks that the verdict is above the fold in both.

  python launch/report_screenshot.py runs/fashion_mnist/report.html --out=/tmp/shots

Needs a Chromium (Debian: ``apt-get install chromium-headless-shell``; ``launch/local.sh test``
installs it). Writes ``desktop.png`` (1280x800) and ``phone.png`` (390x844) and prints, per width,
the first and last screen row the verdict box covers; exits 1 when the box is not inside the first
screen at either width.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

BROWSERS = ('chromium-headless-shell', 'chromium', 'chromium-browser', 'google-chrome')
WIDTHS = {'desktop': (1280, 800), 'phone': (390, 844)}
# The verdict box's colours (drc_jax/audit/report.py _CSS): its background, normal and smoke run.
VERDICT_BACKGROUNDS = ((0xE8, 0xF0, 0xFE), (0xFF, 0xF4, 0xD6))


def find_browser() -> str | None:
  for name in BROWSERS:
    path = shutil.which(name)
    if path:
      return path
  return None


def screenshot(browser: str, html_path: str, png_path: str, width: int, height: int) -> None:
  """One screenshot of the first screen of ``html_path`` at ``width`` x ``height`` CSS pixels."""
  with tempfile.TemporaryDirectory() as profile:
    cmd = [
      browser,
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--hide-scrollbars',
      f'--user-data-dir={profile}',
      f'--window-size={width},{height}',
      f'--screenshot={png_path}',
      'file://' + os.path.abspath(html_path),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
  if done.returncode or not os.path.exists(png_path):
    raise RuntimeError(f'{browser} failed ({done.returncode}): {done.stderr[-2000:]}')


def verdict_rows(png_path: str) -> tuple[int, int] | None:
  """(first, last) screen row where the verdict box's background fills a tenth of the width."""
  img = np.asarray(Image.open(png_path).convert('RGB')).astype(np.int16)
  hits = np.zeros(img.shape[:2], bool)
  for colour in VERDICT_BACKGROUNDS:
    hits |= np.all(np.abs(img - np.asarray(colour, np.int16)) <= 2, axis=-1)
  rows = np.flatnonzero(hits.mean(axis=1) > 0.1)
  return (int(rows[0]), int(rows[-1])) if rows.size else None


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('report', help='report.html of an audit')
  parser.add_argument('--out', default='.', help='directory for desktop.png and phone.png')
  args = parser.parse_args(argv)
  browser = find_browser()
  if browser is None:
    print(f'no Chromium found (tried {", ".join(BROWSERS)})', file=sys.stderr)
    return 2
  os.makedirs(args.out, exist_ok=True)
  ok = True
  for name, (width, height) in WIDTHS.items():
    png = os.path.join(args.out, f'{name}.png')
    screenshot(browser, args.report, png, width, height)
    rows = verdict_rows(png)
    above = rows is not None and rows[0] < height // 2
    ok &= above
    where = 'not on the first screen' if rows is None else f'rows {rows[0]}-{rows[1]}'
    print(f'{name} {width}x{height}: verdict {where} of {height} ({png})')
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(main())
