"""benchmarks/crash_torture.py, short: SIGKILL the real CLI 20 times while it changes the tiny bundle; every
kill must leave a bundle that verifies, with no task lost and no temporary file after the next lock."""

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
from conftest import write_image_folder
from tiny_bundle import make_tiny_bundle

from pah_edge.bundle import Bundle

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "crash_torture.py"


def _torture_module():
    spec = importlib.util.spec_from_file_location("crash_torture", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["crash_torture"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fixture(tmp_path_factory, mnist_digits):
    root = tmp_path_factory.mktemp("torture")
    new_task = write_image_folder(root / "new", mnist_digits, {"pairs": [1, 7]}, per_class=12) / "pairs"
    calib = write_image_folder(root / "calib", mnist_digits, {"all": [0, 5, 9]}, per_class=8) / "all"
    return _torture_module().Fixture(make_tiny_bundle(root, mnist_digits), new_task, calib)


@pytest.mark.slow
def test_twenty_kills_of_the_cli_leave_a_bundle_that_verifies(fixture):
    torture = _torture_module()
    report = torture.torture(fixture, kills=20, seed=1, learn_every=10, log=lambda line: None)
    assert report["failures"] == []
    assert report["kills"] == report["survived"] == 20
    for kind in torture.COMMANDS:
        stats = report["per_command"][kind]
        assert stats["kills"] == stats["survived"] == 5, (kind, stats)
        assert stats["learn_checks"] >= 1, (kind, stats)
        assert stats["changed"] + stats["unchanged"] == 5, (kind, stats)


def test_the_next_lock_holder_deletes_what_interrupted_writes_left_anywhere_in_the_bundle(fixture, tmp_path):
    # What SIGKILL leaves in the middle of atomic writes: calibrate's in the bundle's root, a task's in tasks/.
    bundle_dir = shutil.copytree(fixture.bundle, tmp_path / "bundle")
    tasks = Bundle.open(bundle_dir).tasks()
    left = [bundle_dir / ".backbone.int8.onnx.k1l2ed.tmp", bundle_dir / ".calibration.json.abc.tmp",
            bundle_dir / "tasks" / ".registry.json.xyz.tmp", bundle_dir / "tasks" / "gone.npz"]
    for path in left:
        path.write_bytes(b"partial")
    kept = bundle_dir / "notes.tmp"  # not the atomic writer's name: the user's file stays
    kept.write_bytes(b"mine")
    with Bundle.open(bundle_dir).lock(0):
        pass
    assert not [p for p in left if p.exists()] and kept.exists()
    assert Bundle.open(bundle_dir).tasks() == tasks
