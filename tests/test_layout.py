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
