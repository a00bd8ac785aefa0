"""Every TensorRT and pycuda name the code uses exists in the real releases the README promises.

Nothing here runs TensorRT: the names come from the code (tests/tensorrt_usage.py reads it with
``ast``) and the surfaces from the releases' own binaries and sources, recorded by
``benchmarks/tensorrt_surface.py`` in tests/data/tensorrt_surface/ (no network needed here).
"""

from pathlib import Path

import numpy as np
import pytest
from tensorrt_usage import library_modules, library_uses

REPO = Path(__file__).resolve().parents[1]
SURFACES = Path(__file__).parent / "data" / "tensorrt_surface"
# Attributes of the Python and numpy values the trace reaches too (pinned host arrays, version strings).
PLAIN = set().union(*(dir(t) for t in (object, str, bytes, int, float, list, tuple, dict, set, np.ndarray, np.dtype)))


def _surface(path: Path) -> set[str]:
    return {line for line in path.read_text().splitlines() if line and not line.startswith("#")}


def _versions(library: str) -> dict[str, set[str]]:
    files = sorted(SURFACES.glob(f"{library}-*.txt"))
    return {f.stem.removeprefix(f"{library}-"): _surface(f) for f in files}


TENSORRT, PYCUDA = _versions("tensorrt"), _versions("pycuda")


def present(name: str, surface: set[str]) -> bool:
    """In the surface, or the tail of a longer name (the linker stores a shared tail once)."""
    return name in surface or any(s.endswith(name) for s in surface)


def missing(uses, library: str, surface: set[str], others: dict[str, set[str]]) -> dict[str, list[str]]:
    """{name: [file:line, ...]} of unguarded uses of ``library`` absent from ``surface``.

    A value the trace gives to both libraries counts as present if either has it (``others``: the
    other library's surfaces, any version).
    """
    either = set().union(*others.values())
    absent: dict[str, list[str]] = {}
    for use in uses:
        if use.guarded or library not in use.libraries or present(use.name, surface) or use.name in PLAIN:
            continue
        if len(use.libraries) > 1 and present(use.name, either):
            continue
        absent.setdefault(use.name, []).append(use.where)
    return absent


@pytest.fixture(scope="module")
def uses():
    modules = library_modules(REPO)
    assert {REPO / "device" / "runtimes" / "tensorrt.py", REPO / "export" / "tensorrt_build.py"} <= set(modules)
    return library_uses(modules)


def test_surfaces_cover_the_promised_releases():
    # JetPack 6.1/6.2's TensorRT, a newer 10.x, an 11.x; the oldest and newest pycuda pyproject admits.
    assert "10.3.0" in TENSORRT and any(v.startswith("11.") for v in TENSORRT) and len(TENSORRT) >= 3
    assert "2022.2.2" in PYCUDA and len(PYCUDA) >= 2
    for surface in (*TENSORRT.values(), *PYCUDA.values()):
        assert len(surface) > 500
    # The names the TensorRT 10 port replaced are really gone, and their successors really there.
    for version, surface in TENSORRT.items():
        assert not any(present(n, surface) for n in ("execute_async_v2", "get_binding_shape", "binding_is_input")), version
        assert all(present(n, surface) for n in ("execute_async_v3", "set_tensor_address", "set_input_shape")), version


def test_the_trace_finds_the_calls_that_matter(uses):
    by_library = {lib: {u.name for u in uses if lib in u.libraries} for lib in ("tensorrt", "pycuda")}
    assert {"execute_async_v3", "set_tensor_address", "build_serialized_network", "get_tensor_mode",
            "create_timing_cache", "INPUT", "nptype"} <= by_library["tensorrt"]
    assert {"mem_alloc", "memcpy_htod_async", "retain_primary_context", "time_till", "free",
            "mem_get_info"} <= by_library["pycuda"]
    assert {u.name for u in uses if u.guarded} >= {"STRONGLY_TYPED", "TF32", "INT8", "FP16"}


@pytest.mark.parametrize("version", sorted(TENSORRT))
def test_every_tensorrt_name_used_exists(uses, version):
    absent = missing(uses, "tensorrt", TENSORRT[version], PYCUDA)
    assert not absent, f"TensorRT {version} lacks: " + "; ".join(f"{n} ({', '.join(w)})" for n, w in absent.items())


@pytest.mark.parametrize("version", sorted(PYCUDA))
def test_every_pycuda_name_used_exists(uses, version):
    absent = missing(uses, "pycuda", PYCUDA[version], TENSORRT)
    assert not absent, f"pycuda {version} lacks: " + "; ".join(f"{n} ({', '.join(w)})" for n, w in absent.items())


def test_guarded_names_exist_somewhere(uses):
    """``getattr``/``hasattr`` names may be missing from some releases, but not from all (a typo)."""
    every = {"tensorrt": list(TENSORRT.values()), "pycuda": list(PYCUDA.values())}
    for use in (u for u in uses if u.guarded):
        surfaces = [s for lib in use.libraries for s in every[lib]]
        assert any(present(use.name, s) for s in surfaces), f"{use.name} ({use.where}) is in no release checked"
