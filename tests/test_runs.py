"""The run lifecycle's parts that need no flow: the manifest read once, the configuration resolved once and recorded."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffcolor.archive import manifest as manifest_module
from diffcolor.archive.manifest import ManifestError, count_rows, read_items, read_manifest, validate_manifest
from diffcolor.common.keys import config_hash
from diffcolor.method.presets import PRESETS, PipelineConfig, apply_overrides, get_preset

CAPTION = "a dog sitting on a wooden bench"


def _manifest(path, ids):
    rows = [{"item_id": item, "image_uri": f"{item}.png", "caption": CAPTION} for item in ids]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


@pytest.fixture
def counted(monkeypatch):
    """The manifest reads from storage and the validation scans made meanwhile."""
    seen = {"reads": [], "scans": 0}
    open_source, validate = manifest_module._open_source, manifest_module._validate

    def scan(*args, **kwargs):
        seen["scans"] += 1
        return validate(*args, **kwargs)

    monkeypatch.setattr(manifest_module, "_open_source", lambda uri: seen["reads"].append(uri) or open_source(uri))
    monkeypatch.setattr(manifest_module, "_validate", scan)
    return seen


def test_a_manifest_read_once_is_validated_once_and_counted_and_listed_from_its_bytes(tmp_path, counted):
    uri = _manifest(tmp_path / "m.parquet", ["a", "b", "c"])
    source = read_manifest(uri)
    assert validate_manifest(source) == []
    assert [request.item_id for request in read_items(source, items={"b"})] == ["b"]  # the ids checked, no new scan
    assert count_rows(source) == 3
    assert [request.item_id for request in read_items(source)] == ["a", "b", "c"]
    assert counted["reads"] == [uri] and counted["scans"] == 1
    with pytest.raises(ManifestError, match="'z' is not in the manifest"):
        read_items(source, items={"z"})
    assert counted["reads"] == [uri] and counted["scans"] == 1
    # A URI is read (and validated) by each call, as before.
    list(read_items(uri))
    assert len(counted["reads"]) == 3 and counted["scans"] == 2


def test_a_manifest_with_problems_is_refused_whenever_it_is_asked_for_items(tmp_path, counted):
    uri = _manifest(tmp_path / "m.parquet", ["a", "A"])  # the same id twice, letter case ignored
    source = read_manifest(uri)
    assert validate_manifest(source)
    with pytest.raises(ManifestError):
        read_items(source)
    assert counted["reads"] == [uri] and source.ids is None
    with pytest.raises(manifest_module.InputUnavailableError, match="does not exist"):
        read_manifest(str(tmp_path / "missing.parquet"))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_resolved_configuration_round_trips_through_json(preset):
    config = get_preset(preset)
    back = PipelineConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert back == config and config_hash(back.to_dict()) == config_hash(config.to_dict())


def test_a_run_records_its_configuration_before_its_items_and_its_records_name_it(tmp_path):
    from flows.runs import Run, pipeline_config, read_run_config, resolve_config

    overrides = {"stage1.steps": 7, "render.alpha": 0.25, "access_format": "PNG"}
    config = resolve_config("smoke", overrides)
    run = Run(str(tmp_path / "out"), "run", preset="smoke", overrides=overrides, config=config)
    uri = run.write_config(model="tiny", model_hash="0" * 64, device="cpu", pool="inline",
                           manifest="s3://KEY:SECRET@bucket/m.parquet")
    assert uri == str(tmp_path / "out" / "runs" / run.run_id / "config.json")
    recorded = read_run_config(uri)
    assert recorded["preset"] == "smoke" and recorded["overrides"] == overrides and recorded["model"] == "tiny"
    assert pipeline_config(recorded) == config == apply_overrides(get_preset("smoke"), overrides)
    assert "SECRET" not in json.dumps(recorded)
    record = {"item_id": "a", "status": "done"}
    run.add(record)
    assert record["run_config"] == uri and list(run.records)[0]["run_config"] == uri


def test_a_flow_takes_the_command_lines_configuration_only_when_it_names_the_same(monkeypatch):
    from flows.checks import Checked, handing_over
    from flows.runs import resolve_config

    resolved = apply_overrides(get_preset("smoke"), {"stage1.steps": 9})
    applied = []
    real = apply_overrides
    monkeypatch.setattr("flows.runs.apply_overrides", lambda *a: applied.append(a) or real(*a))
    with handing_over(Checked(preset="smoke", overrides={"stage1.steps": 9}, config=resolved)):
        assert resolve_config("smoke", {"stage1.steps": 9}) is resolved
        assert not applied
        assert resolve_config("smoke", {"stage1.steps": 10}).stage1.steps == 10
        assert resolve_config("default", {"stage1.steps": 9}).stage1.steps == 9
    assert len(applied) == 2
    assert resolve_config("smoke", {"stage1.steps": 9}) is not resolved  # no command line: applied here


def test_a_targets_file_reads_the_manifest_spellings_of_its_columns(tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    import pytest

    from diffcolor.common.errors import PromptError
    from flows.reprocess import read_targets

    path = tmp_path / "targets.parquet"
    pq.write_table(pa.table({"item_id": ["p0", "p1"], "colour_map": [json.dumps({"dog": "red"}), None],
                             "target_prompts": [None, "a brown dog on a bench"]}), path)
    targets = read_targets(str(path))
    assert [(t.item_id, t.color_map, t.target_prompt) for t in targets] == [
        ("p0", {"dog": "red"}, None), ("p1", None, "a brown dog on a bench")]
    # Two spellings of one column: which holds the colours is unclear, so the file is refused naming both.
    pq.write_table(pa.table({"item_id": ["p0"], "color_map": ['{"dog": "red"}'], "colour_map": ['{"dog": "blue"}']}),
                   path)
    with pytest.raises(PromptError, match="'color_map' and 'colour_map'"):
        read_targets(str(path))
