"""Manifest columns and sources: every spelling of a known column read as that column, two spellings refused,
near-miss names warned about (refused with --strict), and the sources checked by `manifest build` and `validate`."""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from s3server import s3_bucket, s3_client, s3_endpoint  # noqa: F401  (real S3 API on loopback)

from diffcolor.archive.builders import build_from_csv, build_from_folder
from diffcolor.archive.iiif import read_iiif
from diffcolor.archive.manifest import ManifestChecks, ManifestError, read_items, validate_manifest
from diffcolor.archive.outside import ALLOW_HOSTS_ENV
from diffcolor.cli import main

CAPTION = "a dog on a bench in a park"


def _images(folder, *names: str) -> None:
    for name in names:
        (folder / name).write_bytes(b"\x89PNG\r\n\x1a\n")  # a regular file is all the check asks for


def _command(capsys, *args: str) -> tuple[int, str, str]:
    """``diffcolor ARGS`` in this process: (exit status, stdout, stderr)."""
    code = main(list(args))
    printed = capsys.readouterr()
    return code, printed.out, printed.err


# ---------------------------------------------------------------------------
# Spellings


def test_british_and_record_spellings_in_parquet_are_read_as_the_known_columns(tmp_path, capsys):
    _images(tmp_path, "a.png", "b.png")
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({
        "Item ID": ["a", "b"], "source_uri": ["a.png", "b.png"], "caption": [CAPTION, CAPTION],
        "colour_map": ['{"dog": "brown"}', None], "target_prompt": [None, "a black dog on a green bench in a park"],
        "creator": ["Jane", "John"]}), path)

    code, out, err = _command(capsys, "manifest", "validate", str(path))
    assert code == 0 and "OK, 2 items" in out and err == ""
    first, second = read_items(str(path))
    assert (first.item_id, first.color_map, first.targets) == ("a", {"dog": "brown"}, ())
    assert second.targets == ("a black dog on a green bench in a park",) and second.color_map == {}
    assert first.source_uri == str(tmp_path / "a.png")
    assert first.catalogue == {"creator": "Jane"}  # neither spelling left as a plain catalogue field

    # Read, so checked: a colour-map word that is not in the caption is a problem, named as the file spells it.
    pq.write_table(pa.table({"item_id": ["a"], "image_uri": ["a.png"], "caption": [CAPTION],
                             "Colour Map": ['{"horse": "brown"}']}), path)
    code, out, _ = _command(capsys, "manifest", "validate", str(path))
    assert code == 1 and out.startswith("row 1, column 'Colour Map': ") and "'horse'" in out


@pytest.mark.parametrize(("first", "second"), [("color_map", "colour_map"), ("caption", "Caption"),
                                               ("target_prompts", "target_prompt"), ("image_uri", "source_uri"),
                                               ("seed", "Seed")])
def test_two_spellings_of_one_column_are_refused_naming_both(tmp_path, capsys, first, second):
    _images(tmp_path, "a.png")
    values = {"color_map": '{"dog": "brown"}', "caption": CAPTION, "target_prompts": "a brown dog on a bench",
              "image_uri": "a.png", "seed": 7}
    columns = {"item_id": ["a"], "image_uri": ["a.png"], "caption": [CAPTION]}
    canonical = first
    columns[first] = columns[second] = [values[canonical]]
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table(columns), path)
    expected = f"columns '{first}' and '{second}' are 2 spellings of one column, '{canonical}'; keep one"

    code, out, _ = _command(capsys, "manifest", "validate", str(path))
    assert code == 1 and expected in out.splitlines()
    with pytest.raises(ManifestError):  # a run refuses it too
        read_items(str(path))

    # The same in a CSV export: refused, nothing written (before, the later column silently won).
    export = tmp_path / "export.csv"
    header = ["item_id", "image_uri", "caption"] + [name for name in (first, second) if name not in
                                                    ("item_id", "image_uri", "caption")]
    header += [second] if second not in header else []
    cells = {"item_id": "a", **values}
    export.write_text(",".join(header) + "\n" + ",".join(json.dumps(cells[canonical]) if name in (first, second)
                                                         else json.dumps(cells[name]) for name in header) + "\n")
    code, out, _ = _command(capsys, "manifest", "build", "--from-csv", str(export), "-o", str(tmp_path / "o.parquet"))
    assert code == 1 and expected in out.splitlines() and not (tmp_path / "o.parquet").exists()


def test_a_csv_export_and_a_captions_file_take_every_spelling(tmp_path, capsys):
    _images(tmp_path, "a.png", "b.png")
    export = tmp_path / "export.csv"
    export.write_text('item_id,image_uri,caption,Colour Map,Target Prompt,Colour Words\n'
                      f'a,a.png,{CAPTION},"{{""dog"": ""brown""}}",,\n'
                      f'b,b.png,{CAPTION},,a red dog on a blue bench in a park,\n')
    code, out, err = _command(capsys, "manifest", "build", "--from-csv", str(export), "-o", str(tmp_path / "m.parquet"))
    assert code == 1 and "'Colour Map' and 'Colour Words' are 2 spellings of one column, 'color_map'" in out

    export.write_text('item_id,image_uri,caption,Colour Map,Target Prompt\n'
                      f'a,a.png,{CAPTION},"{{""dog"": ""brown""}}",\n'
                      f'b,b.png,{CAPTION},,a red dog on a blue bench in a park\n')
    code, out, err = _command(capsys, "manifest", "build", "--from-csv", str(export), "-o", str(tmp_path / "m.parquet"))
    assert code == 0, out
    table = pq.read_table(tmp_path / "m.parquet")
    assert "Colour Map" not in table.column_names and "Target Prompt" not in table.column_names
    assert table.column("color_map").to_pylist() == [[("dog", "brown")], None]
    assert table.column("target_prompts").to_pylist() == [None, ["a red dog on a blue bench in a park"]]

    # A folder's captions as a JSON list: the same spellings.
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps([{"filename": "a.png", "caption": CAPTION, "colour_map": {"dog": "brown"}},
                                    {"filename": "b.png", "caption": CAPTION, "target_prompt": "a red dog"}]))
    table = build_from_folder(str(tmp_path), captions=str(captions))
    assert table.column("color_map").to_pylist() == [[("dog", "brown")], None]
    assert table.column("target_prompts").to_pylist() == [None, ["a red dog"]]
    assert "colour_map" not in table.column_names and "target_prompt" not in table.column_names


def test_a_iiif_metadata_label_never_sets_a_known_column_under_another_spelling(tmp_path):
    manifest = {"@context": "http://iiif.io/api/presentation/3/context.json", "id": "https://iiif.example.org/m",
                "type": "Manifest", "label": {"en": ["Harbour views"]},
                "metadata": [{"label": {"en": ["Colour map"]}, "value": {"none": ["not JSON at all"]}},
                             {"label": {"en": ["Target prompt"]}, "value": {"none": ["a neon harbour"]}}],
                "items": [{"id": "https://iiif.example.org/canvas/1", "type": "Canvas",
                           "label": {"en": ["Boats in the harbour"]},
                           "items": [{"type": "AnnotationPage", "items": [
                               {"type": "Annotation", "motivation": "painting",
                                "body": {"id": "https://iiif.example.org/img/1.jpg", "type": "Image"}}]}]}]}
    source = tmp_path / "iiif.json"
    source.write_text(json.dumps(manifest))
    table = read_iiif(str(source)).table
    row = table.to_pylist()[0]
    assert row["metadata_colour_map"] == "not JSON at all" and row["metadata_target_prompt"] == "a neon harbour"
    assert row["color_map"] is None and row["target_prompts"] is None
    assert "colour_map" not in table.column_names and "target_prompt" not in table.column_names


# ---------------------------------------------------------------------------
# Near misses


def test_a_name_near_a_known_column_is_a_warning_and_with_strict_a_problem(tmp_path, capsys):
    _images(tmp_path, "a.png")
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"item_id": ["a"], "image_uri": ["a.png"], "caption": [CAPTION],
                             "colormap": ['{"dog": "brown"}'], "target_promt": ["a brown dog"], "Seeds": [1],
                             "creator": ["Jane"], "caption_fr": ["un chien"], "collection_id": ["c-1"]}), path)
    code, out, err = _command(capsys, "manifest", "validate", str(path))
    assert code == 0 and "OK, 1 items" in out
    assert err.splitlines() == [
        "warning: column 'colormap': not a known column, so read as a catalogue field; did you mean 'color_map'?",
        "warning: column 'target_promt': not a known column, so read as a catalogue field; did you mean "
        "'target_prompts'?",
        "warning: column 'Seeds': not a known column, so read as a catalogue field; did you mean 'seed'?",
    ]  # creator, caption_fr and collection_id are museums' own fields: nothing said

    code, out, err = _command(capsys, "manifest", "validate", "--strict", str(path))
    assert code == 1 and err == ""
    assert out.splitlines()[:3] == [line.removeprefix("warning: ") for line in [
        "column 'colormap': not a known column, so read as a catalogue field; did you mean 'color_map'?",
        "column 'target_promt': not a known column, so read as a catalogue field; did you mean 'target_prompts'?",
        "column 'Seeds': not a known column, so read as a catalogue field; did you mean 'seed'?"]]
    assert "INVALID, 3 problem(s)" in out.splitlines()[-1]
    assert validate_manifest(str(path)) == []  # a run is not refused for a catalogue field's name


def test_build_warns_about_near_misses_and_with_strict_writes_nothing(tmp_path, capsys):
    _images(tmp_path, "a.png")
    export = tmp_path / "export.csv"
    out = tmp_path / "m.parquet"
    export.write_text(f"item_id,image_uri,captoin\na,a.png,{CAPTION}\n")
    code, printed, err = _command(capsys, "manifest", "build", "--from-csv", str(export), "-o", str(out))
    assert code == 1 and "column 'caption': required column missing" in printed
    assert "warning: column 'captoin': not a known column, so read as a catalogue field; did you mean 'caption'?" in err

    export.write_text(f"item_id,image_uri,caption,Colormap,creator\na,a.png,{CAPTION},x,Jane\n")
    code, printed, err = _command(capsys, "manifest", "build", "--from-csv", str(export), "-o", str(out))
    assert code == 0 and out.exists() and "column 'Colormap'" in err and "did you mean 'color_map'" in err
    assert "creator" not in err
    out.unlink()
    code, printed, err = _command(capsys, "manifest", "build", "--strict", "--from-csv", str(export), "-o", str(out))
    assert code == 1 and printed.startswith("column 'Colormap': not a known column") and not out.exists()


# ---------------------------------------------------------------------------
# Sources


def test_build_and_validate_name_every_missing_or_unreadable_local_source(tmp_path, capsys):
    _images(tmp_path, "here.png", "truth.png")
    (tmp_path / "folder.png").mkdir()
    os.mkfifo(tmp_path / "pipe.png")
    export = tmp_path / "export.csv"
    export.write_text("item_id,image_uri,caption,ground_truth_uri\n"
                      f"p1,gone.png,{CAPTION},\n"
                      "\n"  # a blank line: no item, but counted
                      f"p3,here.png,{CAPTION},truth.png\n"
                      f"p4,folder.png,{CAPTION},\n"
                      f"p5,pipe.png,{CAPTION},no-truth.png\n"
                      f"p6,also-gone.png,{CAPTION},\n")
    out = tmp_path / "m.parquet"
    code, printed, _ = _command(capsys, "manifest", "build", "--from-csv", str(export), "-o", str(out))
    assert code == 1 and not out.exists()
    assert printed.splitlines()[:-1] == [
        f"row 1, column 'image_uri': item 'p1': image '{tmp_path}/gone.png' does not exist",
        f"row 4, column 'image_uri': item 'p4': image '{tmp_path}/folder.png' is a directory, not a regular file",
        f"row 5, column 'image_uri': item 'p5': image '{tmp_path}/pipe.png' is a FIFO, not a regular file",
        f"row 5, column 'ground_truth_uri': item 'p5': ground truth '{tmp_path}/no-truth.png' does not exist",
        f"row 6, column 'image_uri': item 'p6': image '{tmp_path}/also-gone.png' does not exist",
    ]
    assert "5 problem(s)" in printed.splitlines()[-1]

    # The same manifest written anyway (the Python API can skip the check): validate names the same sources,
    # by the manifest's own rows; a run's check does not, since a missing image fails only its item.
    pq.write_table(build_from_csv(str(export), checks=ManifestChecks(sources="none")), out)
    code, printed, _ = _command(capsys, "manifest", "validate", str(out))
    assert code == 1 and [line.split(":")[0] for line in printed.splitlines()[:-1]] == [
        "row 1, column 'image_uri'", "row 3, column 'image_uri'", "row 4, column 'image_uri'",
        "row 4, column 'ground_truth_uri'", "row 5, column 'image_uri'"]
    assert "item 'p6'" in printed.splitlines()[-2]
    assert validate_manifest(str(out)) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_an_unreadable_local_source_is_named(tmp_path, capsys):
    _images(tmp_path, "locked.png")
    (tmp_path / "locked.png").chmod(0)
    export = tmp_path / "export.csv"
    export.write_text(f"item_id,image_uri,caption\np1,locked.png,{CAPTION}\n")
    code, printed, _ = _command(capsys, "manifest", "build", "--from-csv", str(export), "-o", str(tmp_path / "m.parquet"))
    assert code == 1 and "'p1': image" in printed and "cannot be read: permission denied" in printed


def test_s3_sources_are_asked_only_with_check_sources(s3_bucket, s3_endpoint, tmp_path, capsys):  # noqa: F811
    bucket = s3_bucket.removeprefix("s3://")
    s3_client(s3_endpoint).put_object(Bucket=bucket, Key="scans/a.png", Body=b"\x89PNG")
    s3_client(s3_endpoint).put_object(Bucket=bucket, Key="scans/folder/b.png", Body=b"\x89PNG")
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"item_id": ["a", "b", "c"], "caption": [CAPTION] * 3,
                             "image_uri": [f"{s3_bucket}/scans/a.png", f"{s3_bucket}/scans/gone.png",
                                           f"{s3_bucket}/scans/folder"]}), path)
    code, printed, _ = _command(capsys, "manifest", "validate", str(path))
    assert code == 0, printed  # remote stores are not asked unless the operator says so
    code, printed, _ = _command(capsys, "manifest", "validate", "--check-sources", str(path))
    lines = printed.splitlines()
    assert code == 1 and len(lines) == 3, printed
    assert lines[0].startswith("row 2, column 'image_uri': item 'b': image ") and "scans/gone.png' does not exist" in lines[0]
    assert lines[1] == f"row 3, column 'image_uri': item 'c': image '{s3_bucket}/scans/folder' is a folder, not an object"

    # A manifest on S3 with relative sources: resolved against its own folder there.
    s3_client(s3_endpoint).put_object(Bucket=bucket, Key="manifests/m.parquet", Body=_parquet_bytes(
        {"item_id": ["a", "b"], "caption": [CAPTION] * 2, "image_uri": ["../scans/a.png", "../scans/nope.png"]}))
    code, printed, _ = _command(capsys, "manifest", "validate", "--check-sources", f"{s3_bucket}/manifests/m.parquet")
    assert code == 1 and printed.startswith("row 2, column 'image_uri': item 'b': image ") and "scans/nope.png" in printed


def _parquet_bytes(columns: dict) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), sink)
    return sink.getvalue().to_pybytes()


class _Images(BaseHTTPRequestHandler):
    def _answer(self, body: bool) -> None:
        self.server.seen.append((self.command, self.path))
        status = 200 if self.path == "/a.png" else 404
        self.send_response(status)
        self.send_header("Content-Length", "4")
        self.end_headers()
        if body:
            self.wfile.write(b"\x89PNG")

    def do_HEAD(self):  # noqa: N802 (http.server's name)
        self._answer(body=False)

    def do_GET(self):  # noqa: N802
        self._answer(body=True)

    def log_message(self, *args):
        pass


@pytest.fixture
def image_server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    httpd.seen = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}", httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_http_sources_are_checked_with_a_head_through_the_ssrf_guard(image_server, tmp_path, capsys, monkeypatch):
    base, httpd = image_server
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"item_id": ["a", "b"], "caption": [CAPTION] * 2,
                             "image_uri": [f"{base}/a.png", f"{base}/gone.png"]}), path)
    monkeypatch.setenv(ALLOW_HOSTS_ENV, "")  # restored after the test: --allow-host below adds to it
    assert _command(capsys, "manifest", "validate", str(path))[0] == 0 and httpd.seen == []

    # Loopback is this host's own network: refused, and never reached, unless the operator allows it.
    code, printed, _ = _command(capsys, "manifest", "validate", "--check-sources", str(path))
    lines = printed.splitlines()
    assert code == 1 and len(lines) == 3 and httpd.seen == []
    assert all("loopback" in line and "--allow-host 127.0.0.1" in line for line in lines[:2])

    code, printed, _ = _command(capsys, "manifest", "validate", "--check-sources", "--allow-host", "127.0.0.1", str(path))
    assert code == 1 and printed.splitlines()[:-1] == [
        f"row 2, column 'image_uri': item 'b': image '{base}/gone.png' does not exist (HTTP 404)"]
    assert sorted(httpd.seen) == [("HEAD", "/a.png"), ("HEAD", "/gone.png")]  # a HEAD each, no image read
