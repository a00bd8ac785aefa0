"""The import contract: the device side (device/, calibration/ and the core they stand on) imports
nothing from the workstation side (model, trainer, datasets, export's torch parts, torch itself).

Read from the source (every import statement, nested ones included), so a lazy import inside a
function breaks the contract as surely as one at the top. The no-torch test proves the same at run
time for the commands it runs; this one covers every module, run or not.
"""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORE = ("atomic", "blas_threads", "bundle", "bundle_layout", "errors", "figures", "folders", "generators", "machine",
        "options", "preprocess", "progress", "report", "task_free")
WORKSTATION = ("torch", "torchvision", "pah_edge.workstation", "pah_edge.export", "export",
               "pah_edge.demo", "pah_edge.cli", "pah_edge.cli_device", "pah_edge.cli_support")


def device_side_modules() -> list[Path]:
    return sorted([*(REPO / "device").rglob("*.py"), *(REPO / "calibration").rglob("*.py"),
                   *(REPO / "pah_edge" / f"{name}.py" for name in CORE)])


def workstation_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in ``path`` that reaches the workstation side."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        else:
            continue
        found += [(node.lineno, m) for m in modules if any(m == w or m.startswith(w + ".") for w in WORKSTATION)]
    return found


@pytest.mark.parametrize("path", device_side_modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_the_device_side_imports_nothing_from_the_workstation(path):
    offending = workstation_imports(path)
    assert not offending, f"{path.relative_to(REPO)} imports workstation modules: {offending}"


def test_the_contract_sees_a_nested_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from pah_edge.workstation.data.splits import cut\n    import torch\n")
    assert workstation_imports(module) == [(2, "pah_edge.workstation.data.splits"), (3, "torch")]


def code_map_paths() -> set[Path]:
    """Every file the README's "Code map" names. A name with a slash is from the repository root
    (``dir/`` a whole folder); a bare name (``atomic.py``, ``bench*.py``) is in the folder of the last
    file named before it in the same cell."""
    section = (REPO / "README.md").read_text().split("## Code map", 1)[1].split("\n## ", 1)[0]
    named = set()
    for row in section.splitlines():
        if not row.startswith("| `"):
            continue
        folder = REPO
        for item in re.findall(r"`([^`]+)`", row.split("|")[1]):
            path = REPO / item if "/" in item else folder / item
            found = set(path.rglob("*.py")) if item.endswith("/") else set(path.parent.glob(path.name))
            assert found, f"the README's Code map names {item}, which is not in the tree"
            named |= found
            if not item.endswith("/"):
                folder = path.parent
    return named


def test_the_readme_code_map_covers_every_module():
    modules = {p for d in ("pah_edge", "export", "device", "calibration") for p in (REPO / d).rglob("*.py")
               if p.name != "__init__.py"}
    missing = sorted(str(p.relative_to(REPO)) for p in modules - code_map_paths())
    assert not missing, f"README's Code map does not mention: {missing}"
