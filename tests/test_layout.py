"""The package's layers hold: the contract is checked and catches a forbidden import; rules on the code itself."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
PACKAGES = ("diffcolor", "flows", "review")
SOURCES = sorted(path for name in PACKAGES for path in (REPO / name).rglob("*.py"))


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the packages under ``root`` with the repository's contracts."""
    environment = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run([str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          env=environment, capture_output=True, text=True, timeout=300)


@pytest.fixture
def tree_copy(tmp_path) -> Path:
    """The packages and the contracts, copied, so a test can break them."""
    for name in PACKAGES:
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_layer_contract_holds_on_this_tree(tree_copy):
    checked = _lint_imports(tree_copy)
    assert checked.returncode == 0, checked.stdout[-3000:]
    assert "0 broken" in checked.stdout


@pytest.mark.parametrize(
    ("additions", "contract"),
    [
        ({"diffcolor/archive/storage.py": "import torch"}, "The archive never loads models"),
        ({"diffcolor/archive/manifest.py": "from diffcolor.method import stage2"}, "Layers"),
        ({"diffcolor/method/training.py": "from diffcolor.archive import storage"}, "Layers"),
        ({"diffcolor/pipeline.py": "import prefect"}, "Nothing in diffcolor/ imports Prefect"),
        ({"diffcolor/common/ids.py": "import diffcolor.common.keys",
          "diffcolor/common/keys.py": "import diffcolor.common.ids"}, "No import cycles"),
    ],
)
def test_the_contract_fails_on_a_forbidden_import(tree_copy, additions, contract):
    marker = "from __future__ import annotations\n"
    for module, statement in additions.items():
        path = tree_copy / module
        path.write_text(path.read_text(encoding="utf-8").replace(marker, marker + statement + "\n", 1), encoding="utf-8")
    checked = _lint_imports(tree_copy)
    assert checked.returncode != 0
    broken = checked.stdout.split("Broken contracts", 1)[1]
    assert contract in broken, checked.stdout[-3000:]


def _private_imports(path: Path) -> list[str]:
    """``from diffcolor.x import _name`` / ``from flows.x import _name`` in ``path``: private names crossing modules."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            found += [f"{path.relative_to(REPO)}:{node.lineno} {node.module}.{alias.name}"
                      for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__")]
    return found


def test_no_private_name_is_imported_across_modules():
    assert [hit for path in SOURCES for hit in _private_imports(path)] == []


def _code_lines(function: ast.FunctionDef) -> int:
    """Lines of a function without its docstring."""
    lines = function.end_lineno - function.lineno + 1
    first = function.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        lines -= first.end_lineno - first.lineno + 1
    return lines


def test_method_functions_stay_short_enough_to_read_top_to_bottom():
    """The house style: a stage entry point is numbered steps over named helpers, about 60 lines at most."""
    long = []
    for path in sorted((REPO / "diffcolor" / "method").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _code_lines(node) > 60:
                long.append(f"{path.name}:{node.lineno} {node.name} ({_code_lines(node)} lines)")
    assert long == []


BLOCK_HEAVY = (
    "import sys\n"
    "for name in ('torch', 'diffusers', 'transformers', 'peft', 'kornia', 'prefect', 'prefect_ray', 'skimage'):\n"
    "    sys.modules[name] = None  # importing any of them now raises ImportError\n"
)


def _run_blocked(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_HEAVY + code], capture_output=True, text=True, cwd=REPO,
                          timeout=120)


def test_archive_and_common_import_with_torch_and_prefect_unimportable():
    modules = [f"diffcolor.{folder}.{path.stem}" for folder in ("archive", "common")
               for path in sorted((REPO / "diffcolor" / folder).glob("*.py")) if path.stem != "__init__"]
    modules.remove("diffcolor.archive.images")  # decodes with scikit-image, blocked above: checked on its own below
    done = _run_blocked("import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules))
    assert done.returncode == 0, done.stderr[-2000:]
    images = subprocess.run([sys.executable, "-c", BLOCK_HEAVY.replace(", 'skimage'", "")
                             + "import diffcolor.archive.images"], capture_output=True, text=True, cwd=REPO)
    assert images.returncode == 0, images.stderr[-2000:]


# ---------------------------------------------------------------------------
# The output root's layout has one owner: diffcolor.archive.layout.

from diffcolor.archive import layout as output_layout  # noqa: E402
from diffcolor.archive.layout import ItemLayout, OutputLayout, item_id_from, path_in_item  # noqa: E402

LAYOUT_MODULE = REPO / "diffcolor" / "archive" / "layout.py"
HTTP_CALLS = {"get", "post", "put", "delete", "patch", "head", "route", "api_route", "websocket"}


def _reads_model_folders(tree: ast.AST) -> bool:
    """Whether a module names a diffusers model folder's parts: there ``config.json`` is the model's, not a run's."""
    return any(isinstance(node, ast.Constant) and isinstance(node.value, str)
               and node.value.split("/", 1)[0] in ("unet", "vae", "text_encoder") for node in ast.walk(tree))


def _layout_literals(source: str, where: str = "<source>") -> list[str]:
    """The layout's folder and file names (``output_layout.NAMES``) that ``source`` spells out as path parts.

    A name counts when it is joined (``storage.join``, ``os.path.join``, ``Path``), put after a ``/``, part of a
    slash-separated string without spaces (``f"{out}/items/{id}"``, ``"versions/"``), a bare file name
    (``"result.json"``), or a module constant's value. Not counted: a string with spaces (messages, help), a route
    or URL given to an HTTP call (``@app.get("/api/items")``), and ``config.json`` in a module that reads model
    folders.
    """
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    model_folders = _reads_model_folders(tree)
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
            continue
        value, parent = node.value, parents.get(node)
        if isinstance(parent, ast.JoinedStr):
            parent = parents.get(parent)
        called = ""
        if isinstance(parent, ast.Call):
            called = parent.func.attr if isinstance(parent.func, ast.Attribute) else getattr(parent.func, "id", "")
        if called in HTTP_CALLS and value.startswith("/"):
            continue
        parts = set(value.split("/")) if "/" in value and not any(char.isspace() for char in value) else set()
        if value in output_layout.NAMES:
            parts.add(value)
        names = parts & output_layout.NAMES
        if model_folders and names <= {output_layout.CONFIG}:
            continue
        joined = called in ("join", "joinpath", "Path", "PurePosixPath")
        divided = isinstance(parent, ast.BinOp) and isinstance(parent.op, ast.Div)
        constant = isinstance(parent, ast.Assign) and value in output_layout.NAMES
        if names and ("/" in value or "." in value or joined or divided or constant):
            found.append(f"{where}:{node.lineno} {value!r}")
    return found


def test_no_module_but_the_layout_spells_out_the_output_root_layout():
    found = [hit for path in SOURCES if path != LAYOUT_MODULE
             for hit in _layout_literals(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))]
    assert found == [], "build these paths through diffcolor.archive.layout"


@pytest.mark.parametrize("source", [
    'storage.join(prefix, "versions")',
    'os.path.join(output, "items", item)',
    'uri = f"{out}/runs/{run_id}"',
    'uri = f"{prefix}/lock"',
    'Path(folder) / "approved.json"',
    'name.startswith("versions/")',
    'if "result.json" in files: pass',
    'LOCK = "lock"',
    'storage.join(run, "config.json")',
    'storage.join(prefix, "state", "color-state.safetensors")',
])
def test_the_scan_finds_a_layout_name_spelled_out(source):
    assert _layout_literals(source) != []


@pytest.mark.parametrize("source", [
    'ok = record["status"] == "done" and role != "state"',
    '@app.get("/api/items/{item_id}/versions/{version}")\ndef f(): pass',
    'parser.add_argument("--run", help="a folder of OUTPUT/runs/")',
    'table = document.get("items")',
    'CONFIG_FILES = {"unet": "config.json"}\nPath(folder) / "config.json"',
])
def test_the_scan_leaves_other_words_alone(source):
    assert _layout_literals(source) == []


UNUSUAL_IDS = ["plain-1", "a.b~c_d-e", "items", "versions", "runs", "index", "result.json", "~tilde", "1921.4.17",
               "Ångström-Ürün", "फ़ोटो-٣", "写真_001", "x" * 200, "e\u0301t\u00e9"]  # the last: NFD, read as NFC


@pytest.mark.parametrize("root", ["/srv/out", "/srv/items/out", "s3://bucket/items", "memory://o/runs/x/"])
@pytest.mark.parametrize("item_id", UNUSUAL_IDS)
def test_an_item_id_comes_back_out_of_its_paths(root, item_id):
    from diffcolor.common.ids import normalize_item_id

    output = OutputLayout(root)
    item = output.item(item_id)
    expected = normalize_item_id(item_id)
    assert item_id_from(item.prefix) == item.item_id == expected
    for uri in (item.prefix, item.result, item.record(3), item.master(3), item.access(3, "jpg"), item.state_object,
                item.lock, item.decisions, item.approved, item.published("d1")):
        assert output.item_id_from(uri) == expected
    assert path_in_item(item.record(12), expected) == "versions/v0012.json"
    assert path_in_item(item.master(12), expected) == output_layout.version_path(12) + "/master.tif"


@pytest.mark.parametrize("item_id", ["../x", "a/b", "..", "CON", "", "a\\b", ".hidden"])
def test_an_unsafe_item_id_never_becomes_a_path(item_id):
    from diffcolor.common.ids import UnsafeItemIdError

    with pytest.raises(UnsafeItemIdError):
        OutputLayout("/srv/out").item(item_id)


@pytest.mark.parametrize("uri", ["/srv/out/runs/r1/results.parquet", "/srv/out/items", "/srv/out/items/", "/elsewhere/items/a"])
def test_a_uri_outside_the_items_names_no_item(uri):
    with pytest.raises(ValueError):
        OutputLayout("/srv/out").item_id_from(uri)


def test_the_layout_is_the_one_existing_collections_have():
    """Byte for byte the paths collections were written with: an archive written before reads the same."""
    output = OutputLayout("s3://bucket/out/")
    item = output.item("a")
    run = output.run("20260101T000000Z-abc")
    assert [item.prefix, item.result, item.versions, item.record(1), item.version(1), item.master(1),
            item.access(1, "png"), item.master_credentials(1), item.output(1, "x.bin"), item.state, item.state_object,
            item.checkpoints, item.attempts, item.lock, item.decisions, item.approved, item.published("d")] == [
        "s3://bucket/out/items/a", "s3://bucket/out/items/a/result.json", "s3://bucket/out/items/a/versions",
        "s3://bucket/out/items/a/versions/v0001.json", "s3://bucket/out/items/a/versions/v0001",
        "s3://bucket/out/items/a/versions/v0001/master.tif", "s3://bucket/out/items/a/versions/v0001/access.png",
        "s3://bucket/out/items/a/versions/v0001/master.c2pa", "s3://bucket/out/items/a/versions/v0001/x.bin",
        "s3://bucket/out/items/a/state", "s3://bucket/out/items/a/state/color-state.safetensors",
        "s3://bucket/out/items/a/checkpoints", "s3://bucket/out/items/a/attempts", "s3://bucket/out/items/a/lock",
        "s3://bucket/out/items/a/decisions", "s3://bucket/out/items/a/approved.json",
        "s3://bucket/out/items/a/published/d.jpg"]
    assert [run.prefix, run.results, run.results_csv, run.report, run.summary, run.config, run.run_id] == [
        "s3://bucket/out/runs/20260101T000000Z-abc", "s3://bucket/out/runs/20260101T000000Z-abc/results.parquet",
        "s3://bucket/out/runs/20260101T000000Z-abc/results.csv", "s3://bucket/out/runs/20260101T000000Z-abc/report.html",
        "s3://bucket/out/runs/20260101T000000Z-abc/summary.json", "s3://bucket/out/runs/20260101T000000Z-abc/config.json",
        "20260101T000000Z-abc"]
    assert [output.items, output.runs, output.index, output.index_table, output.index_shards, output.index_shard("r"),
            output.iiif_manifest, output.verify_report("20260101T000000Z"), output.eval.prefix] == [
        "s3://bucket/out/items", "s3://bucket/out/runs", "s3://bucket/out/index", "s3://bucket/out/index/items.parquet",
        "s3://bucket/out/index/runs", "s3://bucket/out/index/runs/r.parquet", "s3://bucket/out/iiif/manifest.json",
        "s3://bucket/out/verify/20260101T000000Z.json", "s3://bucket/out/eval"]
    evaluation = output.eval
    assert [evaluation.items.item("a").prefix, evaluation.input("a"), evaluation.row("a", 2), evaluation.features("a", 2),
            evaluation.plot("p"), evaluation.table, evaluation.summary, evaluation.report] == [
        "s3://bucket/out/eval/items/a", "s3://bucket/out/eval/inputs/a.png", "s3://bucket/out/eval/rows/a/v0002.json",
        "s3://bucket/out/eval/features/a/v0002.safetensors", "s3://bucket/out/eval/plots/p.png",
        "s3://bucket/out/eval/eval.parquet", "s3://bucket/out/eval/summary.json", "s3://bucket/out/eval/report.html"]


def test_version_records_are_listed_and_numbered_from_their_names(tmp_path):
    item = ItemLayout(str(tmp_path / "item"))
    assert item.version_records() == [] and item.next_version() == 1
    for version in (1, 2, 10):
        Path(item.record(version)).parent.mkdir(parents=True, exist_ok=True)
        Path(item.record(version)).write_text("{}", encoding="utf-8")
    Path(item.version(10)).mkdir()
    Path(item.master(10)).write_bytes(b"")
    assert [output_layout.version_number(uri) for uri in item.version_records()] == [1, 2, 10]
    assert item.next_version() == 11
    assert output_layout.record_beside(item.master(10), 10) == item.record(10)


def test_the_layout_document_names_every_folder_and_file_of_the_layout():
    document = (REPO / "docs" / "LAYOUT.md").read_text(encoding="utf-8")
    assert [name for name in sorted(output_layout.NAMES) if name not in document] == []
