"""The review application's API: safety (traversal, token, CSRF, read-only), items without a colour state, decisions.

Fast: the output is written by hand (records and access copies, no model);
the browser test (tests/test_review_browser.py) runs the real flow end to end.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from conftest import gray_scene
from fastapi.testclient import TestClient
from PIL import Image

from diffcolor.archive import storage
from diffcolor.archive.items import ItemLayout
from diffcolor.archive.metadata import read_xmp
from diffcolor.archive.results import read_results, write_results
from review.app import ReviewConfig, create_app
from review.jobs import Job

TOKEN = "t" * 32
CAPTION = "a dog sitting on a wooden bench"


def _write_item(out, item_id: str, *, state: bool) -> dict:
    layout = ItemLayout(f"{out}/items/{item_id}")
    gray = np.round(gray_scene(48, 64) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.stack([gray, gray // 2, 255 - gray], -1)).save(buffer, format="JPEG")
    storage.write_bytes(layout.output(1, "access.jpg"), buffer.getvalue())
    record = {"item_id": item_id, "version": 1, "status": "done", "caption": CAPTION, "seed": 1, "preset": "smoke",
              "target_prompt": None, "model_prompt": "a sks dog sitting on a sks wooden sks bench",
              "rewritten_caption": "a sks dog sitting on a sks wooden sks bench", "smoke_run": True,
              "outputs": {"access": layout.output(1, "access.jpg"), "master": layout.output(1, "master.tif")},
              "output_sha256": {"master": "0" * 64}, "clip_score": 20.0, "max_delta_l": 0.4,
              "catalogue": {"title": f"Dog {item_id}", "collection": "Dogs"}, "created_at": "2026-01-01T00:00:00+00:00"}
    storage.write_json(layout.record(1), record)
    storage.write_json(layout.result, record)
    if state:
        storage.write_bytes(layout.state_object, b"not read by the app")
    return record


@pytest.fixture
def output(tmp_path):
    out = str(tmp_path / "out")
    records = [_write_item(out, "fitted", state=True), _write_item(out, "nostate", state=False)]
    write_results(records, f"{out}/runs/20260101T000000Z-aaaaaa/results.parquet")
    return out


class FakeJobs:
    def __init__(self):
        self.started = []

    def start(self, targets):
        self.started.append(targets)
        return Job(job_id="j1", item_ids=[t["item_id"] for t in targets], mode="local")

    def get(self, job_id):
        return None


def _client(output, **config) -> tuple[TestClient, ReviewConfig, FakeJobs]:
    review = ReviewConfig(output=output, token=TOKEN, **{"allowed_hosts": ("testserver",), **config})
    jobs = FakeJobs()
    return TestClient(create_app(review, jobs)), review, jobs


def _changing(review: ReviewConfig) -> dict:
    return {"Authorization": f"Bearer {TOKEN}", "X-CSRF-Token": review.csrf}


def test_item_ids_and_paths_cannot_leave_the_output(output):
    client, review, _ = _client(output)
    for path in ("/api/items/..", "/api/items/%2E%2E", "/api/items/a%5Cb", "/items/..%2F..%2Fetc",
                 "/api/items/..%2F..%2Fetc/versions/1/image", "/api/items/CON"):
        response = client.get(path)
        assert response.status_code in (400, 404), (path, response.status_code)
    assert client.get("/api/items/%2E%2E").status_code == 400
    assert "unsafe item_id" in client.get("/api/items/CON").json()["detail"]
    refused = client.post("/api/items/..%2Fx/decisions", headers=_changing(review),
                          json={"version": 1, "decision": "approved", "decided_by": "me"})
    assert refused.status_code in (400, 404)
    # A version number that has no record serves nothing.
    assert client.get("/api/items/fitted/versions/2/image").status_code == 404


def test_changes_need_the_token_and_the_csrf_header(output):
    client, review, jobs = _client(output)
    body = {"version": 1, "decision": "approved", "decided_by": "Ada"}
    assert client.post("/api/items/fitted/decisions", json=body).status_code == 401
    assert client.post("/api/items/fitted/decisions", json=body,
                       headers={"Authorization": "Bearer wrong", "X-CSRF-Token": review.csrf}).status_code == 401
    assert client.post("/api/items/fitted/decisions", json=body,
                       headers={**_changing(review), "Origin": "http://evil.example"}).status_code == 403
    assert client.post("/api/recolour", json={"targets": [{"item_id": "fitted", "color_map": {"dog": "red"}}]}
                       ).status_code == 401
    assert jobs.started == [] and not storage.list_files(f"{output}/items/fitted/decisions")
    # The cookie from the sign-in form counts as the token; the pages then carry the CSRF value, which
    # changes by cookie need.
    assert client.post("/login", data={"token": "wrong"}, follow_redirects=False).status_code == 401
    assert client.post("/login", data={"token": TOKEN}, follow_redirects=False).status_code == 303
    assert review.csrf in client.get("/items/fitted").text
    refused = client.post("/api/recolour", json={"targets": [{"item_id": "fitted", "color_map": {"dog": "red"}}]})
    assert refused.status_code == 403 and "X-CSRF-Token" in refused.text
    assert client.post("/api/recolor", headers={"X-CSRF-Token": review.csrf},
                       json={"targets": [{"item_id": "fitted", "color_map": {"dog": "red"}}]}).status_code == 202
    assert jobs.started == [[{"item_id": "fitted", "color_map": {"dog": "red"}, "target_prompt": None}]]


def test_the_former_spellings_of_the_api_are_accepted_as_aliases(output):
    client, review, jobs = _client(output)
    headers = _changing(review)
    assert client.post("/api/recolour", headers=headers,
                       json={"targets": [{"item_id": "fitted", "colour_map": {"dog": "red"}}]}).status_code == 202
    assert jobs.started == [[{"item_id": "fitted", "color_map": {"dog": "red"}, "target_prompt": None}]]
    item = client.get("/api/items/fitted").json()
    assert item["color_words"] == item["colour_words"] == ["dog", "wooden", "bench"]
    for kind in ("color", "colour"):
        assert client.get(f"/api/items/fitted/versions/1/image?kind={kind}").content == \
            client.get("/api/items/fitted/versions/1/image").content
    paths = client.get("/openapi.json").json()["paths"]
    assert "/api/recolor" in paths and "/api/recolour" not in paths  # one spelling documented
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    assert not [name for name in schemas if "Colour" in name]


def test_off_loopback_even_reads_need_the_token(output):
    client, _, _ = _client(output, host="0.0.0.0")
    assert client.get("/api/items").status_code == 401 and client.get("/").status_code == 401
    assert client.get("/api/items", headers={"Authorization": f"Bearer {TOKEN}"}).json()["total"] == 2


def test_read_only_refuses_every_change(output):
    client, review, jobs = _client(output, read_only=True)
    headers = _changing(review)
    assert client.post("/api/items/fitted/decisions", headers=headers,
                       json={"version": 1, "decision": "approved", "decided_by": "Ada"}).status_code == 403
    assert client.post("/api/recolour", headers=headers,
                       json={"targets": [{"item_id": "fitted", "color_map": {"dog": "red"}}]}).status_code == 403
    assert jobs.started == [] and not storage.exists(f"{output}/items/fitted/approved.json")
    page = client.get("/items/fitted", headers={"Authorization": f"Bearer {TOKEN}"}).text
    assert "Read-only" in page and 'id=recolour' not in page


def test_an_item_without_colour_state_offers_a_full_fit_and_pages_hide_identifier_tokens(output):
    client, review, _ = _client(output)
    item = client.get("/api/items/nostate").json()
    assert item["has_color_state"] is False and item["recolor_mode"] == "full_fit"
    assert client.get("/api/items/fitted").json()["recolor_mode"] == "render"
    assert item["color_words"] == ["dog", "wooden", "bench"]  # the slots of the record's own c'
    page = client.get("/items/nostate").text
    assert "no colour state" in page and "full fit" in page
    assert "sks" not in page and "sks" not in json.dumps(item)
    # The colour words are checked before anything starts.
    bad = client.post("/api/items/nostate/check", json={"item_id": "nostate", "color_map": {"cat": "red"}}).json()
    assert bad["ok"] is False and "'cat' is not a content word" in bad["problem"]
    good = client.post("/api/items/nostate/check", json={"item_id": "nostate", "color_map": {"bench": "green"}}).json()
    assert good == {"ok": True, "described": "a dog sitting on a green wooden bench", "color_map": {"bench": "green"}}


def test_a_decision_is_appended_published_and_listed(output):
    client, review, _ = _client(output)
    response = client.post("/api/items/fitted/decisions", headers=_changing(review),
                           json={"version": 1, "decision": "approved", "decided_by": "Ada", "note": "uniform green"})
    assert response.status_code == 201, response.text
    entry = response.json()
    [decision_uri] = storage.list_files(f"{output}/items/fitted/decisions")
    assert storage.read_json(decision_uri) == entry and entry["decided_by"] == "Ada" and entry["version"] == 1
    pointer = storage.read_json(f"{output}/items/fitted/approved.json")
    assert pointer["version"] == 1 and pointer["master_sha256"] == "0" * 64
    published = storage.read_bytes(pointer["published_access"])
    xmp = read_xmp(published)
    assert xmp["decision"] == "approved" and xmp["decided_by"] == "Ada" and xmp["decision_note"] == "uniform green"
    access = storage.read_bytes(f"{output}/items/fitted/versions/v0001/access.jpg")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(published))), np.asarray(Image.open(io.BytesIO(access))))
    # The version record is untouched; a review run lists the decision; the collection filters by it.
    assert "decision" not in storage.read_json(f"{output}/items/fitted/versions/v0001.json")
    [review_run] = [run for run in storage.list_folders(f"{output}/runs") if run.endswith("-review")]
    [row] = read_results(f"{review_run}/results.parquet").to_pylist()
    assert (row["item_id"], row["decision"], row["decision_note"]) == ("fitted", "approved", "uniform green")
    assert "approved</b> by Ada" in storage.read_bytes(f"{review_run}/report.html").decode()
    listed = client.get("/api/items?decision=approved").json()
    assert [item["item_id"] for item in listed["items"]] == ["fitted"]
    assert client.get("/api/items?decision=none").json()["total"] == 1
    # A rejection of the published version withdraws it; both decisions stay.
    client.post("/api/items/fitted/decisions", headers=_changing(review),
                json={"version": 1, "decision": "rejected", "decided_by": "Bo"})
    assert len(storage.list_files(f"{output}/items/fitted/decisions")) == 2
    assert client.get("/api/items/fitted").json()["approved"] is None
    assert client.post("/api/items/fitted/decisions", headers=_changing(review),
                       json={"version": 7, "decision": "approved", "decided_by": "Bo"}).status_code == 400


def test_collection_filters_and_pages(output):
    client, _, _ = _client(output)
    assert client.get("/api/items?collection=Dogs&smoke=true&min_clip_score=10").json()["total"] == 2
    assert client.get("/api/items?max_clip_score=10").json()["total"] == 0
    assert client.get("/api/items?q=dog%20nostate").json()["total"] == 1
    assert [i["item_id"] for i in client.get("/api/items?limit=1&offset=1").json()["items"]] == ["nostate"]
    page = client.get("/").text
    assert "2 items match" in page and "/api/items/fitted/versions/1/image?kind=gray&size=thumb" in page
    assert client.get("/api/items/fitted/versions/1/image?kind=gray&size=thumb").headers["content-type"] == "image/jpeg"
    assert client.get("/openapi.json").json()["paths"]["/api/recolor"]


def test_colours_the_items_model_cannot_take_in_one_token_are_refused_before_anything_starts(output, cache_dir):
    layout = ItemLayout(f"{output}/items/fitted")
    record = dict(storage.read_json(layout.result), model_id="tiny")  # the tiny bundle's tokenizer, from the cache
    storage.write_json(layout.result, record)
    write_results([record], f"{output}/runs/20260102T000000Z-bbbbbb/results.parquet")
    client, _, _ = _client(output)
    check = client.post("/api/items/fitted/check", json={"item_id": "fitted", "color_map": {"dog": "mauve"}}).json()
    assert check["ok"] is False and "'mauve' for 'dog' is" in check["problem"] and "tokens" in check["problem"]
    assert client.post("/api/items/fitted/check", json={"item_id": "fitted", "color_map": {"dog": "red"}}).json()["ok"]
    free = client.post("/api/items/fitted/check",
                       json={"item_id": "fitted", "target_prompt": "a mauve dog sitting on a wooden bench"}).json()
    assert free["ok"] is True and "rendered as written, not aligned" in free["warning"]


def test_the_api_is_listed_on_an_offline_page(output):
    client, _, _ = _client(output)
    page = client.get("/api-docs", headers={"Authorization": f"Bearer {TOKEN}"}).text
    assert "<code>/api/items/{item_id}/decisions</code>" in page and "<code>/api/recolor</code>" in page
    assert "https://" not in page and "http://" not in page  # nothing loaded from elsewhere
    assert client.get("/openapi.json").json()["info"]["title"] == "DiffColor Archive review"


def _skip_row(record: dict) -> dict:
    """A rerun's row for a done item, as the collection flow writes it: no metrics, the done version's number."""
    return {"item_id": record["item_id"], "status": "skipped_done", "version": record["version"],
            "caption": record["caption"], "catalogue": record["catalogue"], "smoke_run": True,
            "created_at": "2026-01-02T00:00:00+00:00"}


def test_reruns_that_skip_or_fail_never_hide_an_items_done_version(tmp_path):
    out = str(tmp_path / "out")
    records = [_write_item(out, "fitted", state=True), _write_item(out, "nostate", state=False)]
    records[1].update(max_delta_l=1.5, colorfulness=30.0)
    write_results(records, f"{out}/runs/20260101T000000Z-aaaaaa/results.parquet")
    # A nightly rerun skips both; the next one fails on one item (a failed attempt, no version).
    write_results([_skip_row(record) for record in records], f"{out}/runs/20260102T000000Z-bbbbbb/results.parquet")
    failure = {"item_id": "nostate", "status": "failed", "error_class": "unreadable_input", "version": None,
               "error_message": "the source could not be read", "catalogue": {"title": "Dog nostate, renamed",
                                                                              "collection": "Dogs"},
               "created_at": "2026-01-03T00:00:00+00:00"}
    write_results([_skip_row(records[0]), failure], f"{out}/runs/20260103T000000Z-cccccc/results.parquet")
    client, _, _ = _client(out)
    done = client.get("/api/items?status=done").json()
    assert done["total"] == 2
    fitted, nostate = done["items"]
    assert (fitted["status"], fitted["version"], fitted["clip_score"], fitted["max_delta_l"]) == ("done", 1, 20.0, 0.4)
    assert (nostate["version"], nostate["max_delta_l"], nostate["colorfulness"]) == (1, 1.5, 30.0)
    # The failed attempt is noted beside the done version; the catalogue is the latest one.
    assert (nostate["latest_status"], nostate["latest_error"]) == ("failed", "the source could not be read")
    assert "Dog nostate, renamed" in nostate["catalogue_text"]
    assert fitted["latest_status"] == "skipped_done" and fitted["latest_error"] is None
    assert client.get("/api/items?status=failed").json()["total"] == 0
    assert client.get("/api/items?status=skipped_done").json()["total"] == 0
    # Metric filters see the done versions' metrics.
    assert [i["item_id"] for i in client.get("/api/items?min_max_delta_l=1").json()["items"]] == ["nostate"]
    assert [i["item_id"] for i in client.get("/api/items?max_max_delta_l=1&min_clip_score=19").json()["items"]] == [
        "fitted"]
    page = client.get("/").text
    assert "skipped_done</span>" not in page and page.count("<span class=badge>done</span>") == 2
    assert "max ΔL* 1.50" in page and "max ΔL* 0.40" in page and "CLIP 20.0" in page
    assert "latest run (2026-01-03T00:00:00+00:00): failed: the source could not be read" in page
    # The item page shows the done version too, with the later failed attempt (its record in attempts/) noted.
    storage.write_json(f"{out}/items/nostate/attempts/20260103T000000Z-0a1b2c3d.json", failure)
    item = client.get("/api/items/nostate").json()
    assert item["status"] == "done" and [v["version"] for v in item["versions"]] == [1]
    assert item["later_failure"] == {"created_at": "2026-01-03T00:00:00+00:00",
                                     "error_message": "the source could not be read"}
    assert "A later run failed on this item" in client.get("/items/nostate").text
    storage.write_json(f"{out}/items/fitted/attempts/20251231T000000Z-0a1b2c3d.json",  # before its version: not noted
                       dict(failure, item_id="fitted", created_at="2025-12-31T00:00:00+00:00"))
    assert client.get("/api/items/fitted").json()["later_failure"] is None
    # A reprocess that adds version 2, then a rerun that skips it: version 2 with its own metrics.
    second = dict(records[0], version=2, max_delta_l=0.9, created_at="2026-01-04T00:00:00+00:00")
    write_results([second], f"{out}/runs/20260104T000000Z-dddddd/results.parquet")
    write_results([_skip_row(second)], f"{out}/runs/20260105T000000Z-eeeeee/results.parquet")
    client, _, _ = _client(out)
    fitted = client.get("/api/items?q=fitted").json()["items"][0]
    assert (fitted["status"], fitted["version"], fitted["max_delta_l"]) == ("done", 2, 0.9)


def test_the_metric_filters_are_declared_query_parameters_of_the_items_api(output):
    from diffcolor.archive.browse import METRICS

    client, _, _ = _client(output)
    parameters = {p["name"]: p for p in client.get("/openapi.json").json()["paths"]["/api/items"]["get"]["parameters"]}
    for metric in METRICS:
        for side in ("min", "max"):
            declared = parameters[f"{side}_{metric}"]
            assert declared["in"] == "query" and declared["schema"]["type"] == "number" and metric in declared["description"]
    assert "min_clip_score" in client.get("/api-docs").text
    # Bounds are numbers; an empty one (a form's blank field) is no bound; anything else is refused, naming it.
    assert client.get("/api/items?min_clip_score=&max_clip_score=").json()["total"] == 2
    assert client.get("/api/items?min_clip_score=19.5&max_clip_score=2e1").json()["total"] == 2
    for bad in ("abc", "nan", "inf", "-Infinity", "1e999"):
        refused = client.get(f"/api/items?max_max_delta_l={bad}")
        assert refused.status_code == 400 and "max_max_delta_l must be a finite number" in refused.json()["detail"]
    assert client.get("/?min_colorfulness=nan").status_code == 400


def test_the_item_page_shows_provenance_as_a_readable_table(output):
    record = json.loads(storage.read_bytes(f"{output}/items/fitted/result.json"))
    record.update(model_hash="sha256:" + "c" * 64, software_version="0.1.0",
                  seconds={"stage1": 12.345678901234567, "finetune": 1234.5678901, "embedding": 0.000123456789},
                  output_sha256={"master": "0" * 64, "access": "1" * 64})
    for uri in (ItemLayout(f"{output}/items/fitted").record(1), f"{output}/items/fitted/result.json"):
        storage.write_json(uri, record)
    client, _, _ = _client(output)
    page = client.get("/items/fitted").text
    provenance = page[page.index("<table class=provenance>"):]
    provenance = provenance[:provenance.index("</table>")]
    # One row per value, nested values under dotted keys, floats to four significant digits.
    assert "<tr><th>seconds.stage1</th><td>12.35</td></tr>" in provenance
    assert "<tr><th>seconds.finetune</th><td>1,235</td></tr>" in provenance
    assert "<tr><th>seconds.embedding</th><td>0.0001235</td></tr>" in provenance
    assert f"<tr><th>output sha256.access</th><td>{'1' * 64}</td></tr>" in provenance
    assert "{" not in provenance and "12.345678" not in provenance
    assert "<td>2026-01-01 00:00:00 UTC<br>" in page  # when the version was made, readable


def test_readable_values_for_pages():
    from diffcolor.archive.pages import flat_rows, readable

    assert readable(0.30000000000000004) == "0.3" and readable(float("nan")) == "–" and readable(True) == "yes"
    assert readable("2026-12-07T05:50:09+02:00") == "2026-12-07 03:50:09 UTC"
    assert readable("2026-13-45T00:00") == "2026-13-45T00:00" and readable("sha256:abc") == "sha256:abc"
    assert flat_rows({"b": {"c": {"d": 1.0}}, "a": [], "e": {}}) == [("a", ""), ("b.c.d", "1"), ("e", "–")]
    assert readable([{"x": 0.123456}]) == "x: 0.1235"


def test_while_the_collection_is_indexed_the_pages_say_so_and_the_unfiltered_list_is_served(output, monkeypatch):
    import threading

    import review.app
    from diffcolor.archive.browse import CollectionTable

    release, store = threading.Event(), CollectionTable._store
    monkeypatch.setattr(CollectionTable, "_store", lambda self, files, base: (release.wait(60), store(self, files,
                                                                                                         base))[1])
    monkeypatch.setattr(review.app, "INDEX_WAIT_SECONDS", 0.2)
    try:
        client, _, _ = _client(output)
        listed = client.get("/api/items?limit=1&offset=1").json()  # read from the runs in place
        assert (listed["total"], [item["item_id"] for item in listed["items"]], listed["building"]) == (
            2, ["nostate"], True)
        filtered = client.get("/api/items?collection=Dogs").json()
        assert (filtered["total"], filtered["items"], filtered["building"]) == (None, [], True)
        assert "still being indexed: this list is read from the runs" in client.get("/").text
        assert "still being indexed: filtered lists show once it is done" in client.get("/?collection=Dogs").text
    finally:
        release.set()
    client.app.state.table.refresh()
    filtered = client.get("/api/items?collection=Dogs").json()
    assert (filtered["total"], filtered["building"]) == (2, False)
    assert "still being indexed" not in client.get("/").text
