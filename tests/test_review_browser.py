"""The review application end to end in a real headless Chromium (marked `browser`, like test_report_browser).

A small collection is colourised with the tiny bundle and the smoke preset,
then a curator browses it, opens an item, colours a word of its caption,
watches version 2 appear (the reprocess flow, run by the server) and approves
it (signed in with the form at /login): the page shows the approval's result, and
the decision is then found in the item's records. Before that, two reruns (one
skipping every item, one where an item fails) must not hide the done versions. Set
``DIFFCOLOR_SCREENSHOT_DIR`` to keep the item page's screenshot (README).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.request

import pyarrow.parquet as pq
import pytest
from test_flows import _collection, write_manifest
from test_report_browser import _errors, browser  # noqa: F401  (the Chromium fixture)

from diffcolor.archive import storage
from diffcolor.archive.results import read_results

pytestmark = pytest.mark.browser
TOKEN = "browser-test-token-0123456789"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def review_server(prefect_server, tmp_path, monkeypatch):
    import uvicorn

    from flows.collection import RunOptions, colorize_collection
    from review.app import ReviewConfig, create_app

    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # recolour in this process, not through a deployment
    manifest, out = _collection(tmp_path, count=2), tmp_path / "out"
    assert colorize_collection(str(manifest), str(out), "tiny", RunOptions(preset="smoke", pool="inline"),
                               return_state=True).is_completed()
    # Two nightly reruns: one skips every item; in the next one p1 is asked for again (a new caption) and its
    # source has become unreadable, so it fails. Neither may hide the done versions.
    colorize_collection(str(manifest), str(out), "tiny", RunOptions(preset="smoke", pool="inline"), return_state=True)
    rows = pq.read_table(manifest).to_pylist()
    rows[1]["caption"] = "a dog sitting on a bench"
    write_manifest(manifest, rows)
    (tmp_path / "images" / "p1.png").write_bytes(b"not an image any more")
    colorize_collection(str(manifest), str(out), "tiny", RunOptions(preset="smoke", pool="inline"), return_state=True)
    runs = [run for run in storage.list_folders(str(out / "runs"))]
    statuses = [sorted(r["status"] for r in read_results(f"{run}/results.parquet").to_pylist()) for run in runs]
    assert statuses == [["done", "done"], ["skipped_done", "skipped_done"], ["failed", "skipped_done"]]
    port = _free_port()
    app = create_app(ReviewConfig(output=str(out), token=TOKEN, reprocess_options={"pool": "inline", "device": "cpu"},
                                  port=port))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", out
    server.should_exit = True
    thread.join(timeout=30)


def _text(browser, by: str, value: str) -> str:
    """The element's text now, or "" while the page is between documents (a submit or a link being followed)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    try:
        return browser.find_element(by, value).text
    except (NoSuchElementException, StaleElementReferenceException):
        return ""


def _wait_for(browser, seconds: float, condition) -> None:
    """Wait until ``condition(browser)``; elements replaced by a navigation in the meantime are looked up again."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, seconds, poll_frequency=0.5).until(condition)


def test_browse_recolour_approve_in_chromium(browser, review_server, tmp_path):  # noqa: F811
    base, out = review_server
    browser.get(f"{base}/login")  # the sign-in form: the token is pasted, never put in a URL
    browser.find_element("id", "token").send_keys(TOKEN)
    browser.find_element("id", "sign-in").click()  # signs in and lands on the collection
    _wait_for(browser, 30, lambda driver: "items match" in _text(driver, "tag name", "body"))
    assert "2 items match" in browser.find_element("tag name", "body").text
    assert _errors(browser) == []
    # After the reruns every card shows its done version with its metrics; p1's failed attempt is noted.
    cards = {card.get_attribute("data-item"): card.text for card in browser.find_elements("css selector", ".card")}
    assert set(cards) == {"p0", "p1"} and all("done" in text and "skipped_done" not in text for text in cards.values())
    assert all("max ΔL* –" not in text and "CLIP –" not in text for text in cards.values())
    assert "failed" in cards["p1"] and "failed" not in cards["p0"]
    listed = json.loads(urllib.request.urlopen(f"{base}/api/items?status=done&min_max_delta_l=0", timeout=30).read())
    assert [item["item_id"] for item in listed["items"]] == ["p0", "p1"]
    assert all(item["version"] == 1 and item["max_delta_l"] is not None for item in listed["items"])
    thumbnails = browser.execute_script("return [...document.images].map(i => [i.complete, i.naturalWidth])")
    assert len(thumbnails) == 4 and all(done and width > 0 for done, width in thumbnails)

    # Open an item: gray and colour side by side, the slider, explanations, no identifier token.
    browser.find_element("link text", "p0").click()
    _wait_for(browser, 30, lambda driver: "gray original" in _text(driver, "tag name", "body"))
    body = browser.find_element("tag name", "body").text
    assert "gray original" in body and "largest change of lightness" in body and "sks" not in browser.page_source
    browser.find_element("id", "slider")

    # Colour one word; the check runs before anything starts; version 2 appears when the flow is done.
    browser.find_element("css selector", ".colour-word[data-word=dog]").send_keys("red")
    browser.find_element("id", "recolour").click()
    _wait_for(browser, 400, lambda driver: "v2" in _text(driver, "id", "versions") or "failed" in _text(driver, "id", "job"))
    assert "failed" not in browser.find_element("id", "job").text
    versions = browser.find_element("id", "versions").text
    assert "a red dog sitting on a wooden bench" in versions
    assert _errors(browser) == []

    # An approval without a name is refused, and the page says why.
    browser.find_element("id", "approve").click()
    _wait_for(browser, 30, lambda driver: "✗" in _text(driver, "id", "decision-result"))
    assert "curator's name" in browser.find_element("id", "decision-result").text
    # Chromium logs the refused request (400) as a failed resource; that entry, and no other, is expected.
    refused = _errors(browser)
    assert refused and all(entry["source"] == "network" and "/decisions" in entry["message"]
                           and "400" in entry["message"] for entry in refused), refused
    # Approve version 2 with a note; the page shows the result, the decision and the version published.
    browser.find_element("id", "curator").send_keys("Ada Curator")
    browser.find_element("id", "note").send_keys("the dog was red")
    browser.find_element("id", "approve").click()
    _wait_for(browser, 30, lambda driver: "Ada Curator" in _text(driver, "id", "decisions"))
    assert browser.find_element("id", "decision-result").text.startswith("✓ approved v2 by Ada Curator at ")
    assert "published: v2" in browser.find_element("id", "published").text
    assert _errors(browser) == []
    if os.environ.get("DIFFCOLOR_SCREENSHOT_DIR"):
        browser.set_window_size(1280, 1400)
        browser.execute_script("window.scrollTo(0, 0)")
        browser.save_screenshot(os.path.join(os.environ["DIFFCOLOR_SCREENSHOT_DIR"], "review-item.png"))

    # The decision is in the item's records, and the pointer names version 2.
    [decision] = [storage.read_json(uri) for uri in storage.list_files(str(out / "items" / "p0" / "decisions"))]
    assert (decision["version"], decision["decision"], decision["decided_by"], decision["note"]) == (
        2, "approved", "Ada Curator", "the dog was red")
    assert storage.read_json(str(out / "items" / "p0" / "approved.json"))["version"] == 2
