"""The curator review, IIIF publishing and BagIt delivery over a real S3 API (moto), as over a local disk."""

from __future__ import annotations

from urllib.parse import unquote

import bagit
import numpy as np
import pytest
from conftest import gray_scene
from fastapi.testclient import TestClient
from PIL import Image

from diffcolor.archive import storage
from diffcolor.archive.bag import write_bag
from diffcolor.archive.iiif_publish import publish_iiif
from diffcolor.archive.layout import OutputLayout
from diffcolor.archive.results import write_results
from diffcolor.common.items import ItemRequest
from diffcolor.pipeline import colorize_item
from review.app import ReviewConfig, create_app

TOKEN = "s" * 32
RUN = "20261203T000000Z-abcdef"


@pytest.fixture
def s3_output(models, smoke, s3_bucket, tmp_path):
    """Two items colourised straight into a bucket by the real pipeline, with one run's results."""
    output = f"{s3_bucket}/colour"
    records = []
    for index, (item, caption) in enumerate((("harbour", "a boat in a harbour"), ("street", "a tram on a street"))):
        source = f"{s3_bucket}/incoming/{item}.png"
        path = tmp_path / f"{item}.png"
        Image.fromarray(np.round(gray_scene(40, 56, seed=index) * 255).astype(np.uint8)).save(path)
        storage.write_bytes(source, path.read_bytes())
        request = ItemRequest(item_id=item, source_uri=source, caption=caption, catalogue={"title": item.title()})
        records += colorize_item(models, request, OutputLayout(output).item_prefix(item), smoke, preset="smoke")
    write_results(records, OutputLayout(output).run(RUN).results)
    return output, records


def test_review_browses_and_records_a_decision_on_s3(s3_output):
    output, records = s3_output
    review = ReviewConfig(output=output, token=TOKEN)
    client = TestClient(create_app(review), base_url="http://127.0.0.1")  # a host name the server answers
    listed = client.get("/api/items").json()
    assert sorted(item["item_id"] for item in listed["items"]) == ["harbour", "street"]
    page = client.get("/items/harbour")
    assert page.status_code == 200 and "sks" not in page.text
    image = client.get("/api/items/harbour/versions/1/image")
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"

    decided = client.post("/api/items/harbour/decisions", json={"version": 1, "decision": "approved",
                                                                 "decided_by": "Ada", "note": "sea is right"},
                          headers={"Authorization": f"Bearer {TOKEN}", "X-CSRF-Token": review.csrf})
    assert decided.status_code == 201, decided.text
    [decision] = storage.list_files(f"{output}/items/harbour/decisions")
    assert storage.read_json(decision)["decided_by"] == "Ada"
    assert storage.read_json(f"{output}/items/harbour/approved.json")["version"] == 1


def test_iiif_manifest_published_into_the_bucket_names_only_its_objects(s3_output):
    output, _ = s3_output
    base = "https://images.example.org/colour"
    publication = publish_iiif(output, base, unreviewed=True)
    document = storage.read_json(f"{output}/iiif/manifest.json")
    assert document == publication.manifest and publication.items == ["harbour", "street"]
    bodies = [canvas["items"][0]["items"][0]["body"] for canvas in document["items"]]
    ids = [choice["id"] for body in bodies for choice in body.get("items", [body])]
    assert ids and all(url.startswith(base + "/") for url in ids)
    assert all(storage.exists(f"{output}/{unquote(url[len(base) + 1:])}") for url in ids), ids


def test_a_run_on_s3_is_delivered_as_a_valid_bag(s3_output, tmp_path):
    output, records = s3_output
    summary = write_bag(output, RUN, tmp_path / "bag")
    assert summary["versions"] == 2
    bag = bagit.Bag(str(tmp_path / "bag"))
    bag.validate()
    assert "data/items/harbour/versions/v0001/master.tif" in set(bag.payload_files())
