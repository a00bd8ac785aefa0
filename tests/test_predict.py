"""Prediction (`pah_edge.device.predict`, `pah-edge predict`) and the task registry commands (`pah-edge tasks`).

One tiny bundle per module (tiny_cnn on real digits; tasks a, b from the workstation, c from the
device). Expected outputs are recomputed by hand from the bundle's ONNX graphs.
"""

import json
import logging
import shutil
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import assert_one_line_error, file_tree, run_cli
from tiny_bundle import QUERY_FILES, make_tiny_bundle, query_folder

from pah_edge.bundle import Bundle, BundleError
from pah_edge.device.images import BatchStream
from pah_edge.device.predict import Predictor, image_files, softmax
from pah_edge.errors import DataError
from pah_edge.preprocess import Preprocess, load_image, to_input


@pytest.fixture(scope="module")
def made(tmp_path_factory, mnist_digits):
    root = tmp_path_factory.mktemp("predict")
    return make_tiny_bundle(root, mnist_digits), query_folder(root, mnist_digits)


@pytest.fixture
def bundle_dir(made, tmp_path):
    """A fresh copy, so a test may change it."""
    return shutil.copytree(made[0], tmp_path / "bundle")


@pytest.fixture
def query(made):
    return made[1]





def _by_hand(bundle_dir: Path, files: list[Path], task: str) -> np.ndarray:
    """Softmax [N, C] from backbone.onnx features and generator.onnx's head, outside the Predictor."""
    bundle = Bundle.open(bundle_dir)
    images = to_input(np.stack([load_image(f, bundle.preprocess) for f in files]), bundle.preprocess)
    feats = ort.InferenceSession(str(bundle.graph_path("backbone"))).run(["features"], {"images": images})[0]
    head = ort.InferenceSession(str(bundle.graph_path("generator"))).run(
        ["head"], {"prototypes": bundle.load_prototypes(task)})[0]
    return softmax(feats.astype(np.float64) @ head.T.astype(np.float64))


# --- prediction --------------------------------------------------------------------------------------


def test_folders_are_walked_recursively_skipping_hidden_and_non_images(query):
    assert image_files([query]) == [query / f for f in QUERY_FILES]
    # A named file is taken as given, even with an unusual suffix; decoding decides.
    assert image_files([query / "notes.txt", query]) == [query / "notes.txt", *(query / f for f in QUERY_FILES)]
    with pytest.raises(DataError, match="no file or folder .*missing.png: check the path"):
        image_files([query / "missing.png"])


def test_json_output_for_a_file_and_a_folder(bundle_dir, query):
    result = run_cli("predict", query / "six" / "0.png", query, "--bundle", bundle_dir, "--task", "c", "--json")
    assert result.exit_code == 0, result.output
    predictions = json.loads(result.stdout)  # stdout holds the JSON list and nothing else
    assert [p["path"] for p in predictions] == [str(query / "six" / "0.png"), *(str(query / f) for f in QUERY_FILES)]
    classes = Bundle.open(bundle_dir).task("c").class_names
    for p in predictions:
        assert set(p) == {"path", "task", "label", "confidence", "novelty", "known"}
        assert p["task"] == "c" and p["label"] in classes and 0.0 <= p["confidence"] <= 1.0
        assert isinstance(p["novelty"], float) and isinstance(p["known"], bool)


def test_labels_and_confidences_match_the_graphs_by_hand(bundle_dir, query):
    files = [query / f for f in QUERY_FILES]
    bundle = Bundle.open(bundle_dir)
    with Predictor(bundle, runtime="onnxruntime-cpu") as predictor:
        for task in ("a", "b", "c"):
            probs = _by_hand(bundle_dir, files, task)
            predictions = predictor.predict(files, task=task, batch_size=3)  # 2 batches
            names = bundle.task(task).class_names
            assert [p["label"] for p in predictions] == [names[i] for i in probs.argmax(1)]
            np.testing.assert_allclose([p["confidence"] for p in predictions], probs.max(1), rtol=1e-5, atol=1e-6)
        record, head = predictor.task_head("c")  # generated once, with the entry it belongs to
        assert record == bundle.task("c") and head.shape == (4, bundle.feature_dim) and head.dtype == np.float32
        assert predictor.task_head("c")[1] is head


def test_a_task_replaced_meanwhile_answers_with_its_new_head_and_class_names(bundle_dir, made):
    files = [made[1] / f for f in QUERY_FILES]
    with Predictor(Bundle.open(bundle_dir), runtime="onnxruntime-cpu") as predictor:
        assert {p["label"] for p in predictor.predict(files, task="c")} <= {f"digit{d}" for d in (6, 7, 8, 9)}
        other = Bundle.open(bundle_dir)  # another process re-learns "c" with 3 classes
        other.add_task(name="c", class_names=["x", "y", "z"], prototypes=other.load_prototypes("a"), images_seen=0,
                       accuracy=None, source="device", replace=True)
        after = predictor.predict(files, task="c")
    assert len(after) == len(files) and {p["label"] for p in after} <= {"x", "y", "z"}



def _task_free_by_hand(bundle_dir: Path, files: list[Path]) -> tuple[list[tuple[str, str]], np.ndarray]:
    """((task, label) per file, novelty) from the stored statistics, written out from the module's docstring."""
    bundle = Bundle.open(bundle_dir)
    images = to_input(np.stack([load_image(f, bundle.preprocess) for f in files]), bundle.preprocess)
    feats = ort.InferenceSession(str(bundle.graph_path("backbone"))).run(["features"], {"images": images})[0]
    shared = np.load(bundle_dir / json.loads((bundle_dir / "task_free.json").read_text())["file"])
    mean, scatter, count = shared["mean"].astype(np.float64), shared["scatter"].astype(np.float64), int(shared["count"])
    means, names = [], []
    for record in bundle.tasks():
        stats = np.load(bundle_dir / record.stats_file)
        factor = stats["factor"].astype(np.float64)
        scatter = scatter + factor.T @ factor + float(stats["residual"]) * np.eye(len(mean))
        count += int(stats["counts"].sum())
        means.append(stats["means"].astype(np.float64))
        names += [(record.name, c) for c in record.class_names]
    covariance = scatter / count
    covariance = 0.95 * covariance + 0.05 * np.trace(covariance) / len(mean) * np.eye(len(mean))
    z = np.sign(feats) * np.sqrt(np.abs(feats))
    z = z / np.linalg.norm(z, axis=1, keepdims=True) - mean
    mu = np.concatenate(means) - mean
    distances = np.stack([np.einsum("nd,nd->n", (z - m) @ np.linalg.inv(covariance), z - m) for m in mu], 1)
    return [names[k] for k in distances.argmin(1)], distances.min(1) / len(mean)


def test_task_free_prediction_matches_the_discriminant_by_hand(bundle_dir, query):
    files = [query / f for f in QUERY_FILES]
    expected, novelty = _task_free_by_hand(bundle_dir, files)
    threshold = json.loads((bundle_dir / "task_free.json").read_text())["threshold"]
    with Predictor(Bundle.open(bundle_dir), runtime="onnxruntime-cpu") as predictor:
        predictions = predictor.predict(files, batch_size=3)
    np.testing.assert_allclose([p["novelty"] for p in predictions], novelty, rtol=1e-3, atol=1e-3)
    for p, (task, label), n in zip(predictions, expected, novelty):
        assert p["known"] == (n <= threshold)
        assert (p["task"], p["label"]) == ((task, label) if p["known"] else (None, None))
        assert 0.0 <= p["confidence"] <= 1.0


def test_task_given_results_are_those_of_the_generated_head_whatever_the_statistics(bundle_dir, query):
    files = [query / f for f in QUERY_FILES]
    with Predictor(Bundle.open(bundle_dir), runtime="onnxruntime-cpu") as predictor:
        before = predictor.predict(files, task="c")
        (bundle_dir / "task_free.json").unlink()  # a bundle exported before the statistics existed
        after = predictor.predict(files, task="c")
    assert [(p["label"], p["confidence"]) for p in before] == [(p["label"], p["confidence"]) for p in after]
    assert {p["task"] for p in after} == {"c"} and {p["novelty"] for p in after} == {None}


def test_every_task_answers_without_task_and_the_threshold_decides_unknown(bundle_dir, query):
    def run(*flags):
        result = run_cli("predict", query, "--bundle", bundle_dir, *flags)
        assert result.exit_code == 0, result.output
        return result

    assert {p["task"] for p in json.loads(run("--json").stdout)} <= {"a", "b", "c", None}
    assert run("--json").stdout == run("--json", "--any-task").stdout  # the alias
    known = json.loads(run("--json", "--novelty-threshold", "1e9").stdout)
    assert all(p["known"] and p["task"] in ("a", "b", "c") for p in known)
    unknown = json.loads(run("--json", "--novelty-threshold", "-1e9").stdout)
    assert all(not p["known"] and p["task"] is None and p["label"] is None for p in unknown)
    lines = run("--novelty-threshold", "-1e9").stdout.splitlines()
    assert len(lines) == len(QUERY_FILES) and all(line.split()[1] == "unknown" for line in lines)


def test_task_from_the_cli(bundle_dir, query):
    result = run_cli("predict", query / "six", "--bundle", bundle_dir, "--task", "c")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith(str(query / "six" / "0.png"))
    path, name, confidence, *novelty = lines[0].split()
    assert name.startswith("c/digit") and confidence.endswith("%") and 0 <= float(confidence[:-1]) <= 100
    assert novelty[0] == "novelty" and float(novelty[1]) >= 0


def test_unreadable_images_are_skipped_with_one_warning(bundle_dir, query, tmp_path, caplog):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with Predictor(Bundle.open(bundle_dir), runtime="onnxruntime-cpu") as predictor, caplog.at_level(logging.WARNING):
        predictions = predictor.predict([broken, query / "top.png"])
        assert [p["path"] for p in predictions] == [str(query / "top.png")]
        assert "skipped 1 unreadable image(s) (" in caplog.text and "of 2" in caplog.text
        with pytest.raises(DataError, match="none of the 1 image"):
            predictor.predict([broken])
        (tmp_path / "texts").mkdir()
        (tmp_path / "texts" / "notes.txt").write_text("no image")
        with pytest.raises(DataError, match="no images"):
            predictor.predict([tmp_path / "texts"])
        with pytest.raises(BundleError, match="no task 'zz' .*registered tasks: a, b, c"):
            predictor.predict([query], task="zz")


@pytest.mark.parametrize("args, words", [
    (["--task", "zz"], ["no task 'zz'", "registered tasks: a, b, c"]),
    (["--task", "a", "--any-task"], ["--task NAME or --any-task, not both"]),
    (["--runtime", "torch"], ["unknown runtime 'torch'", "onnxruntime"]),
])
def test_bad_predict_options_are_one_line_errors(bundle_dir, query, args, words):
    before = file_tree(bundle_dir, lock=False)
    assert_one_line_error(run_cli("predict", query, "--bundle", bundle_dir, *args), *words)
    assert file_tree(bundle_dir, lock=False) == before


def test_bad_predict_paths_are_one_line_errors(bundle_dir, query, tmp_path):
    before = file_tree(bundle_dir, lock=False)
    assert_one_line_error(run_cli("predict", query / "nope.png", "--bundle", bundle_dir), "no file or folder", "nope.png")
    assert_one_line_error(run_cli("predict", query, "--bundle", tmp_path / "none"), "no bundle at", "pah-edge export")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run_cli("predict", empty, "--bundle", bundle_dir), "no images (.png, .jpg, .jpeg, .bmp) in")
    assert file_tree(bundle_dir, lock=False) == before


def test_a_bundle_without_tasks_names_the_fix(bundle_dir, query):
    bundle = Bundle.open(bundle_dir)
    for record in bundle.tasks():
        bundle.remove_task(record.name)
    assert_one_line_error(run_cli("predict", query, "--bundle", bundle_dir), "has no tasks", "pah-edge learn-task")
    result = run_cli("tasks", "--bundle", bundle_dir)
    assert result.exit_code == 0 and "no tasks in" in result.stdout


# --- the task registry commands ----------------------------------------------------------------------


def test_tasks_lists_the_registry(bundle_dir):
    result = run_cli("tasks", "--bundle", bundle_dir, "--json")
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert listed == [r.to_dict() for r in Bundle.open(bundle_dir).tasks()]
    assert [(t["name"], len(t["class_names"]), t["source"]) for t in listed] == [
        ("a", 3, "workstation"), ("b", 3, "workstation"), ("c", 4, "device")]

    result = run_cli("tasks", "--bundle", bundle_dir)
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:] if line.strip()}
    c = listed[2]
    assert set(rows) == {"a", "b", "c"}
    for text in ("4 (digit6, digit7, digit8, ...)", str(c["images_seen"]), f"{100 * c['accuracy']:.1f}%",
                 c["created"][:10], str(c["bytes"]), "device"):
        assert text in rows["c"], (text, rows["c"])


def test_remove_and_rename_round_trip(bundle_dir):
    c_prototypes = Bundle.open(bundle_dir).load_prototypes("c")
    result = run_cli("tasks", "rename", "c", "sevens", "--bundle", bundle_dir)
    assert result.exit_code == 0 and "renamed task 'c' to 'sevens'" in result.stdout, result.output
    result = run_cli("tasks", "remove", "a", "--bundle", bundle_dir)
    assert result.exit_code == 0 and "removed task 'a'" in result.stdout, result.output
    bundle = Bundle.open(bundle_dir)
    assert [r.name for r in bundle.tasks()] == ["b", "sevens"]
    np.testing.assert_array_equal(bundle.load_prototypes("sevens"), c_prototypes)
    assert not (bundle_dir / "tasks" / "a.npz").exists()
    result = run_cli("tasks", "--bundle", bundle_dir, "rename", "sevens", "c")  # --bundle of the group counts too
    assert result.exit_code == 0, result.output
    assert [r.name for r in Bundle.open(bundle_dir).tasks()] == ["b", "c"]


@pytest.mark.parametrize("args, words", [
    (["remove", "zz"], ["no task 'zz'", "registered tasks: a, b, c"]),
    (["rename", "zz", "y"], ["no task 'zz'", "registered tasks: a, b, c"]),
    (["rename", "a", "b"], ["task 'b' already exists"]),
    (["rename", "a", "bad/name"], ["invalid task name 'bad/name'", "A-Z a-z 0-9"]),
    (["rename", "a", ".hidden"], ["invalid task name '.hidden'"]),
])
def test_bad_task_commands_are_one_line_errors_and_change_nothing(bundle_dir, args, words):
    before = file_tree(bundle_dir, lock=False)
    assert_one_line_error(run_cli("tasks", *args, "--bundle", bundle_dir), *words)
    assert file_tree(bundle_dir, lock=False) == before


@pytest.mark.parametrize("command, option", [
    (["predict"], "--any-task"), (["tasks"], "--json"), (["tasks", "remove"], "--bundle"),
    (["tasks", "rename"], "--bundle"), (["demo"], "--limit-per-class"),
])
def test_help_of_the_new_commands(command, option):
    result = run_cli(*command, "--help")
    assert result.exit_code == 0 and option in result.stdout, result.output


def test_batch_stream_reads_ahead_on_a_thread_in_order_and_stops_when_left():
    pre = Preprocess(image_size=4)
    readers = set()

    def load(i: int) -> np.ndarray:
        readers.add(threading.current_thread().name)
        if i == 3:
            raise DataError("unreadable")
        return np.full((4, 4, 3), i, np.uint8)

    stream = BatchStream(list(range(10)), pre, 4, load=load)
    batches = list(stream)
    assert readers == {"pah-edge-prepare"}
    assert [positions.tolist() for _, positions in batches] == [[0, 1, 2], [4, 5, 6, 7], [8, 9]]
    for inputs, positions in batches:  # each image's pixels are its own item's
        assert np.allclose(inputs[:, 0, 0, 0], to_input(np.stack([load(int(i)) for i in positions]), pre)[:, 0, 0, 0])
    assert stream.skipped == [(3, "unreadable")]
    readers.clear()
    assert len(list(BatchStream([0, 1], pre, 4, load=load))) == 1  # one batch: nothing to overlap, no thread
    assert readers == {threading.current_thread().name}
    left = iter(BatchStream(range(10**6), pre, 1, load=load))
    next(left)
    left.close()
    assert not [t for t in threading.enumerate() if t.name == "pah-edge-prepare"]
