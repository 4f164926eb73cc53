"""IIIF in (real IIIF Cookbook manifests to manifest rows) and out (a collection's colour versions as a manifest).

Nothing here touches the network: image URLs are only built as strings, and
an ``info.json`` is given as a cached local file.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import gray_scene
from PIL import Image

from diffcolor.archive.iiif import (
    RefusedBody,
    image_url,
    is_place_label,
    read_iiif,
    read_info_json,
)
from diffcolor.archive.manifest import ManifestError
from diffcolor.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "iiif"
REF = "https://iiif.io/api/image/3.0/example/reference"
DEE = "John Dee performing an experiment before Queen Elizabeth I"
GALLICA = f"{REF}/59d09e6773341f28ea166e9f3c1e674f-gallica_ark_12148_bpt6k1526005v"
ETHIOPIC = f"{REF}/d3bbf5397c6df6b894c5991195c912ab"
PAPER = f"{REF}/4ce82cef49fb16798f4c2440307c3d6f-newspaper"

# recipe file -> rows (item_id, image_uri, caption, canvas_label)
EXPECTED = {
    "0001-mvm-image--manifest.json": [  # a plain Image body, no service, no canvas label
        ("p1", "https://iiif.io/api/presentation/2.1/example/fixtures/resources/page1-full.png",
         "Single Image Example", None)],
    "0005-image-service--manifest.json": [  # ImageService3: the request built from the service
        ("p1", f"{REF}/918ecd18c2592080851777620de9bcb5-gottingen/full/max/0/default.jpg",
         "Picture of Göttingen taken during the 2019 IIIF Conference: Canvas with a single IIIF image",
         "Canvas with a single IIIF image")],
    "0006-text-language--manifest.json": [  # en and fr: English by default
        ("p1", f"{REF}/329817fc8a251a01c393f517d8a17d87-Whistlers_Mother/full/max/0/default.jpg",
         "Whistler's Mother: Arrangement in Grey and Black No. 1, also called Portrait of the Artist's Mother.", None)],
    "0009-book-1--manifest.json": [  # "Blank page", "Title page" place the image; "Frontispiece" describes it
        ("p1", f"{GALLICA}_f18/full/max/0/default.jpg", "Simple Manifest - Book", "Blank page"),
        ("p2", f"{GALLICA}_f19/full/max/0/default.jpg", "Simple Manifest - Book: Frontispiece", "Frontispiece"),
        ("p3", f"{GALLICA}_f20/full/max/0/default.jpg", "Simple Manifest - Book", "Title page"),
        ("p4", f"{GALLICA}_f21/full/max/0/default.jpg", "Simple Manifest - Book", "Blank page"),
        ("p5", f"{GALLICA}_f22/full/max/0/default.jpg", "Simple Manifest - Book: Bookplate", "Bookplate")],
    "0024-book-4-toc--manifest.json": [  # folio labels never become captions
        (f"p{n}", f"{ETHIOPIC}-{n}-21198-{name}_master/full/max/0/default.jpg", "Ethiopic Ms 10", label)
        for n, name, label in [(1, "zz001d8m41_774608", "f. 1r"), (2, "zz001d8m5j_774612", "f. 1v"),
                               (3, "zz001d8tm5_775004", "f. 2r"), (4, "zz001d8tnp_775007", "f. 2v"),
                               (5, "zz001d8v6f_775077", "f. 3r"), (6, "zz001d8v7z_775085", "f. 3v")]],
    "0029-metadata-anywhere--manifest.json": [  # manifest label + descriptive canvas label
        ("p1", f"{REF}/421e65be2ce95439b3ad6ef1f2ab87a9-dee-natural/full/max/0/default.jpg",
         f"{DEE}: Painting under natural light", "Painting under natural light"),
        ("p2", f"{REF}/421e65be2ce95439b3ad6ef1f2ab87a9-dee-xray/full/max/0/default.jpg",
         f"{DEE}: X-ray view of painting", "X-ray view of painting")],
    "0033-choice--manifest.json": [  # Choice: the first item
        ("p1", f"{REF}/421e65be2ce95439b3ad6ef1f2ab87a9-dee-natural/full/max/0/default.jpg", f"{DEE}.", None)],
    "0040-image-rotation-service--manifest-service.json": [  # SpecificResource: rotation through the service
        ("p1", f"{REF}/85a96c630f077e6ac6cb984f1b752bbf-0-21198-zz00022840-1-page1/full/max/90/default.jpg",
         "[Conoximent de las orines] Ihesus, Ihesus. En nom de Deu et dela beneyeta sa mare e de tots los angels i "
         "archangels e de tots los sants e santes de paradis yo micer Johannes comense aquest libre de reseptes en "
         "l’ayn Mi 466.", "inside cover; 1r")],
    "0068-newspaper--newspaper_issue_1-manifest.json": [  # "p. 1", "p. 2" (language "none")
        ("p1", f"{PAPER}-p1/full/max/0/default.jpg", "Berliner Tageblatt - 1925-02-16", "p. 1"),
        ("p2", f"{PAPER}-p2/full/max/0/default.jpg", "Berliner Tageblatt - 1925-02-16", "p. 2")],
    "0118-multivalue--manifest.json": [  # label in French only, summary in English; canvas id .../canvas/1
        ("1", "https://upload.wikimedia.org/wikipedia/commons/thumb/1/1b/Whistlers_Mother_high_res.jpg/"
              "1114px-Whistlers_Mother_high_res.jpg",
         "Arrangement en gris et noir no 1: A painting in oil on canvas created by the American-born painter James "
         "McNeill Whistler, in 1871.", None)],
    "0299-region--manifest.json": [  # SpecificResource: the region through the service, at full size
        ("p1", f"{PAPER}-p2/1768,2423,1768,2080/max/0/default.jpg",
         "Berliner Tageblatt article, 'Ein neuer Sicherungsplan?'", None)],
}


def _rows(source, **options):
    imported = read_iiif(str(source), **options)
    return [(row["item_id"], row["image_uri"], row["caption"], row["canvas_label"] if "canvas_label" in row else None)
            for row in imported.table.to_pylist()], imported


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_cookbook_manifest_gives_expected_rows(name):
    rows, imported = _rows(FIXTURES / name)
    assert rows == EXPECTED[name]
    assert imported.left_out == []


def test_fixtures_are_the_cookbook_files_listed_in_sources():
    sources = (FIXTURES / "SOURCES.md").read_text()
    for path in FIXTURES.glob("*.json"):
        assert path.name in sources
        json.loads(path.read_bytes())  # kept as published: valid JSON, templates included


def test_choice_is_said_in_the_row_and_catalogue_fields_come_along():
    table = read_iiif(str(FIXTURES / "0033-choice--manifest.json")).table
    assert table.column("iiif_note").to_pylist() == ["Choice of 2: took the first (Natural Light); left X-Ray"]
    rows = read_iiif(str(FIXTURES / "0029-metadata-anywhere--manifest.json")).table.to_pylist()
    assert rows[0]["creator"] == "Glindoni, Henry Gillard, 1852-1913"
    assert rows[1]["description"].startswith("The painting originally showed Dee standing in a circle of skulls")
    assert rows[0]["attribution"].startswith("Wellcome Collection")


def test_language_is_chosen():
    rows, _ = _rows(FIXTURES / "0006-text-language--manifest.json", language="fr")
    assert rows[0][2] == "La Mère de Whistler: Arrangement en gris et noir n°1, also called Portrait de la mère de l'artiste."
    table = read_iiif(str(FIXTURES / "0006-text-language--manifest.json"), language="fr").table
    assert table.column("subject").to_pylist() == ["McNeill Anna Matilda, mère de Whistler (1804-1881)"]


def test_a_manifest_without_images_is_refused_naming_the_canvas():
    with pytest.raises(ManifestError) as caught:
        read_iiif(str(FIXTURES / "0002-mvm-audio--manifest.json"))
    assert [str(p) for p in caught.value.problems] == [
        "column 'image_uri': canvas 1 '{{ id.path }}/canvas' left out: its body is Sound, not an Image"]


def test_a_canvas_without_a_caption_is_one_problem_not_a_rejected_manifest(tmp_path, capsys):
    document = json.loads((FIXTURES / "0068-newspaper--newspaper_issue_1-manifest.json").read_text())
    document["label"] = {"none": [1925]}  # a number: no content word anywhere for p1
    document["items"][0]["label"] = {"none": [1]}
    document["items"][1]["summary"] = {"de": ["Eine Zeitungsseite mit Anzeigen"]}
    source = tmp_path / "m.json"
    source.write_text(json.dumps(document))
    rows, imported = _rows(source)
    assert rows == [("p2", f"{PAPER}-p2/full/max/0/default.jpg", "1925: Eine Zeitungsseite mit Anzeigen", "p. 2")]
    assert [str(p) for p in imported.left_out] == [
        "column 'caption': canvas 1 '{{ id.path }}/canvas/p1' left out: no caption with a content word "
        "(label '1', manifest label '1925')"]
    out = tmp_path / "m.parquet"
    assert main(["manifest", "build", "--from-iiif", str(source), "-o", str(out)]) == 0
    printed = capsys.readouterr()
    assert printed.out.strip() == f"wrote 1 items to {out}"
    assert "canvas 1 '{{ id.path }}/canvas/p1' left out" in printed.err


@pytest.mark.parametrize("label, place", [
    ("f. 1r", True), ("p. 2", True), ("Front cover", True), ("Seite 1.", True), ("pages 1–2", True),
    ("Vol. 1 title page (verso)", True), ("inside cover; 1r", True), ("171r (387)", True), ("xiv", True),
    ("Frontispiece", False), ("Painting under natural light", False), ("Foldout, unfolded", False)])
def test_place_labels(label, place):
    assert is_place_label(label) is place


def _service_body(service, **body):
    return {"id": service["id" if "id" in service else "@id"] + "/full/full/0/default.jpg", "type": "Image",
            "service": [service], **body}


def test_image_api_2_service_and_size_limits(tmp_path):
    v2 = {"@id": "https://images.example.org/iiif/2/plate-7", "@type": "ImageService2",
          "profile": "http://iiif.io/api/image/2/level2.json"}
    assert image_url(_service_body(v2)) == ("https://images.example.org/iiif/2/plate-7/full/full/0/default.jpg", None)
    limited = {**v2, "maxWidth": 1000}  # maxHeight defaults to maxWidth
    assert image_url(_service_body(limited, width=4000, height=3000))[0].endswith("/full/1000,750/0/default.jpg")
    assert image_url(_service_body(limited))[0].endswith("/full/!1000,1000/0/default.jpg")  # size unknown: best fit
    # A cached info.json declares the limits and the size (the manifest does not).
    info = tmp_path / "info.json"
    info.write_text(json.dumps({"@context": "http://iiif.io/api/image/2/context.json", "@id": v2["@id"],
                                "width": 4000, "height": 3000, "maxArea": 3_000_000}))
    url, _ = image_url(_service_body(v2), read_info_json(str(info)))
    assert url.endswith("/full/2000,1500/0/default.jpg")


def test_a_body_that_is_a_service_base(tmp_path):
    base = "https://images.example.org/iiif/3/plate-9"
    info = tmp_path / "info.json"
    info.write_text(json.dumps({"id": base, "type": "ImageService3", "width": 5000, "height": 2500, "maxWidth": 2500}))
    body = {"id": base, "type": "Image", "service": [{"id": base, "type": "ImageService3", "profile": "level2"}]}
    assert image_url(body)[0] == f"{base}/full/max/0/default.jpg"  # not the base itself
    assert image_url({"id": base, "type": "Image"}, read_info_json(str(info)))[0] == f"{base}/full/2500,1250/0/default.jpg"


def test_specific_resources_refused_with_the_reason():
    region = json.loads((FIXTURES / "0299-region--manifest.json").read_text())
    body = region["items"][0]["items"][0]["items"][0]["body"]
    svg = copy.deepcopy(body)
    svg["selector"] = {"type": "SvgSelector", "value": "<svg/>"}
    with pytest.raises(RefusedBody, match="its selector 'SvgSelector' cannot be requested from an Image API"):
        image_url(svg)
    no_service = copy.deepcopy(body)
    del no_service["source"]["service"]
    with pytest.raises(RefusedBody, match=r"it selects region '1768,2423,1768,2080' of '.*newspaper-p2/full/max/0/"
                                          r"default.jpg', which has no Image API service"):
        image_url(no_service)
    fragment = copy.deepcopy(body)
    fragment["selector"] = {"type": "FragmentSelector", "value": "xywh=percent:10,10,50,50"}
    assert image_url(fragment)[0] == f"{PAPER}-p2/pct:10,10,50,50/max/0/default.jpg"


def test_item_ids_drop_json_and_fall_back_to_the_label(tmp_path):
    document = json.loads((FIXTURES / "0009-book-1--manifest.json").read_text())
    document["items"][0]["id"] = "https://example.org/iiif/book/canvas/p1.json"
    document["items"][1]["id"] = "https://example.org/iiif/book/canvas/"
    document["items"][1]["items"][0]["items"][0]["target"] = document["items"][1]["id"]
    source = tmp_path / "m.json"
    source.write_text(json.dumps(document))
    ids = read_iiif(str(source)).table.column("item_id").to_pylist()
    assert ids[:2] == ["p1", "canvas"]  # the last path segment, '.json' dropped


# --- IIIF out -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def colourised_output(models, smoke, tmp_path_factory):
    """An output root with two items colourised by the real pipeline (tiny bundle, smoke preset); copy to change it."""
    from diffcolor.archive.layout import OutputLayout
    from diffcolor.common.items import ItemRequest
    from diffcolor.pipeline import colorize_item

    tmp_path = tmp_path_factory.mktemp("iiif-out")
    output = tmp_path / "collection-out"
    inside = output / "sources" / "harbour.png"  # an original inside OUTPUT: published
    outside = tmp_path / "elsewhere" / "street.png"  # an original outside OUTPUT: not published
    for path, seed in ((inside, 1), (outside, 2)):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(gray_scene(40, 56, seed=seed) * 255).astype(np.uint8)).save(path)
    requests = [
        ItemRequest(item_id="harbour", source_uri=str(inside), caption="a boat in a harbour",
                    catalogue={"title": "The harbour", "creator": "Unknown photographer",
                               "rights": "http://creativecommons.org/publicdomain/mark/1.0/"}),
        ItemRequest(item_id="street", source_uri=str(outside), caption="a tram on a street",
                    targets=("a green tram on a street",), color_map={"tram": "red"}, catalogue={"rights": "All rights reserved"}),
    ]
    records = {r.item_id: colorize_item(models, r, OutputLayout(str(output)).item_prefix(r.item_id), smoke, preset="smoke")
               for r in requests}
    (output / "items" / "broken").mkdir()  # an item folder without a done version
    return output, records


def _local(url: str, base: str, output: Path) -> Path:
    from urllib.parse import unquote

    assert url.startswith(base + "/")
    return output / unquote(url[len(base) + 1:])


def test_published_manifest_validates_and_every_image_resolves(colourised_output):
    from iiif_prezi3 import Manifest

    from diffcolor.archive.iiif_publish import DIGITAL_SOURCE_TYPE, publish_iiif

    output, records = colourised_output
    base = "https://images.example.org/collection"
    publication = publish_iiif(str(output), base, unreviewed=True)  # nothing approved yet: the latest done versions
    written = (output / "iiif" / "manifest.json").read_text()
    Manifest.model_validate_json(written)  # iiif-prezi3 parses it back
    document = json.loads(written)
    assert document == publication.manifest and publication.items == ["harbour", "street"]
    assert publication.left_out == ["item 'broken': no done version"]
    assert document["id"] == f"{base}/iiif/manifest.json"

    harbour, street = document["items"]
    bodies = harbour["items"][0]["items"][0]["body"]["items"]  # Choice: original, then colour
    assert [b["label"]["en"][0] for b in bodies] == [
        "Original", "AI colourisation (DiffColor) - SMOKE RUN: random weights, not a colourisation - "
        "not reviewed by a curator"]
    assert bodies[0]["id"] == f"{base}/sources/harbour.png"
    assert bodies[1]["id"] == f"{base}/items/harbour/versions/v0001/access.jpg"
    street_body = street["items"][0]["items"][0]["body"]  # original outside OUTPUT: the colour one only
    assert street_body["type"] == "Image" and street_body["id"].endswith("/items/street/versions/v0002/access.jpg")
    images = [*bodies, street_body]
    for image in images:
        assert _local(image["id"], base, output).is_file()

    street_record = records["street"][-1]
    assert [r["version"] for r in records["street"]] == [1, 2]
    meta = {entry["label"]["en"][0]: entry["value"]["none"][0] for entry in street["metadata"]
            if "none" in entry["value"]}
    assert meta["Prompt"] == street_record["target_prompt"] and meta["Prompt"] in ("a red tram on a street",
                                                                                   "a green tram on a street")
    assert meta["Prompt"] != street_record["model_prompt"]
    assert meta["Model"] == street_record["model_id"]
    assert meta["Digital source type"] == DIGITAL_SOURCE_TYPE
    assert meta["Rights"] == "All rights reserved" and "rights" not in street  # not a rights URI: kept as text
    assert harbour["rights"] == "http://creativecommons.org/publicdomain/mark/1.0/"
    # Attribution comes from rights and credit fields only: a rights URI is the rights property, a title is no credit.
    assert "requiredStatement" not in harbour
    assert street["requiredStatement"]["value"]["none"] == ["All rights reserved"]
    assert (harbour["width"], harbour["height"]) == (56, 40)
    assert harbour["label"]["none"] == ["The harbour (smoke run, not reviewed by a curator)"]
    assert [e["value"] for e in street["metadata"] if e["label"]["en"] == ["Review"]] == [
        {"en": ["not reviewed by a curator"]}]
    assert "not been approved" in document["summary"]["en"][0]
    prompts = [e["value"]["none"][0] for e in harbour["metadata"] if e["label"]["en"] == ["Prompt"]]
    assert prompts == ["a boat in a harbour"]  # a primary colourisation: the caption


def test_an_approved_version_is_preferred_and_the_cli_writes_where_asked(colourised_output, tmp_path, capsys):
    import shutil

    output = tmp_path / "copy"
    shutil.copytree(colourised_output[0], output)
    records = colourised_output[1]
    (output / "items" / "street" / "approved.json").write_text(json.dumps({"version": 1}))
    target = output / "public" / "collection.json"
    assert main(["iiif", str(output), "--base-url", "https://images.example.org/c/", "-o", str(target)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == \
        "wrote a IIIF manifest of 1 items: https://images.example.org/c/public/collection.json"
    assert "left out: item 'harbour': no version is approved (--unreviewed adds" in captured.err
    [street] = json.loads(target.read_text())["items"]
    assert "not reviewed" not in json.dumps(street)
    assert street["items"][0]["items"][0]["body"]["id"].endswith("/items/street/versions/v0001/access.jpg")
    prompts = [e["value"]["none"][0] for e in street["metadata"] if e["label"]["en"] == ["Prompt"]]
    assert prompts == [records["street"][0]["target_prompt"]]


def test_publishing_refuses_a_bad_base_url_and_an_empty_output(tmp_path, capsys):
    assert main(["iiif", str(tmp_path), "--base-url", "ftp://x"]) == 2
    assert "must be an http(s) URL" in capsys.readouterr().err
    assert main(["iiif", str(tmp_path), "--base-url", "https://x.org"]) == 2
    assert "has an approved version (--unreviewed adds the latest done versions) to publish" in capsys.readouterr().err
    assert main(["iiif", str(tmp_path), "--base-url", "https://x.org", "--unreviewed"]) == 2
    assert "has a done version to publish" in capsys.readouterr().err


@pytest.mark.parametrize("image", ["file:///etc/passwd", "/home/curator/private.tif", "s3://internal/scan.tif",
                                   "../../secrets.png"])
def test_a_manifest_naming_a_local_file_or_a_private_store_is_refused(tmp_path, image, capsys):
    """A IIIF manifest comes from outside: its images must be published (http or https), never this host's files."""
    from diffcolor.archive.iiif import read_iiif
    from diffcolor.archive.manifest import ManifestError

    manifest = {"@context": "http://iiif.io/api/presentation/3/context.json", "id": "https://example.org/m",
                "type": "Manifest", "label": {"en": ["A harbour"]}, "items": [
                    {"id": "https://example.org/c1", "type": "Canvas", "label": {"en": ["a boat in a harbour"]},
                     "items": [{"id": "https://example.org/p1", "type": "AnnotationPage", "items": [
                         {"id": "https://example.org/a1", "type": "Annotation", "motivation": "painting",
                          "target": "https://example.org/c1", "body": {"id": image, "type": "Image"}}]}]}]}
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    with pytest.raises(ManifestError) as refused:
        read_iiif(str(path))
    assert "is not an http(s) URL" in str(refused.value.problems)


# ---------------------------------------------------------------------------
# Hostile IIIF: every malformed input is a problem line, never a traceback.

WRONG_VALUES = [None, -1, 1e308, True, "x", "\x1b[2J", [None], [[[]]], {"a": 1}, {"none": [{}]}, [{"type": "Canvas"}]]


def _paths(value, path=()):
    """Every path into a JSON value (keys and list indices), the value itself first."""
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*path, index))


def _replaced(document, path, value):
    copied = copy.deepcopy(document)
    if not path:
        return value
    target = copied
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return copied


@pytest.mark.parametrize("name", ["0005-image-service--manifest.json", "0299-region--manifest.json",
                                  pytest.param("0033-choice--manifest.json", marks=pytest.mark.slow),
                                  pytest.param("0029-metadata-anywhere--manifest.json", marks=pytest.mark.slow)])
def test_every_field_of_a_wrong_type_gives_a_table_or_problem_lines(name, tmp_path):
    document = json.loads((FIXTURES / name).read_text())
    info = {"id": f"{REF}/918ecd18c2592080851777620de9bcb5-gottingen", "type": "ImageService3", "width": 4000,
            "height": 3000, "maxWidth": 1000}
    source, tried = tmp_path / "m.json", 0
    for path in _paths(document):
        for value in WRONG_VALUES:
            source.write_text(json.dumps(_replaced(document, path, value)))
            image_info = {info["id"]: _replaced(info, ("maxWidth",), value if path else 1000)}
            try:
                imported = read_iiif(str(source), image_info=image_info)
            except ManifestError as error:  # the only way to fail: problems that name what is wrong
                assert error.problems and all(str(problem) for problem in error.problems)
            else:
                assert imported.table.num_rows >= 1
                for row in imported.table.to_pylist():
                    assert all("\x1b" not in str(cell) for cell in row.values())
            tried += 1
    assert tried > 100


@pytest.mark.parametrize("content", [b"[]", b'"a string"', b"42", b"null", b'{"id": 5}', b'{"@id": ["x"]}',
                                     b"\xff\xfe not utf-8", b"{not json", b"[" * 200_000 + b"]" * 200_000])
def test_a_malformed_info_json_is_one_problem_line(content, tmp_path, capsys):
    info = tmp_path / "info.json"
    info.write_bytes(content)
    with pytest.raises(ManifestError) as caught:
        read_info_json(str(info))
    assert len(caught.value.problems) == 1
    code = main(["manifest", "build", "--from-iiif", str(FIXTURES / "0005-image-service--manifest.json"),
                 "--image-info", str(info), "-o", str(tmp_path / "m.parquet")])
    printed = capsys.readouterr()
    assert code == 1 and len(printed.out.strip().splitlines()) == 2 and "Traceback" not in printed.err


def test_size_fields_of_the_wrong_type_in_an_info_json_are_ignored(tmp_path):
    base = f"{REF}/918ecd18c2592080851777620de9bcb5-gottingen"
    info = tmp_path / "info.json"
    info.write_text(json.dumps({"id": base, "type": "ImageService3", "width": "4000", "height": [3000],
                                "maxWidth": {"px": 10}, "maxArea": -5}))
    rows, _ = _rows(FIXTURES / "0005-image-service--manifest.json", image_info=read_info_json(str(info)))
    assert rows[0][1] == f"{base}/full/max/0/default.jpg"


def test_json_nested_too_deep_is_one_problem_line(tmp_path, capsys):
    source = tmp_path / "deep.json"
    source.write_bytes(b'{"type": "Manifest", "items": ' + b"[" * 200_000 + b"]" * 200_000 + b"}")
    code = main(["manifest", "build", "--from-iiif", str(source), "-o", str(tmp_path / "m.parquet")])
    printed = capsys.readouterr()
    assert code == 1 and "too deep" in printed.out and "Traceback" not in printed.err
    # Nested just within what the parser reads, but deeper than the importer walks: still a problem line.
    shallow_enough = b'{"type": "Manifest", "items": [{"type": "Canvas", "label": ' + b'{"en": ' * 400 + b'"x"' \
        + b"}" * 400 + b', "items": [{"type": "AnnotationPage", "items": [{"motivation": "painting", "body": ' \
        + b'{"type": "SpecificResource", "source": ' * 300 + b"1" + b"}" * 300 + b"}]}]}]}"
    source.write_bytes(shallow_enough)
    with pytest.raises(ManifestError):
        read_iiif(str(source))


def test_the_canvases_left_out_are_listed_up_to_the_cap_then_counted(tmp_path, capsys):
    from diffcolor.archive.manifest import MAX_PROBLEMS

    count = MAX_PROBLEMS + 2500
    source = tmp_path / "m.json"
    source.write_text(json.dumps({"type": "Manifest", "id": "https://example.org/m", "label": {"en": ["Harbour views"]},
                                  "items": [{"type": "Canvas", "id": f"https://example.org/c{n}"} for n in range(count)]}))
    code = main(["manifest", "build", "--from-iiif", str(source), "-o", str(tmp_path / "m.parquet")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 1 and len(lines) == MAX_PROBLEMS + 2
    assert lines[-2] == "... and 2500 more problems" and f"{count} problem(s)" in lines[-1]


def test_control_and_bidi_characters_never_reach_a_caption_or_a_label(tmp_path, capsys):
    document = json.loads((FIXTURES / "0005-image-service--manifest.json").read_text())
    hostile = "\x1b[31mBoats\x07 in\x00 the \u202eharbour\u2066\u200f\u061c\x9b"
    document["label"] = {"en": [hostile]}
    document["items"][0]["label"] = {"en": [f"<p>{hostile}</p>"]}
    document["metadata"] = [{"label": {"en": ["Photographer"]}, "value": {"en": [hostile]}}]
    document["rights"] = f"http://rightsstatements.org/vocab/InC/1.0/\x1b]8;;http://evil/\x07"
    source = tmp_path / "m.json"
    source.write_text(json.dumps(document))
    out = tmp_path / "m.parquet"
    assert main(["manifest", "build", "--from-iiif", str(source), "-o", str(out)]) == 0
    row = read_iiif(str(source)).table.to_pylist()[0]
    for column in ("caption", "title", "canvas_label", "photographer", "rights"):
        assert not any(ord(char) < 32 or 0x7F <= ord(char) < 0xA0 or char in "\u202e\u2066\u200f\u061c"
                       for char in row[column]), column
    assert row["caption"].startswith("[31mBoats in the harbour")
    capsys.readouterr()
    assert main(["manifest", "validate", str(out)]) == 0


def test_an_image_url_with_control_characters_or_credentials_is_refused():
    for url in ("https://images.example/a\x1b.jpg", "https://images.example/a\u202e.jpg", "https://images.example/a b.jpg",
                "https://user:pa/ss@images.example/a.jpg"):
        with pytest.raises(RefusedBody):
            image_url({"id": url, "type": "Image"})


def _copy(colourised_output, tmp_path) -> Path:
    import shutil

    output = tmp_path / "copy"
    shutil.copytree(colourised_output[0], output)
    return output


def _set_fields(output: Path, item_id: str, **fields) -> None:
    """Record fields as a run would have recorded them, in every record of the item."""
    folder = output / "items" / item_id
    for path in [folder / "result.json", *(folder / "versions").glob("*.json")]:
        path.write_text(json.dumps(dict(json.loads(path.read_text()), **fields)))


def _set_catalogue(output: Path, item_id: str, catalogue: dict) -> None:
    _set_fields(output, item_id, catalogue=catalogue)


def _canvases(document: dict) -> dict:
    from iiif_prezi3 import Manifest

    Manifest.model_validate_json(json.dumps(document))  # iiif-prezi3 parses it back
    return {canvas["id"].rsplit("/", 1)[-1]: canvas for canvas in document["items"]}


def test_by_default_only_approved_versions_are_published_and_unreviewed_ones_are_marked(colourised_output, tmp_path,
                                                                                          capsys):
    from diffcolor.archive.decisions import record_decision
    from diffcolor.archive.iiif_publish import publish_iiif

    output = _copy(colourised_output, tmp_path)
    base = "https://images.example.org/c"
    assert main(["iiif", str(output), "--base-url", base]) == 2  # nothing approved: nothing to publish
    assert "no item under" in capsys.readouterr().err
    record_decision(str(output), "harbour", 1, "approved", "Ada")
    publication = publish_iiif(str(output), base)
    assert publication.items == ["harbour"]
    assert any(why.startswith("item 'street': no version is approved") for why in publication.left_out)
    harbour = _canvases(publication.manifest)["harbour"]
    assert "not reviewed" not in json.dumps(harbour) and "not been approved" not in json.dumps(publication.manifest)
    [review] = [e["value"]["en"][0] for e in harbour["metadata"] if e["label"]["en"] == ["Review"]]
    assert review.startswith("approved by a curator on 20")

    # --unreviewed adds street's latest done version (v2), marked in its label, its colour body and its metadata.
    assert main(["iiif", str(output), "--base-url", base, "--unreviewed"]) == 0
    canvases = _canvases(json.loads((output / "iiif" / "manifest.json").read_text()))
    street = canvases["street"]
    assert street["items"][0]["items"][0]["body"]["id"].endswith("/items/street/versions/v0002/access.jpg")
    assert "not reviewed by a curator" in street["label"]["none"][0]
    assert "not reviewed by a curator" in street["items"][0]["items"][0]["body"]["label"]["en"][0]
    assert [e["value"]["en"] for e in street["metadata"] if e["label"]["en"] == ["Review"]] == [
        ["not reviewed by a curator"]]
    assert "not reviewed" not in json.dumps(canvases["harbour"])  # the approved one stays approved

    # A version a curator rejected is never published, not even as unreviewed.
    record_decision(str(output), "street", 2, "rejected", "Bo")
    publication = publish_iiif(str(output), base, unreviewed=True)
    assert publication.items == ["harbour"]
    assert "item 'street': a curator rejected its latest version 2" in publication.left_out


def test_every_image_body_states_its_own_files_size(colourised_output, tmp_path):
    from diffcolor.archive.iiif_publish import publish_iiif

    output = _copy(colourised_output, tmp_path)
    # The access copy is smaller than the master (as a 512-pixel access copy of a 6000x4000 scan is); the
    # original was rescanned larger than the record says. Each body must say what its file is.
    Image.new("RGB", (28, 20), (200, 10, 10)).save(output / "items" / "harbour" / "versions" / "v0001" / "access.jpg")
    Image.new("L", (112, 80), 128).save(output / "sources" / "harbour.png")
    _set_fields(output, "harbour", source_uri=str(output / "sources" / "harbour.png"))  # the original in this copy
    record = json.loads((output / "items" / "harbour" / "result.json").read_text())
    assert (record["source"]["width"], record["source"]["height"]) == (56, 40)
    canvases = _canvases(publish_iiif(str(output), "https://x.org/c", unreviewed=True).manifest)
    original, colour = canvases["harbour"]["items"][0]["items"][0]["body"]["items"]
    assert (original["width"], original["height"]) == (112, 80)
    assert (colour["width"], colour["height"]) == (28, 20)
    assert (canvases["harbour"]["width"], canvases["harbour"]["height"]) == (112, 80)  # the original's size
    street = canvases["street"]["items"][0]["items"][0]["body"]  # no publishable original: the access copy's size
    with Image.open(output / "items" / "street" / "versions" / "v0002" / "access.jpg") as image:
        assert (street["width"], street["height"]) == image.size == (canvases["street"]["width"],
                                                                     canvases["street"]["height"])
    # An access copy that is not an image is left out, named, never published with a made-up size.
    (output / "items" / "street" / "versions" / "v0002" / "access.jpg").write_bytes(b"not a jpeg")
    publication = publish_iiif(str(output), "https://x.org/c", unreviewed=True)
    assert publication.items == ["harbour"] and any("not a readable image" in why for why in publication.left_out)


@pytest.mark.parametrize(("catalogue", "statement"), [
    ({"title": "The harbour", "creator": "Unknown photographer"}, None),  # no rights or credit: no statement
    ({"title": "The harbour", "credit_line": "Photo: City Archive"}, "Photo: City Archive"),
    ({"Credit Line": "City Archive", "rights": "In copyright"}, "City Archive; In copyright"),
    ({"attribution": "Gift of A. Donor", "credit": "City Archive",
      "rights": "http://rightsstatements.org/vocab/InC/1.0/"}, "City Archive; Gift of A. Donor"),
])
def test_attribution_comes_from_rights_and_credit_fields_only(colourised_output, tmp_path, catalogue, statement):
    from diffcolor.archive.iiif_publish import publish_iiif

    output = _copy(colourised_output, tmp_path)
    _set_catalogue(output, "harbour", catalogue)
    harbour = _canvases(publish_iiif(str(output), "https://x.org/c", unreviewed=True).manifest)["harbour"]
    if statement is None:
        assert "requiredStatement" not in harbour
    else:
        assert harbour["requiredStatement"] == {"label": {"en": ["Attribution"]}, "value": {"none": [statement]}}
    assert "Photographer" not in json.dumps(harbour.get("requiredStatement", {}))


@pytest.mark.parametrize("field", ["accession_number", "accession", "Accession Number"])
def test_the_accession_number_is_in_the_canvas_metadata(colourised_output, tmp_path, field):
    from diffcolor.archive.iiif_publish import publish_iiif

    output = _copy(colourised_output, tmp_path)
    _set_catalogue(output, "harbour", {"title": "The harbour", field: "1921.44.7"})
    harbour = _canvases(publish_iiif(str(output), "https://x.org/c", unreviewed=True).manifest)["harbour"]
    assert [e["value"] for e in harbour["metadata"] if e["label"]["en"] == ["Accession number"]] == [
        {"none": ["1921.44.7"]}]


def test_an_image_size_is_read_from_the_header_as_shown(tmp_path):
    from diffcolor.archive.iiif_publish import image_size

    exif = Image.Exif()
    exif[0x0112] = 6  # stored 60x20, shown turned by a quarter: 20x60
    Image.new("RGB", (60, 20)).save(tmp_path / "turned.jpg", exif=exif)
    Image.new("RGB", (60, 20)).save(tmp_path / "plain.tif")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    assert image_size(str(tmp_path / "turned.jpg")) == (20, 60)
    assert image_size(str(tmp_path / "plain.tif")) == (60, 20)
    assert image_size(str(tmp_path / "broken.jpg")) is None and image_size(str(tmp_path / "missing.png")) is None
