"""Manifests: the schema, validation naming every bad row, streaming reads, and the three builders."""

from __future__ import annotations

import datetime
import json
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffcolor.archive import storage
from diffcolor.archive.builders import (
    build_from_csv,
    build_from_folder,
)
from diffcolor.archive.iiif import build_from_iiif
from diffcolor.archive.manifest import (
    MANIFEST_SCHEMA,
    REQUIRED_COLUMNS,
    ManifestError,
    ManifestProblem,
    count_rows,
    read_items,
    resolve_uri,
    validate_manifest,
    write_manifest,
)
from diffcolor.cli import main
from diffcolor.common.ids import UnsafeItemIdError, normalize_item_id, safe_item_id
from diffcolor.common.items import ItemRequest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def write_parquet(path: Path, columns: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return str(path)


@pytest.fixture
def bad_manifest(tmp_path) -> str:
    """Duplicate ids, an empty caption, a wrong column type (seed as text) and the id '../../etc'; the images exist."""
    for name in ("a.tif", "b.tif", "c.tif", "d.tif"):
        (tmp_path / name).write_bytes(b"II*\x00")
    return write_parquet(tmp_path / "bad.parquet", {
        "item_id": ["plate-1", "plate-1", "../../etc", "plate-4"],
        "image_uri": ["a.tif", "b.tif", "c.tif", "d.tif"],
        "caption": ["a horse and cart on a street", "", "a market square", "a church tower"],
        "seed": ["1", "2", "3", "4"],
    })


# ---------------------------------------------------------------------------
# Validation


def test_bad_manifest_is_refused_with_each_problem_and_its_row(bad_manifest):
    problems = validate_manifest(bad_manifest)

    assert problems == [
        ManifestProblem(None, "seed", "has type string; expected an integer type (int64)"),
        ManifestProblem(2, "item_id", "duplicate item_id 'plate-1': row 1 has the same id (letter case ignored)"),
        ManifestProblem(2, "caption", "empty caption"),
        ManifestProblem(3, "item_id", "unsafe item_id '../../etc': contains '/', a path separator"),
    ]
    assert str(problems[2]) == "row 2, column 'caption': empty caption"
    assert str(problems[0]) == "column 'seed': has type string; expected an integer type (int64)"
    # Reading refuses before yielding anything, with the same problems.
    with pytest.raises(ManifestError) as caught:
        read_items(bad_manifest)
    assert caught.value.problems == problems
    assert caught.value.error_class == "bad_manifest"
    assert str(caught.value).startswith(f"manifest '{bad_manifest}' has 4 problems; first: column 'seed'")
    # The error survives a process boundary (flows, workers).
    assert pickle.loads(pickle.dumps(caught.value)).problems == problems


def test_cli_validate_prints_one_line_per_problem_and_exits_1(bad_manifest, capsys):
    assert main(["manifest", "validate", bad_manifest]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[:4] == [
        "column 'seed': has type string; expected an integer type (int64)",
        "row 2, column 'item_id': duplicate item_id 'plate-1': row 1 has the same id (letter case ignored)",
        "row 2, column 'caption': empty caption",
        "row 3, column 'item_id': unsafe item_id '../../etc': contains '/', a path separator",
    ]
    assert "INVALID, 4 problem(s)" in lines[4]


def test_cli_validate_accepts_the_demo_manifest(capsys):
    assert main(["manifest", "validate", str(REPO / "manifests" / "demo.parquet")]) == 0
    assert "OK, 6 items" in capsys.readouterr().out


@pytest.mark.parametrize(
    "raw, expected",
    [("plate-1", "plate-1"), ("  EX.1910.001 ", "EX.1910.001"), ("cafe\u0301_2", "caf\u00e9_2"), ("\u5199\u771f~3", "\u5199\u771f~3")],
)
def test_safe_ids_are_normalised_not_rewritten(raw, expected):
    assert normalize_item_id(raw) == expected


@pytest.mark.parametrize(
    "raw, reason",
    [
        ("../../etc", "contains '/'"),
        ("..", "starts with '.'"),
        (".hidden", "starts with '.'"),
        ("a\\b", "contains '\\\\'"),
        ("a\x00b", "control character U+0000"),
        ("scan 1", "contains ' '"),
        ("a:b", "contains ':'"),
        ("plate.", "ends with '.'"),
        ("CON.tif", "reserved device name"),
        ("x" * 201, "201 bytes"),
        ("   ", "is empty"),
    ],
)
def test_unsafe_ids_are_refused_with_the_reason(raw, reason):
    with pytest.raises(UnsafeItemIdError, match="unsafe item_id") as caught:
        normalize_item_id(raw)
    assert reason in str(caught.value)


def test_builders_derive_safe_ids_from_file_names():
    assert safe_item_id("Scan 0001 (recto)") == "Scan-0001-recto"
    assert safe_item_id("../../etc") == "etc"
    assert safe_item_id("...") == "item"
    assert safe_item_id("nul") == "nul_"
    assert len(safe_item_id("\u00e9" * 300).encode()) <= 200


def test_wrong_types_and_bad_values_are_named(tmp_path):
    uri = write_parquet(tmp_path / "m.parquet", {
        "item_id": ["a", "A", "b", None],
        "caption": pa.array([1, 2, 3, 4], pa.int64()),
        "target_prompts": pa.array([1.0, 2.0, 3.0, 4.0]),
        "scan": pa.array([b"\x00", b"\x01", b"\x02", b"\x03"], pa.binary()),
    })
    problems = [str(problem) for problem in validate_manifest(uri)]
    assert problems == [
        "column 'image_uri': required column missing (columns found: item_id, caption, target_prompts, scan)",
        "column 'caption': has type int64; expected string",
        "column 'target_prompts': has type double; expected list<string> (or string: one prompt per row)",
        "column 'scan': catalogue column has type binary; catalogue fields must be text, numbers, dates or lists",
        "row 2, column 'item_id': duplicate item_id 'A': row 1 has the same id (letter case ignored)",
        "row 4, column 'item_id': empty item_id",
    ]


def test_prompt_values_are_checked_against_the_caption(tmp_path):
    color_maps = pa.array([[("dog", "brown")], [("cat", "")], [("unicorn", "pink")], None],
                          pa.map_(pa.string(), pa.string()))
    uri = write_parquet(tmp_path / "m.parquet", {
        "item_id": ["a", "b", "c", "d"],
        "image_uri": ["a.png", " ", "c.png", "d.png"],
        "caption": ["a dog on a bench", "a cat on a wall", "a horse in a field", "the of and"],
        "target_prompts": [["a brown dog on a bench"], [" "], None, []],
        "color_map": color_maps,
        "seed": pa.array([0, -1, None, 5], pa.int32()),
        "ground_truth_uri": [None, "", None, None],
    })
    problems = [str(problem) for problem in validate_manifest(uri)]
    assert problems[0] == "row 2, column 'image_uri': empty image_uri"
    assert problems[1] == "row 2, column 'target_prompts': target prompt 1 is empty"
    assert problems[2] == "row 2, column 'color_map': empty colour for 'cat' in color_map"
    assert problems[3].startswith("row 2, column 'seed': seed -1 is out of range")
    assert problems[4] == "row 2, column 'ground_truth_uri': empty ground_truth_uri; use null when there is none"
    assert problems[5].startswith("row 3, column 'color_map': colour map key 'unicorn' is not a content word of the caption")
    assert problems[6].startswith("row 4, column 'caption': caption 'the of and' has no content word")
    assert len(problems) == 7


def test_problem_list_is_capped(tmp_path):
    uri = write_parquet(tmp_path / "m.parquet", {
        "item_id": [f"i{n}" for n in range(1200)], "image_uri": ["x.png"] * 1200, "caption": [""] * 1200,
    })
    problems = validate_manifest(uri)
    assert len(problems) == 1001
    assert problems[999] == ManifestProblem(1000, "caption", "empty caption")
    assert str(problems[-1]) == "... and 200 more problems"


def test_a_large_manifest_is_streamed_and_a_late_duplicate_named(tmp_path):
    rows = 50_000
    ids = [f"acc-{n:06d}" for n in range(rows)]
    ids[49_990] = ids[16]  # row 49,991 repeats row 17
    uri = write_parquet(tmp_path / "big.parquet", {
        "item_id": ids,
        "image_uri": [f"s3://archive/scans/{n}.tif" for n in range(rows)],
        "caption": ["a street with a horse and cart"] * rows,
        "creator": ["unknown"] * rows,
    })
    assert count_rows(uri) == rows
    assert validate_manifest(uri, batch_size=4096) == [
        ManifestProblem(49_991, "item_id", "duplicate item_id 'acc-000016': row 17 has the same id (letter case ignored)")
    ]


# ---------------------------------------------------------------------------
# Reading


def test_valid_manifest_reads_as_item_requests_with_catalogue_fields(tmp_path):
    uri = write_parquet(tmp_path / "col" / "m.parquet", {
        "item_id": [" plate-1 ", "plate-2"],
        "image_uri": ["scans/p1.tif", "s3://archive/p2.tif"],
        "caption": ["a horse and cart on a street ", "a church tower"],
        "target_prompts": [["a brown horse and a red cart on a street"], None],
        "color_map": ['{"horse": "brown"}', None],  # JSON text is accepted for color_map
        "seed": pa.array([7, None], pa.int16()),
        "collection": ["glass plates", None],
        "ground_truth_uri": ["truth/p1.jpg", None],
        "accession_number": ["EX.1", None],
        "year": pa.array([1910, 1912], pa.int32()),
        "captured": [datetime.date(1910, 5, 1), None],
    })
    requests = list(read_items(uri, batch_size=1, force=True))
    folder = str(tmp_path / "col")
    assert requests == [
        ItemRequest(
            item_id="plate-1", source_uri=f"{folder}/scans/p1.tif", caption="a horse and cart on a street",
            targets=("a brown horse and a red cart on a street",), color_map={"horse": "brown"}, seed=7,
            catalogue={"accession_number": "EX.1", "year": "1910", "captured": "1910-05-01",
                       "collection": "glass plates", "ground_truth_uri": f"{folder}/truth/p1.jpg"},
            force=True,
        ),
        ItemRequest(item_id="plate-2", source_uri="s3://archive/p2.tif", caption="a church tower", seed=0,
                    catalogue={"year": "1912"}, force=True),
    ]
    assert [r.item_id for r in read_items(uri, items={"PLATE-2"})] == ["plate-2"]
    with pytest.raises(ManifestError, match="requested item 'plate-9' is not in the manifest"):
        read_items(uri, items={"plate-2", "plate-9"})


def test_relative_image_uris_resolve_against_the_manifest_folder(tmp_path, monkeypatch):
    uri = write_parquet(tmp_path / "a" / "b" / "m.parquet", {
        "item_id": ["one", "two", "three", "four"],
        "image_uri": ["img/1.png", "../2.png", str(tmp_path / "3.png"), "file:///data/4.png"],
        "caption": ["a dog", "a cat", "a cow", "a hen"],
    })
    monkeypatch.chdir(tmp_path / "a")
    relative_manifest = "b/m.parquet"  # given relative to the working directory
    sources = [request.source_uri for request in read_items(relative_manifest)]
    assert sources == [str(tmp_path / "a" / "b" / "img" / "1.png"), str(tmp_path / "a" / "2.png"),
                       str(tmp_path / "3.png"), "file:///data/4.png"]
    assert resolve_uri("../scans/a.tif", "s3://archive/manifests/m.parquet") == "s3://archive/scans/a.tif"
    assert resolve_uri("https://x.org/a.jpg", "s3://archive/m.parquet") == "https://x.org/a.jpg"


def test_manifests_on_any_fsspec_storage(tmp_path):
    table = build_from_csv(str(REPO / "manifests" / "example.csv"))
    uri = "memory://manifests-test/run-1/manifest.parquet"
    write_manifest(table, uri)
    assert validate_manifest(uri) == []
    assert count_rows(uri) == 3
    # A relative image URI in a memory:// manifest stays on memory://.
    rows = table.to_pylist()
    rows[0]["image_uri"] = "scans/one.png"
    storage.write_bytes("memory://manifests-test/run-2/m.parquet", _parquet_bytes(pa.Table.from_pylist(rows, table.schema)))
    first = next(read_items("memory://manifests-test/run-2/m.parquet"))
    assert first.source_uri == "memory://manifests-test/run-2/scans/one.png"


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def test_write_manifest_refuses_an_invalid_table(tmp_path):
    table = pa.table({"item_id": ["../x"], "image_uri": ["a.png"], "caption": ["a dog"]})
    with pytest.raises(ManifestError, match="unsafe item_id"):
        write_manifest(table, str(tmp_path / "m.parquet"))
    assert not (tmp_path / "m.parquet").exists()


def test_demo_manifest_validates_and_its_images_exist():
    uri = str(REPO / "manifests" / "demo.parquet")
    assert validate_manifest(uri) == []
    assert pq.read_schema(uri).names[:len(MANIFEST_SCHEMA)] == MANIFEST_SCHEMA.names
    requests = list(read_items(uri))
    assert [r.item_id for r in requests] == ["camera", "astronaut", "chelsea", "coffee", "rocket", "coins"]
    total = 0
    for request in requests:
        path = Path(request.source_uri)
        assert path.is_file() and path.parent == REPO / "manifests" / "demo"
        with Image.open(path) as image:
            assert image.format == "PNG" and image.mode == "L" and max(image.size) <= 512
        total += path.stat().st_size
        assert request.catalogue["collection"] == "demo" and request.catalogue["rights"]
    assert total < 1_500_000
    assert sum(bool(r.color_map) for r in requests) >= 3 and sum(bool(r.targets) for r in requests) >= 1


# ---------------------------------------------------------------------------
# Builders


@pytest.fixture
def scans(tmp_path) -> Path:
    folder = tmp_path / "scans"
    folder.mkdir()
    gray = np.full((8, 8), 128, np.uint8)
    for name in ("b.png", "Scan 2.TIF", "a.jpg"):
        Image.fromarray(gray).save(folder / name, format="TIFF" if name.endswith("TIF") else None)
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_folder_builder_with_a_captions_csv(scans, tmp_path):
    captions = tmp_path / "captions.csv"
    captions.write_text(
        "filename,caption,creator,color_map\n"
        'a.jpg,a horse and cart on a street,Unknown,"{""horse"": ""brown""}"\n'
        "b.png,a church tower,,\n"
        "Scan 2.TIF,a market square with stalls,J. Smith,\n",
        encoding="utf-8",
    )
    table = build_from_folder(str(scans), captions=str(captions))
    rows = table.to_pylist()
    assert [(r["item_id"], r["image_uri"], r["caption"], r["creator"]) for r in rows] == [
        ("Scan-2", f"{scans}/Scan 2.TIF", "a market square with stalls", "J. Smith"),
        ("a", f"{scans}/a.jpg", "a horse and cart on a street", "Unknown"),
        ("b", f"{scans}/b.png", "a church tower", None),
    ]
    assert rows[1]["color_map"] == [("horse", "brown")]
    assert table.schema.names[:len(MANIFEST_SCHEMA)] == MANIFEST_SCHEMA.names


def test_folder_builder_with_captions_json(scans, tmp_path):
    as_object = tmp_path / "captions.json"
    as_object.write_text(json.dumps({"a.jpg": "a horse", "b.png": "a tower", "Scan 2.TIF": "a square"}))
    assert build_from_folder(str(scans), captions=str(as_object)).column("caption").to_pylist() == ["a square", "a horse", "a tower"]

    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps([
        {"item_id": "a", "caption": "a horse", "seed": 3, "target_prompts": ["a brown horse"]},
        {"item_id": "b", "caption": "a tower", "accession": 17},
        {"item_id": "Scan-2", "caption": "a square"},
    ]))
    rows = build_from_folder(str(scans), captions=str(as_list)).to_pylist()
    assert [(r["item_id"], r["seed"], r["target_prompts"], r["accession"]) for r in rows] == [
        ("Scan-2", None, None, None), ("a", 3, ["a brown horse"], None), ("b", None, None, "17"),
    ]


def test_folder_builder_lists_images_without_a_caption(scans, tmp_path):
    captions = tmp_path / "captions.csv"
    captions.write_text("filename,caption\na.jpg,a horse\nmissing.tif,a cart\nb.png,\n", encoding="utf-8")
    with pytest.raises(ManifestError) as caught:
        build_from_folder(str(scans), captions=str(captions))
    assert [str(problem) for problem in caught.value.problems] == [
        "column 'caption': image 'Scan 2.TIF' has no caption in '" + str(captions) + "'",
        "row 2, column 'filename': filename 'missing.tif' names no image in '" + str(scans) + "'",
        "row 3, column 'caption': empty caption (image 'b.png')",
    ]


def test_csv_builder_on_the_example_export():
    table = build_from_csv(str(REPO / "manifests" / "example.csv"))
    rows = table.to_pylist()
    demo = REPO / "manifests" / "demo"
    assert [(r["item_id"], r["image_uri"], r["seed"], r["accession_number"]) for r in rows] == [
        ("DEMO-0001", f"{demo}/camera.png", 0, "2024.1.1"),
        ("DEMO-0002", f"{demo}/coffee.png", 42, "2024.1.2"),
        ("DEMO-0003", f"{demo}/rocket.png", None, "2024.1.3"),
    ]
    assert rows[0]["color_map"] == [("coat", "black"), ("sky", "blue")]
    assert len(rows[1]["target_prompts"]) == 2 and rows[2]["date"] == "2015-02-11"


def test_csv_builder_names_bad_rows_and_takes_header_aliases(tmp_path):
    for name in ("p1.tif", "p3.tif", "p4.tif"):  # the images exist: only the cells are wrong
        (tmp_path / name).write_bytes(b"II*\x00")
    export = tmp_path / "export.csv"
    export.write_text(
        "\ufeffID,Image,Description,Seed,Color Map,Creator\n"
        "p1,p1.tif,a horse and cart,x,,A\n"
        "\n"
        "../../etc,p3.tif,a street,1,{bad,B\n"
        "p4,p4.tif,   ,2,,C\n",
        encoding="utf-8",
    )
    with pytest.raises(ManifestError) as caught:
        build_from_csv(str(export))
    assert [str(problem) for problem in caught.value.problems] == [
        "row 1, column 'seed': seed must be an integer, got 'x'",
        "row 3, column 'color_map': color_map is not valid JSON (Expecting property name enclosed in double quotes at character 1): '{bad'",
        "row 3, column 'item_id': unsafe item_id '../../etc': contains '/', a path separator",
        "row 4, column 'caption': empty caption",
    ]


def test_iiif_builder_yields_one_row_per_painting_image():
    table = build_from_iiif(str(FIXTURES / "iiif-p3.json"))
    base = "https://archive.example.org/iiif"
    common = {
        "target_prompts": None, "color_map": None, "seed": None, "collection": None, "ground_truth_uri": None,
        "title": "Street scenes, 1910", "attribution": "Provided by the Example Archive", "iiif_note": None,
        "iiif_manifest": f"{base}/street-scenes/manifest.json", "creator": "Unknown photographer", "date": "1910",
    }
    pd_mark = "http://creativecommons.org/publicdomain/mark/1.0/"
    town = "Street scenes, 1910: Glass plate negatives of street scenes in a market town"  # manifest label: summary
    assert table.to_pylist() == [
        {**common, "item_id": "p1", "image_uri": f"{base}/image/plate-001/full/max/0/default.jpg",
         "caption": "Street scenes, 1910: A horse-drawn carriage on a cobbled street",  # canvas summary, English, no HTML
         "canvas_label": "Plate 1", "rights": "http://rightsstatements.org/vocab/NoC-US/1.0/",
         "iiif_canvas": f"{base}/street-scenes/canvas/p1", "accession_number": "EX.1910.001"},
        {**common, "item_id": "p2", "image_uri": f"{base}/image/plate-002-print/full/max/0/default.jpg",  # Choice: first
         "caption": "Street scenes, 1910: The harbour with fishing boats",  # no summary: the canvas label
         "canvas_label": "The harbour with fishing boats", "rights": pd_mark,
         "iiif_canvas": f"{base}/street-scenes/canvas/p2", "accession_number": None,
         "iiif_note": f"Choice of 2: took the first ({base}/image/plate-002-print/full/max/0/default.jpg); "
                      f"left {base}/image/plate-002-negative/full/max/0/default.jpg"},
        {**common, "item_id": "p3-1", "image_uri": f"{base}/image/plate-003a/full/max/0/default.jpg",
         "caption": town, "canvas_label": None, "rights": pd_mark,  # neither: the manifest's summary
         "iiif_canvas": f"{base}/street-scenes/canvas/p3", "accession_number": None},
        {**common, "item_id": "p3-2", "image_uri": f"{base}/image/plate-003b/full/max/0/default.jpg",
         "caption": town, "canvas_label": None, "rights": pd_mark,
         "iiif_canvas": f"{base}/street-scenes/canvas/p3", "accession_number": None},
    ]


def test_iiif_builder_refuses_presentation_2(tmp_path):
    old = tmp_path / "p2.json"
    old.write_text(json.dumps({"@context": "http://iiif.io/api/presentation/2/context.json", "@type": "sc:Manifest",
                               "sequences": []}))
    with pytest.raises(ManifestError, match="Presentation 2"):
        build_from_iiif(str(old))


def test_cli_build_then_validate(tmp_path, capsys):
    out = str(tmp_path / "iiif.parquet")
    assert main(["manifest", "build", "--from-iiif", str(REPO / "manifests" / "example-iiif.json"), "-o", out]) == 0
    assert capsys.readouterr().out.strip() == f"wrote 2 items to {out}"
    assert main(["manifest", "validate", out]) == 0
    assert set(REQUIRED_COLUMNS) <= set(pq.read_schema(out).names)


# ---------------------------------------------------------------------------
# Hostile text and credentials in cells: named with their row and column.


def test_validate_names_control_and_bidi_characters_in_every_text_column(tmp_path, capsys):
    for name in ("a.png", "b.png"):  # the images exist: only the text is wrong
        (tmp_path / name).write_bytes(b"\x89PNG")
    rows = [
        {"item_id": "a", "image_uri": "a.png", "caption": "a dog\x1b[2J on a bench", "creator": "Jane",
         "target_prompts": ["a red dog on a bench"]},
        {"item_id": "b", "image_uri": "b.png", "caption": "a dog on a bench", "creator": "Ja\u202ene",
         "target_prompts": ["a red dog", "a \x07blue dog"]},
        {"item_id": "c", "image_uri": "c\x00.png", "caption": "a dog on a bench\n\tsecond line", "creator": "\u2066x",
         "target_prompts": None},
    ]
    path = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert main(["manifest", "validate", str(path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    named = {line.split(":")[0] for line in lines[:-1]}
    assert named == {"row 1, column 'caption'", "row 2, column 'creator'", "row 2, column 'target_prompts'",
                     "row 3, column 'image_uri'", "row 3, column 'creator'"}
    assert any("U+001B" in line for line in lines) and any("U+202E" in line for line in lines)
    assert all("\x1b" not in line and "\u202e" not in line for line in lines)  # shown escaped, never raw
    assert "INVALID, 5 problem(s)" in lines[-1]


def test_a_catalogue_csv_with_control_characters_is_refused_naming_the_row(tmp_path):
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"\x89PNG")
    source = tmp_path / "catalogue.csv"
    source.write_text("item_id,image_uri,caption,creator\na,a.png,a dog on a bench,Jane\n"
                      "b,b.png,a dog on a bench,\u202eenaJ\n", encoding="utf-8")
    with pytest.raises(ManifestError) as caught:
        build_from_csv(str(source))
    assert [(p.row, p.column) for p in caught.value.problems] == [(2, "creator")]


@pytest.mark.parametrize("secret", ["plain-secret-1234", "wJalr/XUtnFEMI+K7MDENG=bPxRfi", "p@ss:w/rd", "p%2Fss%40wd"])
def test_credentials_in_an_image_or_ground_truth_uri_are_a_problem_that_does_not_show_them(secret, tmp_path, capsys):
    rows = [{"item_id": "a", "image_uri": f"s3://AKIAEXAMPLE:{secret}@bucket/a.png", "caption": "a dog on a bench",
             "ground_truth_uri": f"https://curator:{secret}@images.example/a.png"},
            {"item_id": "b", "image_uri": "s3://bucket/b@2x.png", "caption": "a dog on a bench",
             "ground_truth_uri": "https://images.example/b.png?size=2"}]
    path = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert main(["manifest", "validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert [line.split(":")[0] for line in out.splitlines()[:-1]] == ["row 1, column 'image_uri'",
                                                                      "row 1, column 'ground_truth_uri'"]
    assert "carries credentials" in out and "AWS_ACCESS_KEY_ID" in out
    for fragment in {secret, *secret.replace("%2F", "/").replace("%40", "@").replace("@", "/").replace(":", "/").split("/")}:
        assert len(fragment) < 3 or fragment not in out, fragment


def test_a_captions_json_nested_too_deep_is_one_problem(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(b"")
    captions = tmp_path / "captions.json"
    captions.write_text("[" * 100_000 + "]" * 100_000)
    code = main(["manifest", "build", "--from-folder", str(tmp_path), "--captions", str(captions),
                 "-o", str(tmp_path / "m.parquet")])
    printed = capsys.readouterr()
    assert code == 1 and "nests too deep" in printed.out and "Traceback" not in printed.err


def test_problem_and_error_lines_show_control_characters_escaped(tmp_path, capsys):
    source = tmp_path / "catalogue.csv"
    source.write_text("item_id,image_uri,\x1b]0;owned\x07title\u202e\na,a.png,x\n", encoding="utf-8")
    assert main(["manifest", "build", "--from-csv", str(source), "-o", str(tmp_path / "m.parquet")]) == 1
    assert main(["manifest", "validate", str(tmp_path / "no\x1b[2Jsuch\nfile.parquet")]) == 2
    printed = capsys.readouterr()
    assert "column 'caption': required column missing" in printed.out and "\\x1b]0;owned\\x07title\\u202e" in printed.out
    assert "no\\x1b[2Jsuch" in printed.err and len(printed.err.splitlines()) == 1
    for text in (printed.out, printed.err):
        assert not any(char in text for char in "\x1b\x07\u202e")


def test_a_repeated_caption_is_checked_on_every_row_it_appears_in():
    from diffcolor.archive.manifest import validate_table

    captions = ["the of and", "a dog", "the of and", "a dog", "the of and"]  # rewrites are remembered per text
    table = pa.table({"item_id": [f"i{n}" for n in range(5)], "image_uri": ["a.png"] * 5, "caption": captions,
                      "color_map": pa.array([None, [("dog", "brown")], None, [("cat", "red")], None],
                                            pa.map_(pa.string(), pa.string()))})
    problems = [str(problem) for problem in validate_table(table)]
    assert [p.split(":")[0] for p in problems] == ["row 1, column 'caption'", "row 3, column 'caption'",
                                                   "row 4, column 'color_map'", "row 5, column 'caption'"]
