"""The archive's promises in the configuration the product is for: a real S3 API, several processes, hostile input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import gray_scene
from PIL import Image
from s3server import FAKE_ACCESS_KEY, s3_client
from test_flows import CAPTION

from diffcolor.archive import storage
from diffcolor.archive.layout import OutputLayout
from diffcolor.archive.results import read_results
from diffcolor.common.ids import UnsafeItemIdError

REPO = Path(__file__).resolve().parents[1]


def write_manifest(path: Path, rows: list[dict]) -> Path:
    """A Parquet file of ``rows`` with the columns they have (catalogue fields included)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _diffcolor(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The command in a fresh process, against the session's Prefect server."""
    from prefect.settings import PREFECT_API_URL

    environment = dict(env if env is not None else os.environ, PREFECT_API_URL=PREFECT_API_URL.value())
    return subprocess.run([sys.executable, "-m", "diffcolor", *args], capture_output=True, text=True, env=environment,
                          timeout=600, cwd=REPO)


def _png(seed: int) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.round(gray_scene(48, 64, seed=seed) * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _bucket_objects(endpoint: str, bucket: str) -> dict[str, bytes]:
    client = s3_client(endpoint)
    name = bucket.removeprefix("s3://")
    keys = [entry["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=name)
            for entry in page.get("Contents", [])]
    return {key: client.get_object(Bucket=name, Key=key)["Body"].read() for key in keys}


def _prefect_database_bytes() -> bytes:
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    path = Path(PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split(":///", 1)[1])
    return b"".join(file.read_bytes() for file in path.parent.glob(path.name + "*"))


def _canary(core: str) -> str:
    """A secret as real ones are: AWS secret keys hold '/' and '+', passwords '@', ':', '=' and anything else."""
    return f"{core}/a+b=c@d:e/f"


def test_a_canary_secret_planted_everywhere_a_user_can_put_one_appears_nowhere(prefect_server, s3_bucket, s3_endpoint,
                                                                               tmp_path, capsys):
    from urllib.parse import quote

    core = f"CANARY{uuid.uuid4().hex}"
    canary = _canary(core)
    for index in range(2):
        storage.write_bytes(f"{s3_bucket}/incoming/p{index}.png", _png(index))
    # On the command line: the manifest URI with the secret as written, the output URI with it percent-encoded
    # (the same credentials). In the manifest: a catalogue field with a URL that has the secret as its password,
    # another as a presigned URL's signature and token, and one image whose source is missing (its error names it).
    catalogue = core.lower().replace("canary", "cat")
    rows = [{"item_id": f"p{index}", "image_uri": f"{s3_bucket}/incoming/p{index}.png", "caption": CAPTION,
             "seed": index, "source_link": f"https://archivist:{_canary(catalogue)}@catalogue.example/item/{index}",
             "presigned": f"https://b.s3.example/k?X-Amz-Credential={core}cred&X-Amz-Signature={core}sig"
                          f"&token={quote(canary, safe='')}"}
            for index in range(2)]
    rows.append({"item_id": "gone", "image_uri": f"{s3_bucket}/incoming/gone.png", "caption": CAPTION, "seed": 9,
                 "source_link": "-", "presigned": "-"})
    local_manifest = write_manifest(tmp_path / "manifest.parquet", rows)
    storage.write_bytes(f"{s3_bucket}/incoming/manifest.parquet", local_manifest.read_bytes())
    environment = {name: value for name, value in os.environ.items()
                   if name not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}  # the URIs carry them
    with_secret = s3_bucket.replace("s3://", f"s3://{FAKE_ACCESS_KEY}:{canary}@")
    with_encoded_secret = s3_bucket.replace("s3://", f"s3://{FAKE_ACCESS_KEY}:{quote(canary, safe='')}@")

    done = _diffcolor("run", f"{with_secret}/incoming/manifest.parquet", "--out", f"{with_encoded_secret}/archive",
                      "--model", "tiny", "--preset", "smoke", env=environment)

    assert done.returncode == 1, done.stderr[-3000:]  # one item's source is missing
    objects = _bucket_objects(s3_endpoint, s3_bucket)
    assert any(key.endswith("p0/versions/v0001/master.tif") for key in objects)
    gone = json.loads(objects["archive/items/gone/result.json"])
    assert gone["error_class"] == "input_unavailable" and f"{s3_bucket}/incoming/gone.png" in gone["error_message"]
    # A manifest whose image URIs carry the credentials is refused before anything runs, without showing them.
    refused_manifest = write_manifest(tmp_path / "refused.parquet", [
        {"item_id": "p0", "image_uri": f"{with_secret}/incoming/p0.png", "caption": CAPTION},
        {"item_id": "p1", "image_uri": f"{with_encoded_secret}/incoming/p1.png", "caption": CAPTION}])
    # (In this process: what is checked here happens before any flow starts.)
    from diffcolor.cli import main

    def command(*args: str) -> tuple[int, str]:
        code = main(list(args))
        printed = capsys.readouterr()
        assert "Traceback" not in printed.err
        return code, printed.out + printed.err

    refused = command("run", str(refused_manifest), "--out", str(tmp_path / "refused-out"), "--model", "tiny")
    assert refused[0] == 1 and "row 1, column 'image_uri'" in refused[1] and "row 2, column 'image_uri'" in refused[1]
    assert "carries credentials" in refused[1] and not (tmp_path / "refused-out").exists()
    validated = command("manifest", "validate", str(refused_manifest))
    assert validated[0] == 1 and "carries credentials" in validated[1]
    # Credentials in a URI of any other scheme are refused with one line; so is a model URI, a flow parameter too.
    others = [command("manifest", "validate", f"https://user:{canary}@images.example/m.parquet"),
              command("manifest", "validate", f"gs://user:{quote(canary, safe='')}@bucket/m"),
              command("run", str(local_manifest), "--out", str(tmp_path / "model-out"), "--model",
                      f"https://user:{canary}@models.example/sd15")]
    assert all(code == 2 and "carries credentials" in text for code, text in others)

    places = {"stdout": done.stdout.encode(), "stderr": done.stderr.encode(),
              **{f"command {number}": text.encode() for number, (_, text) in enumerate([refused, validated, *others])},
              "prefect database": _prefect_database_bytes(),
              **{f"s3://.../{key}": data for key, data in objects.items() if not key.startswith("incoming/")},
              **{str(path): path.read_bytes() for path in tmp_path.rglob("*")
                 if path.is_file() and path not in (local_manifest, refused_manifest)}}
    # The database looked at is the one this run wrote to: it holds the run's parameters, without credentials.
    assert f"{s3_bucket}/incoming/manifest.parquet".encode() in places["prefect database"]
    assert any(b"catalogue.example" in data for data in places.values())  # the catalogue field was carried through
    leaks = [core, catalogue, quote(canary, safe=""), quote(canary), canary.split("/")[1]]
    assert [(place, leak) for place, data in places.items() for leak in leaks if leak.encode() in data] == []


def test_a_flow_refuses_parameters_that_carry_credentials(prefect_server, tmp_path):
    from flows.collection import RunOptions, colorize_collection
    from flows.reprocess import reprocess

    from prefect.exceptions import FailedRun

    from diffcolor.common.redact import CredentialsInUriError

    # A refusal ends the flow run Failed with its one line (flows/checks.py), or raises it before the run starts.
    refused = (CredentialsInUriError, FailedRun)
    core = f"CANARY{uuid.uuid4().hex}"
    with pytest.raises(refused) as caught:
        colorize_collection(f"s3://key:{_canary(core)}@bucket/m.parquet", str(tmp_path / "out"), "tiny",
                            RunOptions(preset="smoke", pool="inline"))
    assert core not in str(caught.value) and "carries credentials" in str(caught.value)
    with pytest.raises(refused) as caught:
        reprocess(f"https://user:{_canary(core)}@host.example/out", [{"item_id": "a", "target_prompt": "a red dog"}])
    assert core not in str(caught.value) and "carries credentials" in str(caught.value)
    with pytest.raises(refused) as caught:
        colorize_collection(str(tmp_path / "m.parquet"), str(tmp_path / "out"), f"https://u:{_canary(core)}@m.example/x",
                            RunOptions(preset="smoke", pool="inline"))
    assert core not in str(caught.value) and "carries credentials" in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_two_runs_at_once_on_one_s3_output_fit_each_item_once_and_lose_no_record(prefect_server, s3_bucket, s3_endpoint,
                                                                              tmp_path):
    rows = []
    for index in range(3):
        storage.write_bytes(f"{s3_bucket}/incoming/p{index}.png", _png(index))
        rows.append({"item_id": f"p{index}", "image_uri": f"{s3_bucket}/incoming/p{index}.png", "caption": CAPTION,
                     "seed": index})
    manifest = write_manifest(tmp_path / "manifest.parquet", rows)
    command = [sys.executable, "-m", "diffcolor", "run", str(manifest), "--out", f"{s3_bucket}/archive",
               "--model", "tiny", "--preset", "smoke"]
    from prefect.settings import PREFECT_API_URL

    environment = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value())
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
                                  cwd=REPO) for _ in range(2)]
    outputs = [process.communicate(timeout=600) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], [err[-2000:] for _, err in outputs]

    runs = sorted({key.split("/")[2] for key in _bucket_objects(s3_endpoint, s3_bucket) if key.startswith("archive/runs/")})
    assert len(runs) == 2
    records = [row for run in runs for row in read_results(f"{s3_bucket}/archive/runs/{run}/results.parquet").to_pylist()]
    for index in range(3):
        mine = [row for row in records if row["item_id"] == f"p{index}"]
        assert len(mine) == 2  # one record per run: none lost
        assert sum(1 for row in mine if row["finetune_steps_run"] > 0) == 1  # fitted by exactly one of the runs
        assert storage.list_files(f"{s3_bucket}/archive/items/p{index}/versions") == [
            f"{s3_bucket}/archive/items/p{index}/versions/v0001.json"]
        assert storage.read_json(f"{s3_bucket}/archive/items/p{index}/result.json")["status"] == "done"
        assert storage.list_files(f"{s3_bucket}/archive/items/p{index}/lock") == []  # no orphaned lease


def test_traversal_ids_are_refused_everywhere_and_create_nothing_outside_the_root(prefect_server, tmp_path):
    out = tmp_path / "collection" / "out"
    out.mkdir(parents=True)
    before = sorted(str(path) for path in tmp_path.rglob("*"))
    hostile = ["../../..", "../escape", "a/b", "..", "CON", "x\\y"]
    for item in hostile:
        with pytest.raises(UnsafeItemIdError):
            OutputLayout(str(out)).item_prefix(item)
    done = _diffcolor("reprocess", str(out), "--items", "ok,../../escape", "--color-map", '{"dog": "red"}')
    assert done.returncode == 2 and "unsafe item_id '../../escape'" in done.stderr and "Traceback" not in done.stderr
    targets = write_manifest(tmp_path / "targets.parquet", [{"item_id": "../../../etc", "target_prompt": "a red dog"}])
    done = _diffcolor("reprocess", str(out), "--targets", str(targets))
    assert done.returncode == 2 and "row 1" in done.stderr and "unsafe item_id" in done.stderr

    from flows.reprocess import Retarget, reprocess

    with pytest.raises(UnsafeItemIdError):  # the deployment form's path: the flow's typed parameters
        reprocess(str(out), [{"item_id": "../../x", "target_prompt": "a red dog"}])
    with pytest.raises(UnsafeItemIdError):
        Retarget(item_id="../x")
    assert sorted(str(path) for path in tmp_path.rglob("*") if "targets.parquet" not in str(path)) == before


def test_reprocess_renders_each_item_with_its_own_recorded_model(prefect_server, models, smoke, tmp_path, gray_png):
    from diffcolor.common.items import ItemRequest
    from diffcolor.method.models import load_models
    from diffcolor.pipeline import colorize_item
    from diffcolor.method.tiny import write_tiny_bundle
    from flows.reprocess import ReprocessOptions, Retarget, reprocess

    out = tmp_path / "out"
    other_folder = write_tiny_bundle(tmp_path / "other-model", seed=1)  # another model: other weights, other hash
    other = load_models(str(other_folder))
    colorize_item(models, ItemRequest(item_id="a", source_uri=str(gray_png), caption=CAPTION), OutputLayout(str(out)).item_prefix("a"),
                  smoke)
    colorize_item(other, ItemRequest(item_id="b", source_uri=str(gray_png), caption=CAPTION), OutputLayout(str(out)).item_prefix("b"),
                  smoke)

    state = reprocess(str(out), [Retarget(item_id="a", color_map={"dog": "red"}),
                                 Retarget(item_id="b", color_map={"dog": "red"})],
                      ReprocessOptions(pool="inline", retry_delay_seconds=[0.1]), return_state=True)
    assert state.is_completed(), state.message
    for item, model in (("a", models), ("b", other)):
        record = storage.read_json(str(out / "items" / item / "result.json"))
        assert record["version"] == 2 and record["model_hash"] == model.model_hash and record["model_id"] == model.model_id


def test_a_fifo_source_fails_its_item_and_the_run_goes_on(prefect_server, tmp_path):
    from flows.collection import RunOptions, colorize_collection

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "good.png").write_bytes(_png(0))
    os.mkfifo(tmp_path / "images" / "pipe.png")  # a source that never ends: nobody writes to it
    manifest = write_manifest(tmp_path / "manifest.parquet", [
        {"item_id": "pipe", "image_uri": "images/pipe.png", "caption": CAPTION, "seed": 1},
        {"item_id": "good", "image_uri": "images/good.png", "caption": CAPTION, "seed": 2},
    ])
    state = colorize_collection(str(manifest), str(tmp_path / "out"), "tiny",
                                RunOptions(preset="smoke", pool="inline", retry_delay_seconds=[0.1]), return_state=True)
    assert state.is_failed()
    rows = {row["item_id"]: row for row in read_results(state.result(raise_on_failure=False)["results"]).to_pylist()}
    assert rows["good"]["status"] == "done"
    assert rows["pipe"]["error_class"] == "input_unavailable" and "not a regular file (a FIFO)" in rows["pipe"]["error_message"]


@pytest.mark.parametrize("secret", ["wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "a=b+c/d", "p@ss:w:rd", "x%2Fy%40z",
                                    "trailing/", "/leading", "q?r#s"])
def test_a_credential_in_any_uri_is_lifted_out_and_masked_whatever_it_holds(secret):
    from urllib.parse import quote, unquote

    from diffcolor.common.redact import has_userinfo, redact, split_userinfo

    for scheme in ("s3", "gs", "https", "ftp", "az"):
        for written in (secret, quote(secret, safe="")):
            uri = f"{scheme}://KEYID:{written}@bucket-1/photos/a@2x.png"
            bare, user, password = split_userinfo(uri)
            assert (bare, user, password) == (f"{scheme}://bucket-1/photos/a@2x.png", "KEYID", unquote(written))
            assert has_userinfo(uri) and not has_userinfo(bare)
            assert redact(f"failed: {uri}") == f"failed: {scheme}://***@bucket-1/photos/a@2x.png"
    # Plain URIs stay as they are: an '@' in a path, a port, a colon in a key.
    for plain in ("s3://bucket/a@2x.png", "https://images.example:8443/iiif/a.jpg", "s3://bucket/a:b/c.png",
                  "file:///data/a@b.tif", "/data/a:b@c.tif"):
        assert not has_userinfo(plain) and redact(plain) == plain


def test_secret_query_parameters_of_presigned_and_token_urls_are_masked():
    from diffcolor.common.redact import redact

    url = ("https://bucket.s3.amazonaws.com/a.tif?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F20261207"
           "&X-Amz-Date=20261207T000000Z&X-Amz-Expires=3600&X-Amz-Security-Token=IQoJb3&X-Amz-Signature=f00dcafe"
           "&X-Amz-SignedHeaders=host")
    shown = redact(f"reading '{url}' failed")
    for value in ("AKIA%2F20261207", "IQoJb3", "f00dcafe"):
        assert value not in shown
    assert "X-Amz-Date=20261207T000000Z" in shown and "X-Amz-Signature=***" in shown
    for name in ("sig", "token", "access_token", "api_key", "Signature", "password", "client_secret"):
        text = redact(f"https://images.example/a.jpg?w=100&{name}=s3cr3tvalue#frag")
        assert "s3cr3tvalue" not in text and f"{name}=***" in text and "w=100" in text
    assert "tok3n" not in redact("https://app.example/cb#access_token=tok3n&state=1")  # an OAuth fragment
