"""The device commands run where torch cannot be imported: `learn-task`, `predict` (files and
`--video`), `tasks`, `bench` and `calibrate`, and so does the Python API (`pah_edge.Device`).

A directory holding ``torch/__init__.py`` that raises ImportError goes first on PYTHONPATH of a
subprocess running the real entry point, so any import of torch, direct or through another
package, fails there. The bundle itself is made in this (torch-enabled) process.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_image_folder
from tiny_bundle import QUERY_FILES, make_tiny_bundle, query_folder

from pah_edge.bundle import Bundle
from pah_edge.device.predict import Predictor

REPO = Path(__file__).resolve().parents[1]
BLOCKED = "torch is blocked in this test"


def _blocker(folder: Path, *packages: str) -> Path:
    """A folder of stub packages whose import raises ImportError, to go first on PYTHONPATH."""
    for package in packages:
        (folder / package).mkdir(parents=True)
        (folder / package / "__init__.py").write_text(f"raise ImportError({BLOCKED!r})\n")
    return folder


@pytest.fixture(scope="module")
def made(tmp_path_factory, mnist_digits):
    root = tmp_path_factory.mktemp("no_torch")
    blocker = _blocker(root / "blocker", "torch")
    new_task = write_image_folder(root / "new", mnist_digits, {"pairs": [1, 7]}, per_class=10) / "pairs"
    return make_tiny_bundle(root, mnist_digits), query_folder(root, mnist_digits), new_task, blocker


def _without_torch(blocker: Path, *args) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(blocker), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "PYTHONPATH": path, "COLUMNS": "80"}
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=300)


def test_the_blocker_really_blocks_torch(made):
    result = _without_torch(made[3], "-c", "import torch")
    assert result.returncode == 1 and BLOCKED in result.stderr


def test_learn_task_predict_and_tasks_run_without_torch(made):
    bundle_dir, query, new_task, blocker = made

    def cli(*args):
        result = _without_torch(blocker, "-m", "pah_edge.cli", *args)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Traceback" not in result.stderr and BLOCKED not in result.stderr
        return result.stdout

    report = json.loads(cli("learn-task", new_task, "--bundle", bundle_dir, "--runtime", "onnxruntime-cpu",
                            "--no-progress", "--json"))
    assert report["name"] == "pairs" and report["classes"] == ["digit1", "digit7"]
    assert report["stats_bytes_stored"] > 0  # the task joins task-free prediction

    # Task-free (no --task): every task, with novelty; --novelty-threshold 1e9 makes every image known.
    predictions = json.loads(cli("predict", query, "--bundle", bundle_dir, "--novelty-threshold", "1e9", "--json"))
    with Predictor(Bundle.open(bundle_dir), runtime="onnxruntime-cpu") as predictor:  # torch is importable here
        expected = predictor.predict([query], novelty_threshold=1e9)
    assert [p["path"] for p in predictions] == [str(query / f) for f in QUERY_FILES]
    assert [(p["task"], p["label"], p["known"]) for p in predictions] == [
        (p["task"], p["label"], p["known"]) for p in expected]
    assert {p["task"] for p in predictions} <= {"a", "b", "c", "pairs"}
    np.testing.assert_allclose([p["confidence"] for p in predictions], [p["confidence"] for p in expected], rtol=1e-5)
    np.testing.assert_allclose([p["novelty"] for p in predictions], [p["novelty"] for p in expected], rtol=1e-4)

    listed = json.loads(cli("tasks", "--bundle", bundle_dir, "--json"))
    assert [t["name"] for t in listed] == ["a", "b", "c", "pairs"] and listed[-1]["source"] == "device"
    cli("tasks", "rename", "pairs", "ones-sevens", "--bundle", bundle_dir)
    cli("tasks", "remove", "ones-sevens", "--bundle", bundle_dir)
    assert [t.name for t in Bundle.open(bundle_dir).tasks()] == ["a", "b", "c"]


def test_bench_runs_without_torch(made, tmp_path):
    bundle_dir, _, _, blocker = made

    def bench(*args):
        result = _without_torch(blocker, "-m", "pah_edge.cli", "bench", bundle_dir, *args)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Traceback" not in result.stderr
        return result.stdout

    # The acceptance command.
    bench("--runtime", "onnxruntime", "--batch", "1,8", "--iterations", "50", "--json", tmp_path / "b.json")
    rows = json.loads((tmp_path / "b.json").read_text())["results"]
    assert {r["batch"] for r in rows if r["component"] == "backbone"} == {1, 8}
    for row in rows:
        assert row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"] and row["throughput_ips"] > 0 and row["rss_mb"] > 0

    # Every runtime: the ones that cannot run are listed with their reasons, ONNX Runtime still measured.
    out = bench("--runtime", "all", "--batch", "1", "--iterations", "2", "--warmup", "0")
    assert f"skipped all on torch: torch is installed but cannot be imported ({BLOCKED})" in out
    # Without TensorRT the whole runtime is skipped; with it, this bundle's missing engines are.
    assert "skipped all on tensorrt: " in out or "skipped backbone on tensorrt (precision fp32): no engines/" in out
    assert any(line.startswith("backbone") and "onnxruntime" in line for line in out.splitlines())


def test_bench_plot_without_matplotlib_names_the_install(made, tmp_path):
    bundle_dir = made[0]
    blocker = _blocker(tmp_path / "blocker", "torch", "matplotlib")
    result = _without_torch(blocker, "-m", "pah_edge.cli", "bench", bundle_dir, "--runtime", "onnxruntime",
                            "--plot", tmp_path / "b.png")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: --plot needs matplotlib: pip install matplotlib")
    assert not (tmp_path / "b.png").exists()


def test_calibrate_then_learn_and_predict_with_int8_run_without_torch(made, tmp_path):
    bundle_dir, query, new_task, blocker = made
    bundle_dir = shutil.copytree(bundle_dir, tmp_path / "bundle")

    def cli(*args):
        result = _without_torch(blocker, "-m", "pah_edge.cli", *args, "--no-progress")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Traceback" not in result.stderr and BLOCKED not in result.stderr
        return result.stdout

    cli("calibrate", bundle_dir, "--images", query, "--samples", "4", "--latency-runs", "1")
    report = json.loads(cli("learn-task", new_task, "--bundle", bundle_dir, "--precision", "int8", "--json"))
    assert report["precision"] == "int8" and report["name"] == "pairs"
    predictions = json.loads(_without_torch(blocker, "-m", "pah_edge.cli", "predict", query, "--bundle", bundle_dir,
                                            "--task", "pairs", "--precision", "int8", "--json").stdout)
    assert len(predictions) == len(QUERY_FILES) and {p["task"] for p in predictions} == {"pairs"}


API_SCRIPT = """
import json, sys
from pathlib import Path
import numpy as np
from PIL import Image
from pah_edge import Device
from pah_edge.errors import FrameError

bundle, query, new_task = sys.argv[1:4]
frame = np.asarray(Image.open(query + "/six/0.png"))
with Device(bundle, runtime="onnxruntime-cpu") as dev:
    answers = [p.to_dict() for p in dev.predict_batch([frame, np.repeat(frame[:, :, None], 3, axis=2)])]
    try:
        dev.predict(frame.astype(np.float32))
    except FrameError as exc:
        answers.append(str(exc))
    learned = dev.learn_task(new_task, name="from_folder")
    files = sorted(Path(new_task).glob("*/*.png"))
    images, labels = [np.asarray(Image.open(f)) for f in files], [f.parent.name for f in files]
    arrays = dev.learn_task_arrays(images, labels, name="from_arrays")
    answers.append([learned.classes, arrays.classes, [t.name for t in dev.tasks()]])
    dev.remove_task("from_folder")
    dev.remove_task("from_arrays")
print(json.dumps(answers))
print("torch" in sys.modules)
"""


def test_the_python_api_runs_without_torch(made):
    bundle_dir, query, new_task, blocker = made
    result = _without_torch(blocker, "-c", API_SCRIPT, bundle_dir, query, new_task)
    assert result.returncode == 0, result.stdout + result.stderr
    answers_line, torch_loaded = result.stdout.splitlines()[-2:]
    gray, rgb, error, learned = json.loads(answers_line)
    assert torch_loaded == "False" and gray == rgb and gray["task"] in {"a", "b", "c", None}
    assert "uint8" in error
    assert learned == [["digit1", "digit7"], ["digit1", "digit7"], ["a", "b", "c", "from_folder", "from_arrays"]]
    with Predictor(Bundle.open(bundle_dir), runtime="onnxruntime-cpu") as predictor:  # torch importable here
        [expected] = predictor.predict([query / "six/0.png"])
    assert (gray["task"], gray["label"], gray["known"]) == (expected["task"], expected["label"], expected["known"])
    assert gray["confidence"] == pytest.approx(expected["confidence"], rel=1e-5)


def test_predict_video_runs_without_torch(made, tmp_path):
    cv2 = pytest.importorskip("cv2", reason="needs OpenCV: pip install 'pah-edge[camera]'")
    from test_video import write_video

    bundle_dir, _, _, blocker = made
    video = write_video(tmp_path / "clip.avi", cv2, frames=4)
    result = _without_torch(blocker, "-m", "pah_edge.cli", "predict", "--video", video, "--bundle", bundle_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and BLOCKED not in result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["frame"] for line in lines] == [0, 1, 2, 3]
