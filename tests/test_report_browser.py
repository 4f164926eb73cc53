"""The run report in a real headless Chromium, offline, with no console error (marked `browser`).

Excluded from the default suite; `.ci/run` installs Debian's ``chromium`` and
``chromium-driver`` when they are missing and runs ``make test-tools``
(``pytest -m "browser or exiftool"``). Selected without them, the tests fail saying what is
missing: a browser check that was asked for is never skipped silently.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from diffcolor.archive.report import write_report
from diffcolor.common.items import ItemRequest
from diffcolor.pipeline import colorize_item

pytestmark = pytest.mark.browser

CATALOGUE = {"title": "Dog on a bench", "accession_number": "1921.4.7"}


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.fail("Debian's chromium and chromium-driver are needed: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update", "--no-first-run",
                     "--window-size=1280,1000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _errors(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]


def test_the_console_check_sees_an_error(browser, tmp_path):
    """The check below can fail: a page that logs an error and loads a missing image is caught."""
    page = tmp_path / "broken.html"
    page.write_text("<!doctype html><img src='missing.png'><script>console.error('boom')</script>")
    browser.get(page.as_uri())
    assert len(_errors(browser)) >= 1


def test_report_renders_offline_with_thumbnails_and_no_console_error(browser, models, smoke, tmp_path, gray_png):
    records = colorize_item(models, ItemRequest(item_id="bench", source_uri=str(gray_png), caption="a dog on a bench",
                                                catalogue=CATALOGUE),
                            str(tmp_path / "items" / "bench"), smoke)
    records.append({"item_id": "broken", "status": "failed", "error_class": "bad_image",
                    "error_message": "'broken.png' is truncated", "smoke_run": True})
    report = write_report(records, str(tmp_path / "runs" / "r1" / "report.html"), run_id="browser-check")

    browser.get("file://" + report)
    assert _errors(browser) == []
    body = browser.find_element("tag name", "body").text
    assert "SMOKE RUN" in body and "broken.png" in body and "accession number: 1921.4.7" in body
    assert "largest change of lightness" in body  # the metrics are explained
    # Both thumbnails were decoded (embedded data URIs: nothing fetched).
    sizes = browser.execute_script("return [...document.images].map(i => [i.complete, i.naturalWidth])")
    assert len(sizes) == 2 and all(complete and width > 0 for complete, width in sizes)
    # The links to the item's files resolve to files of the output.
    links = browser.execute_script("return [...document.querySelectorAll('#items a')].map(a => a.href)")
    assert links and all(link.startswith("file://") and (tmp_path / link.removeprefix(f"file://{tmp_path}/")).exists()
                         for link in links)
    # The colour thumbnail was painted: the screenshot has saturated pixels.
    screenshot = tmp_path / "report.png"
    browser.save_screenshot(str(screenshot))
    pixels = np.asarray(Image.open(screenshot).convert("RGB")).astype(int)
    assert ((pixels.max(-1) - pixels.min(-1)) > 40).sum() > 500


def test_long_urls_and_paths_wrap_inside_their_cells(browser, tmp_path):
    access = tmp_path / "items" / "dog" / "access.jpg"
    access.parent.mkdir(parents=True)
    Image.new("RGB", (300, 200), (120, 80, 40)).save(access)
    long = "https://archive.example.org/" + "collections/very-long-segment-without-breaks-" * 6 + "dog.tif"
    record = {"item_id": "dog", "status": "done", "version": 1, "caption": "a dog " + long,
              "catalogue": {"title": "Dog", "source": long, "path": "/srv/" + "x" * 300 + ".tif"},
              "outputs": {"access": str(access)}, "model_id": "/models/" + "m" * 200, "model_hash": "f" * 64}
    failure = {"item_id": "cat", "status": "failed", "error_class": "bad_image", "error_message": f"'{long}' broke"}
    report = write_report([record, failure], str(tmp_path / "runs" / "r1" / "report.html"), run_id="wrap-check")
    browser.get("file://" + report)
    # The item cell ends before the gray thumbnail's cell starts; no cell's text runs past its own edge.
    item, gray = browser.execute_script(
        "const c = document.querySelectorAll('#items tr:nth-child(2) td');"
        "return [c[0].getBoundingClientRect().right, c[1].getBoundingClientRect().left]")
    assert item <= gray + 1
    overflowing = browser.execute_script(
        "return [...document.querySelectorAll('td')].filter(c => c.scrollWidth > c.clientWidth + 1)"
        ".map(c => c.textContent.slice(0, 60))")
    assert overflowing == []
    assert browser.execute_script("return document.documentElement.scrollWidth") <= 1280
