"""Record the Python API surface of real TensorRT and pycuda releases, for a test that needs no network.

``import tensorrt`` cannot work without the TensorRT libraries and a GPU, but the
``tensorrt-cu12/cu13-bindings`` wheels are real: their pybind module ``tensorrt_bindings/tensorrt.so``
stores every class, method, property and enum name as a NUL-terminated string. pycuda is a source
package; its Boost.Python wrapper names every function, class and method in ``src/wrapper/*.cpp``.
This script downloads them with pip, collects those names and writes one sorted file per release
to ``tests/data/tensorrt_surface/``, which ``tests/test_tensorrt_api.py`` checks the code against.

    python benchmarks/tensorrt_surface.py                 # pip download, then write the files
    python benchmarks/tensorrt_surface.py --wheels DIR    # use (or fill) DIR instead of a temp folder

The linker merges string tails, so a name may appear only as the end of a longer one (``INPUT`` of
``TensorIOMode.INPUT`` is the tail of ``CONDITIONAL_INPUT``): readers match tails too.
"""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "tensorrt_surface"
# (package, version): JetPack 6.1/6.2's TensorRT, the newest 10.x, the newest 11.x.
TENSORRT = (("tensorrt-cu12-bindings", "10.3.0"), ("tensorrt-cu12-bindings", "10.16.1.11"),
            ("tensorrt-cu13-bindings", "11.4.0.106"))
# The oldest pycuda pyproject.toml admits, and the newest.
PYCUDA = ("2022.2.2", "2026.1")
# A whole NUL-terminated string that is one identifier: pybind's names, not its docstrings.
IDENTIFIER_STRING = re.compile(rb"(?<![\x21-\x7e])[A-Za-z_][A-Za-z0-9_]{1,63}(?=\x00)")
# Boost.Python names in pycuda's wrapper: "quoted" and the macros that stringify their argument.
QUOTED = re.compile(r'"([A-Za-z_][A-Za-z0-9_]*)"')
MACRO_NAME = re.compile(r"\b(?:DEF_SIMPLE_\w+|DECLARE_EXC)\(\s*([A-Za-z_][A-Za-z0-9_]*)")


def python_names(source: str) -> set[str]:
    """Names a Python module defines: functions, classes, assigned names and assigned attributes."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
    return names


def tensorrt_names(wheel: Path) -> set[str]:
    """Identifiers of the bindings' ``tensorrt.so`` plus what their ``__init__.py`` adds (``nptype``, ...)."""
    with zipfile.ZipFile(wheel) as archive:
        binary = archive.read("tensorrt_bindings/tensorrt.so")
        init = archive.read("tensorrt_bindings/__init__.py").decode()
    found = {m.group().decode() for m in IDENTIFIER_STRING.finditer(binary)}
    return {n for n in found if not n.startswith("_Z")} | python_names(init)  # _Z...: mangled C++ symbols


def pycuda_names(sdist: Path) -> set[str]:
    """Names ``pycuda.driver`` exposes: its C++ wrapper's Python names plus what ``driver.py`` defines."""
    names: set[str] = set()
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            wrapper = re.search(r"/src/wrapper/(wrap_cudadrv|mempool)\.cpp$", member.name)  # pycuda._driver's sources
            if not (wrapper or member.name.endswith("/pycuda/driver.py")):
                continue
            source = archive.extractfile(member).read().decode("utf-8", "replace")
            names |= (set(QUOTED.findall(source)) | set(MACRO_NAME.findall(source))) if wrapper else python_names(source)
    return names


def download(spec: str, folder: Path, *, source: bool = False) -> Path:
    """``pip download`` one distribution (no dependencies) into ``folder``; returns its file."""
    before = set(folder.iterdir())
    # An sdist's metadata step would build pycuda's dependencies: without isolation it only reads setup.py.
    extra = ["--no-binary", ":all:", "--no-build-isolation"] if source else ["--only-binary", ":all:"]
    name, version = spec.split("==")
    stem = name.replace("-", "_")
    existing = [p for p in folder.iterdir() if p.is_file() and p.name.startswith((f"{stem}-{version}-", f"{name}-{version}."))]
    if existing:
        return existing[0]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", *extra, spec, "-d", str(folder)],
                   check=True)
    (new,) = set(folder.iterdir()) - before
    return new


def write_surface(path: Path, names: set[str], origin: str) -> None:
    path.write_text(f"# {origin}; made by benchmarks/tensorrt_surface.py\n" + "".join(f"{n}\n" for n in sorted(names)))
    print(f"{len(names):5d} names -> {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", type=Path, help="Folder for the downloads (default: a temporary one).")
    parser.add_argument("--out", type=Path, default=OUT, help=f"Where the surface files go (default {OUT}).")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as temp:
        folder = args.wheels or Path(temp)
        folder.mkdir(parents=True, exist_ok=True)
        for package, version in TENSORRT:
            wheel = download(f"{package}=={version}", folder)
            write_surface(args.out / f"tensorrt-{version}.txt", tensorrt_names(wheel),
                          f"tensorrt {version}: {wheel.name}, tensorrt_bindings/tensorrt.so and __init__.py")
        for version in PYCUDA:
            sdist = download(f"pycuda=={version}", folder, source=True)
            write_surface(args.out / f"pycuda-{version}.txt", pycuda_names(sdist),
                          f"pycuda {version}: {sdist.name}, src/wrapper/*.cpp and pycuda/driver.py")


if __name__ == "__main__":
    main()
