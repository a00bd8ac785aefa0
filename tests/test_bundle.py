"""The bundle format: integrity checks, format versions, and the task registry (pah_edge.bundle)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli_process
from tiny_bundle import export_tiny_run

from pah_edge.bundle import Bundle, BundleError, sha256_file, validate_task_name
from pah_edge.task_free import TaskStats

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, mnist_digits):
    """A bundle exported from a 1-epoch tiny run on real digits; tests mutate copies of it."""
    root = tmp_path_factory.mktemp("bundle")
    return export_tiny_run(root, mnist_digits, {"a": [0, 1, 2], "b": [3, 4, 5, 6]}, per_class=10)


@pytest.fixture
def bundle_dir(exported, tmp_path):
    return shutil.copytree(exported, tmp_path / "bundle")


def _protos(classes: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((classes, 1, 8, 8), dtype=np.float32)


def _add(bundle: Bundle, name: str, classes: int = 4, seed: int = 0, **kw):
    return bundle.add_task(name=name, class_names=[f"c{i}" for i in range(classes)], prototypes=_protos(classes, seed),
                           images_seen=10 * classes, accuracy=0.75, source="device", **kw)



def test_a_flipped_byte_in_a_graph_is_caught(bundle_dir):
    graph = bundle_dir / "backbone.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0x01
    graph.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"backbone.onnx does not match its SHA-256 in manifest.json .*re-export"):
        Bundle.open(bundle_dir)
    assert Bundle.open(bundle_dir, verify=False).feature_dim == 32  # e.g. to read the manifest of a broken bundle

    result = run_cli_process("verify", bundle_dir)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: backbone.onnx does not match"), result.stderr


def test_format_versions_and_missing_bundles(bundle_dir, tmp_path):
    manifest_path = bundle_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "format_version": 2}))
    with pytest.raises(BundleError, match=r"bundle format 2 is newer than this pah-edge reads \(1\); upgrade pah-edge"):
        Bundle.open(bundle_dir)
    manifest_path.write_text(json.dumps({**manifest, "format_version": 0}))
    with pytest.raises(BundleError, match="re-export"):
        Bundle.open(bundle_dir)
    manifest_path.write_text(json.dumps({**manifest, "format": "something-else"}))
    with pytest.raises(BundleError, match="not a pah-edge bundle"):
        Bundle.open(bundle_dir)
    with pytest.raises(BundleError, match="run `pah-edge export` first"):
        Bundle.open(tmp_path / "nowhere")


def test_manifest_records_preprocessing_and_shapes(bundle_dir):
    bundle = Bundle.open(bundle_dir)
    assert bundle.preprocess.image_size == 28 and bundle.prototype_shape == (1, 8, 8)
    assert bundle.graph_path("learner_step") == bundle_dir / "learner_step.onnx"
    with pytest.raises(BundleError, match="backbone, generator, learner_step"):
        bundle.graph_path("head")


def test_add_rename_remove_round_trip(bundle_dir):
    bundle = Bundle.open(bundle_dir)
    record = _add(bundle, "new-task")
    assert record.file == "tasks/new-task.npz" and record.bytes == (bundle_dir / record.file).stat().st_size
    np.testing.assert_array_equal(bundle.load_prototypes("new-task"), _protos(4))

    registry = (bundle_dir / "tasks" / "registry.json").read_bytes()
    bundle.rename_task("new-task", "new-task")  # to its own name: nothing to do, no "already exists"
    assert (bundle_dir / "tasks" / "registry.json").read_bytes() == registry
    bundle.rename_task("new-task", "renamed")
    assert bundle.task("renamed").file == "tasks/new-task.npz"
    # The old name is free again, but its file name is not: the new task must not overwrite it.
    second = _add(bundle, "new-task", classes=5, seed=1)
    assert second.file != "tasks/new-task.npz"
    np.testing.assert_array_equal(bundle.load_prototypes("renamed"), _protos(4))
    np.testing.assert_array_equal(bundle.load_prototypes("new-task"), _protos(5, seed=1))

    replaced = _add(bundle, "renamed", classes=3, seed=2, replace=True)
    assert not (bundle_dir / "tasks/new-task.npz").exists()  # the replaced task's file is gone
    np.testing.assert_array_equal(bundle.load_prototypes("renamed"), _protos(3, seed=2))
    bundle.remove_task("renamed")
    assert not (bundle_dir / replaced.file).exists()
    assert [t.name for t in Bundle.open(bundle_dir).tasks()] == ["a", "b", "new-task"]
    with pytest.raises(BundleError, match="registered tasks: a, b, new-task"):
        bundle.task("renamed")


@pytest.mark.parametrize("name", ["a/b", "..", "", ".hidden", "x" * 65, "with space", "../escape"])
def test_invalid_task_names_are_refused(bundle_dir, name):
    with pytest.raises(BundleError, match="invalid task name.*A-Z a-z 0-9"):
        validate_task_name(name)
    with pytest.raises(BundleError, match="invalid task name"):
        _add(Bundle.open(bundle_dir), name)
    assert sorted(p.name for p in (bundle_dir / "tasks").iterdir()) == [
        "a.npz", "a.stats.npz", "b.npz", "b.stats.npz", "registry.json"]


def test_duplicates_and_bad_prototypes_are_refused(bundle_dir):
    bundle = Bundle.open(bundle_dir)
    with pytest.raises(BundleError, match="task 'a' already exists.*pass --replace"):
        _add(bundle, "a")
    for protos, names, message in [
        (np.zeros((3, 1, 7, 7), np.float32), "xyz", r"shape \[3, 1, 7, 7\], this bundle needs \[C, 1, 8, 8\]"),
        (np.zeros((1, 1, 8, 8), np.float32), "x", "at least 2 classes"),
        (np.zeros((3, 1, 8, 8), np.float32), "xy", "3 prototypes but 2 class names"),
        (np.full((2, 1, 8, 8), np.nan, np.float32), "xy", "NaN"),
    ]:
        with pytest.raises(BundleError, match=message):
            bundle.add_task(name="bad", class_names=names, prototypes=protos, images_seen=1, accuracy=None,
                            source="device")
    assert [t.name for t in bundle.tasks()] == ["a", "b"]


def test_a_tampered_task_file_is_caught(bundle_dir):
    bundle = Bundle.open(bundle_dir)
    np.savez(bundle_dir / "tasks" / "a.npz", prototypes=np.zeros((3, 1, 8, 8), np.float32))
    with pytest.raises(BundleError, match=r"tasks/a.npz does not match its SHA-256 in tasks/registry.json"):
        bundle.load_prototypes("a")
    assert bundle.load_prototypes("b").shape == (4, 1, 8, 8)


def test_a_crash_before_the_registry_write_leaves_only_an_orphan_file(bundle_dir, monkeypatch):
    bundle = Bundle.open(bundle_dir)
    registry = (bundle_dir / "tasks" / "registry.json").read_bytes()

    def crash(records):
        raise KeyboardInterrupt

    monkeypatch.setattr(bundle, "_write_registry", crash)
    with pytest.raises(KeyboardInterrupt):
        _add(bundle, "lost")
    monkeypatch.undo()
    assert (bundle_dir / "tasks" / "registry.json").read_bytes() == registry
    assert (bundle_dir / "tasks" / "lost.npz").exists() and [t.name for t in bundle.tasks()] == ["a", "b"]
    record = _add(bundle, "lost", seed=3)  # the orphan does not block the name; its file is not reused
    np.testing.assert_array_equal(bundle.load_prototypes("lost"), _protos(4, seed=3))
    assert record.file != "tasks/lost.npz"


def test_the_next_change_removes_what_interrupted_writes_left_and_keeps_the_current_state(bundle_dir):
    bundle = Bundle.open(bundle_dir)
    current = bundle.path / json.loads(bundle.layout.task_free_record.read_text())["file"]
    left = [bundle_dir / "tasks" / "lost.npz", bundle_dir / "tasks" / ".registry.json.x1.tmp",
            bundle_dir / ".task_free.json.x2.tmp", bundle.layout.task_free_state("0" * 64)]
    for file in left:
        file.write_bytes(b"left by a crash")
    with bundle.lock():  # the next change takes the lock, which sweeps
        _add(bundle, "c")
    assert not [f for f in left if f.exists()]
    assert current.exists() and bundle.shared_stats() is not None
    assert [t.name for t in bundle.tasks()] == ["a", "b", "c"]
    # Without a readable task-free record no state file can be told stale: all stay.
    stale = bundle.layout.task_free_state("1" * 64)
    stale.write_bytes(b"left by a crash")
    bundle.layout.task_free_record.write_text("{")
    with bundle.lock():
        bundle.remove_task("c")
    assert stale.exists() and current.exists()


def _stats(bundle: Bundle, classes: int, seed: int) -> TaskStats:
    rng = np.random.default_rng(seed)
    dim = bundle.feature_dim
    return TaskStats(rng.standard_normal((classes, dim)), np.full(classes, 5), rng.standard_normal((classes, dim)), 0.1)


def test_a_task_named_like_another_tasks_statistics_keeps_its_files(bundle_dir):
    bundle = Bundle.open(bundle_dir)
    dotted = _add(bundle, "n.stats", stats=_stats(bundle, 4, 1))  # its prototypes: tasks/n.stats.npz
    plain = _add(bundle, "n", seed=2, stats=_stats(bundle, 4, 2))  # its statistics must go elsewhere
    assert len({dotted.file, dotted.stats_file, plain.file, plain.stats_file}) == 4
    np.testing.assert_array_equal(bundle.load_prototypes("n.stats"), _protos(4))
    for name, seed in (("n.stats", 1), ("n", 2)):
        np.testing.assert_allclose(bundle.load_task_stats(bundle.task(name)).means,
                                   _stats(bundle, 4, seed).means, rtol=1e-3)  # stored as float16


def test_new_statistics_for_a_task_survive_a_crash_before_the_registry_names_them(bundle_dir, monkeypatch):
    bundle = Bundle.open(bundle_dir)
    _add(bundle, "n", stats=_stats(bundle, 4, 1))
    before = bundle.load_task_stats(bundle.task("n"))

    def crash(records):
        raise KeyboardInterrupt

    monkeypatch.setattr(bundle, "_write_registry", crash)
    with pytest.raises(KeyboardInterrupt):
        bundle.set_task_stats("n", _stats(bundle, 4, 2))
    monkeypatch.undo()
    np.testing.assert_array_equal(bundle.load_task_stats(bundle.task("n")).means, before.means)
    updated = bundle.set_task_stats("n", _stats(bundle, 4, 2))
    assert updated.stats_file != bundle.task("a").stats_file
    np.testing.assert_allclose(bundle.load_task_stats(updated).means, _stats(bundle, 4, 2).means, rtol=1e-3)


@pytest.mark.parametrize(("field", "value"), [("file", None), ("stats_file", 5), ("name", 7), ("created", 5),
                                              ("accuracy", "high"), ("class_names", ["x", 2])])
def test_a_registry_entry_of_the_wrong_type_is_a_one_line_error(bundle_dir, field, value):
    registry = bundle_dir / "tasks" / "registry.json"
    data = json.loads(registry.read_text())
    data["tasks"][0][field] = value
    registry.write_text(json.dumps(data))
    with pytest.raises(BundleError, match=f"malformed .*wrong type of {field}"):
        Bundle.open(bundle_dir).tasks()


def test_an_int8_install_that_cannot_write_leaves_the_installed_one_and_a_new_one_drops_stale_engines(
        bundle_dir, monkeypatch):
    from conftest import file_tree

    from pah_edge import bundle as bundle_module
    from pah_edge.errors import StorageError

    bundle = Bundle.open(bundle_dir)
    backbone = bundle.graph_path("backbone")  # stands in for calibrate's INT8 model
    bundle.install_int8(backbone, {"passed": True, "sha256": sha256_file(backbone)})
    for stale in bundle.layout.engine_files("int8"):  # built by build-engine from that model
        stale.parent.mkdir(exist_ok=True)
        stale.write_bytes(b"engine of the first INT8 model")
    before = file_tree(bundle_dir)

    real_staged = bundle_module.staged

    def full_disk_at_the_record(path, data):  # the model is staged, then the disk is full
        if path == bundle.layout.calibration_record:
            raise StorageError(f"could not write {path} (No space left on device)")
        return real_staged(path, data)

    monkeypatch.setattr(bundle_module, "staged", full_disk_at_the_record)
    with pytest.raises(StorageError):
        bundle.install_int8(backbone, {"passed": True, "sha256": sha256_file(backbone), "second": True})
    monkeypatch.undo()
    assert file_tree(bundle_dir) == before and bundle.int8_backbone_path() is not None
    bundle.install_int8(backbone, {"passed": True, "sha256": sha256_file(backbone), "second": True})
    assert not [f for f in bundle.layout.engine_files("int8") if f.exists()]
    assert json.loads(bundle.layout.calibration_record.read_text())["second"]


def test_the_device_side_modules_do_not_import_torch():
    code = ("import sys, pah_edge.bundle, pah_edge.export.verify, pah_edge.export.parity_inputs; "
            "print(sorted(m for m in ('torch', 'onnx', 'tensorrt') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_verify_without_the_source_checkpoint_still_checks_hashes_and_runs(bundle_dir, tmp_path):
    from typer.testing import CliRunner

    from pah_edge.cli import app

    manifest_path = bundle_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["source_checkpoint"]["path"] = str(tmp_path / "moved" / "checkpoint.pt")
    manifest_path.write_text(json.dumps(manifest))  # the manifest is not among the hashed files
    result = CliRunner().invoke(app, ["verify", str(bundle_dir)])
    assert result.exit_code == 0, result.output
    assert "torch: skipped (source checkpoint" in result.output and "nothing to compare" in result.output


def test_a_bundle_object_sees_tasks_that_another_one_registered(bundle_dir):
    reader, writer = Bundle.open(bundle_dir), Bundle.open(bundle_dir)
    before = [r.name for r in reader.tasks()]
    _add(writer, "fresh")
    assert [r.name for r in reader.tasks()] == before + ["fresh"]  # the registry read is cached, never stale
    _add(writer, "fresh", classes=3, seed=1, replace=True)
    assert reader.task("fresh").class_names == ("c0", "c1", "c2")
    reader.tasks().clear()  # callers get a copy of the cached list
    assert [r.name for r in reader.tasks()] == before + ["fresh"]
