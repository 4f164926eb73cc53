"""The run report renders in a real headless Chromium, offline (marked `browser`, excluded by default).

Run with: apt-get install chromium && .venv/bin/python -m pytest -m browser
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from diffcolor.archive.report import write_report
from diffcolor.common.items import ItemRequest
from diffcolor.pipeline import colorize_item

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium package is not installed")
def test_report_renders_thumbnails_in_headless_chromium(models, smoke, tmp_path, gray_png):
    records = colorize_item(models, ItemRequest(item_id="bench", source_uri=str(gray_png), caption="a dog on a bench"),
                            str(tmp_path / "items" / "bench"), smoke)
    records.append({"item_id": "broken", "status": "failed", "error_class": "bad_image",
                    "error_message": "'broken.png' is truncated", "smoke_run": True})
    report = write_report(records, str(tmp_path / "report.html"), run_id="browser-check")
    screenshot = tmp_path / "report.png"
    subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--window-size=1200,900", f"--screenshot={screenshot}", f"file://{report}"],
        check=True, capture_output=True, timeout=120,
    )
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--no-first-run", f"--user-data-dir={tmp_path / 'profile2'}", "--dump-dom", f"file://{report}"],
        check=True, capture_output=True, text=True, timeout=120,
    ).stdout
    assert "SMOKE RUN" in dom and "broken.png" in dom and dom.count("<img") == 2
    # The colour thumbnail was decoded and painted: the screenshot has saturated pixels.
    pixels = np.asarray(Image.open(screenshot).convert("RGB")).astype(int)
    saturation = pixels.max(-1) - pixels.min(-1)
    assert (saturation > 40).sum() > 500
